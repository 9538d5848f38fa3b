"""Membership inference on DP-SGD targets (issue 17; protocol §9, §10.5): shadows matched on the DP recipe,
bundles that never mix DP and non-DP runs, the target's guarantee on every attack row, the TPR bound of
(ε, δ)-DP, the privacy table and figure; then end to end through the CLI on real Fashion-MNIST."""
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import load, posthoc as analysis, report
from spurious import bundle, cells, dp, mia, planted as planted_lib
from spurious.errors import SpuriousError
from study import mia_cmd
from study.options import RunOptions
from tests.conftest import requires_fashion, synthetic_dataset
from tests.test_influence import one_thread  # noqa: F401  (autouse fixture)
from tests.test_posthoc import save_trained, tiny_cfg
from trainables import mia as mia_trainable

REPO = Path(__file__).resolve().parents[1]
RECIPE = {"dataset": "fashion", "model": "large_mlp", "optimizer": "adam", "lr": 0.01, "momentum": 0.9, "l2": 0.0,
          "grad_clip": 0.0, "noise_sigma": 0.0, "augmentation": "none", "epochs": 1, "batch_size": 128,
          "checkpoint": "ck", "pattern": "r3", "n_spurious": 10, "target": 0, "targets": (), "data_seed": 0,
          "dp_max_grad_norm": 1.0, "dp_delta": 0.0, "dp_sampling": "poisson"}


# ---------------------------------------------------------------- matching and bundling

def test_a_dp_target_is_matched_with_shadows_of_its_own_dp_recipe_only():
    targets = pd.DataFrame([{**RECIPE, "trial_id": "t0", "seed": 0, "subset": 0, "dp_noise_multiplier": 0.0},
                            {**RECIPE, "trial_id": "t1", "seed": 0, "subset": 0, "dp_noise_multiplier": 1.0}])
    shadows = pd.DataFrame([{**RECIPE, "trial_id": f"s{sigma}{k}", "seed": k, "subset": k, "n_spurious": 0,
                             "dp_noise_multiplier": sigma} for sigma in (0.0, 1.0, 2.0) for k in (0, 1)]
                           + [{**RECIPE, "trial_id": "c", "seed": 0, "subset": 0, "n_spurious": 0,
                               "dp_noise_multiplier": 1.0, "dp_max_grad_norm": 5.0}])  # another clipping norm
    matched = mia_cmd.match_shadows(targets, shadows)
    assert [s["trial_id"] for s in matched["t0"]] == ["s0.00", "s0.01"]
    assert [s["trial_id"] for s in matched["t1"]] == ["s1.00", "s1.01"]
    assert set(mia_cmd.DP_KEYS) <= set(mia_cmd.MATCH_KEYS) and set(mia_cmd.DP_KEYS) <= set(mia_cmd.ONLINE_KEYS)
    # a frame written before the DP settings existed reads them as the defaults; 0 and 0.0 are one value
    old = [{k: v for k, v in r.items() if not k.startswith("dp_")} for r in (targets.iloc[0], shadows.iloc[0])]
    old[0]["epochs"] = 1.0
    assert [s["trial_id"] for s in mia_cmd.match_shadows(pd.DataFrame([old[0]]), pd.DataFrame([old[1]]))["t0"]] \
        == ["s0.00"]


def test_a_bundle_never_mixes_dp_and_non_dp_runs():
    cfgs = [tiny_cfg(split=split, subset=k, seed=k, n_spurious=0 if split == "mia_shadow" else 10,
                     dp_noise_multiplier=sigma)
            for sigma in (0.0, 1.0) for split, k in (("mia_target", 0), ("mia_shadow", 0), ("mia_shadow", 1))]
    trials = cells.plan(cfgs, bundle_size=8)
    assert sum(len(members) for members, _ in trials) == 6
    for members, _ in trials:
        assert len({c.dp_noise_multiplier for c in members}) == 1, [c.dp_noise_multiplier for c in members]
    private = [members for members, _ in trials if dp.enabled(members[0])]
    # an MLP on the CPU: DP trainings are bundled as non-DP ones are (batched ghost norms), by split
    assert sorted(len(m) for m in private) == [1, 2] and len(trials) == 4
    data = synthetic_dataset(n_train=200, n_test=100)
    dp_cfgs = [c for c in cfgs if dp.enabled(c) and c.split == "mia_shadow"]
    assert bundle.BundleEngine(dp_cfgs, bundle.plant_members(dp_cfgs, data)).stack is not None
    with pytest.raises(SpuriousError, match="trains DP-SGD runs only as batched matmuls"):
        bundle.BundleEngine(dp_cfgs, bundle.plant_members(dp_cfgs, data), batched=False)
    cnns = [replace(c, model="cnn002") for c in cfgs]  # not batched: each DP training is a trial of its own
    private = [members for members, _ in cells.plan(cnns, bundle_size=8) if dp.enabled(members[0])]
    assert len(private) == 3 and all(len(m) == 1 for m in private)
    with pytest.raises(SpuriousError, match="dp_noise_multiplier"):
        bundle.check_compatible([cfgs[1], cfgs[4]])


# ---------------------------------------------------------------- the attack row and the bound

@pytest.fixture
def reports(monkeypatch):
    """Run the attack trainable outside Tune: its reports are appended to a list."""
    rows = []
    monkeypatch.setattr(mia_trainable, "report", lambda metrics, state=None: rows.append(metrics))
    monkeypatch.setattr(mia_trainable, "use_trial_threads", lambda: None)
    return rows


def test_an_attack_row_carries_the_dp_targets_guarantee(reports, tmp_path):
    data = synthetic_dataset(n_train=800, n_test=400)

    def trained(name, **kw):
        cfg = tiny_cfg(n_spurious=5, epochs=2, **kw)
        return {"trial_id": name, "subset": cfg.subset, "seed": cfg.seed,
                "checkpoint": save_trained(cfg, planted_lib.plant_config(data, cfg), tmp_path / name)}
    shadows = [trained("s", split="mia_shadow", dp_noise_multiplier=1.0)]
    targets = {name: {**trained(name, split="mia_target", dp_noise_multiplier=sigma), "shadows": shadows,
                      "online": []} for name, sigma in (("private", 1.0), ("plain", 0.0))}
    for name in targets:
        mia_trainable.mia_attack({"attack": "loss", "target_trial_id": name}, {"fashion": data}, targets)
    rows = {row["target_trial_id"]: row for row in reports}
    private, plain = rows["private"], rows["plain"]
    n = 300  # the target quarter of a pool of 1,200
    eps = dp.epsilon(1.0, 64 / n, 2 * (n // 64), 1 / n)
    assert private["dp_epsilon"] == pytest.approx(eps) and private["dp_delta_used"] == pytest.approx(1 / n)
    assert (private["dp_group_epsilon"], private["dp_group_delta"]) == pytest.approx(dp.group_epsilon(eps, 1 / n, 5))
    assert private["dp_noise_multiplier"] == 1.0 and not any(k in plain for k in mia_trainable.PRIVACY_KEYS)


def test_the_tpr_bound_of_dp_is_the_hypothesis_testing_region():
    eps, delta, fpr = 1.0, 1e-5, 0.001
    assert mia.dp_tpr_bound(eps, delta, fpr) == pytest.approx(math.e * fpr + delta)
    # large FPR: the other side of the region, 1 − e^−ε (1 − δ − FPR), is the tighter one
    assert mia.dp_tpr_bound(eps, delta, 0.5) == pytest.approx(1 - math.exp(-1) * (0.5 - delta))
    assert mia.dp_tpr_bound(0.0, 0.0, 0.01) == pytest.approx(0.01)  # perfect privacy: no better than chance
    assert mia.dp_tpr_bound(math.inf, math.nan, 0.001) == 1.0 and math.isnan(mia.dp_tpr_bound(math.nan, 0.0, 0.01))
    assert list(mia.dp_tpr_bound(np.array([50.0, 0.1]), np.array([1.0, 0.0]), 0.01)) == pytest.approx(
        [1.0, math.exp(0.1) * 0.01])
    # a test at every threshold of two Gaussians N(0, 1) vs N(μ, 1) is μ-GDP, hence (ε, δ(ε))-DP: never above
    from scipy.stats import norm
    mu, eps = 1.0, 2.0
    delta = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)  # Dong et al. 2022
    t = np.linspace(-5, 8, 500)
    fprs, tprs = norm.sf(t), norm.sf(t - mu)
    assert (tprs <= mia.dp_tpr_bound(eps, delta, fprs) + 1e-12).all()


# ---------------------------------------------------------------- the table, the figure and the report

def attack_frame(dp_targets: bool = True, dp_columns: bool = True) -> pd.DataFrame:
    """Attack rows as `analysis.load` gives them: loss and lira on targets with n ∈ {1, 10}, data seeds 0 and 1,
    trained without DP and (`dp_targets`) with σ = 1 (ε = 2, δ = 1e-5)."""
    rows = []
    for sigma in (0.0, 1.0) if dp_targets else (0.0,):
        for attack in ("loss", "lira"):
            for n in (1, 10):
                for seed in (0, 1):
                    row = {"experiment": "x", "kind": "mia", "status": "TERMINATED", "attack": attack,
                           "target_trial_id": f"t{sigma}{n}{seed}", "dataset": "fashion", "model": "large_mlp",
                           "pattern": "r3", "n_spurious": n, "data_seed": seed, "auc": 0.6 - 0.1 * sigma,
                           "tpr_at_0_1pct_fpr": 0.01, "spurious_tpr_at_0_1pct_fpr": 0.5 - 0.4 * sigma + 0.1 * seed,
                           "spurious_tpr_at_1pct_fpr": 0.8 - 0.5 * sigma, "attack_acc": 0.55,
                           "spurious_attack_acc": 0.9, "checkpoint": None}  # no saved scores: no ROC
                    if dp_columns:
                        row.update(dp_noise_multiplier=sigma, dp_max_grad_norm=1.0, dp_delta=0.0)
                    if sigma:
                        eps_k, delta_k = dp.group_epsilon(2.0, 1e-5, n)
                        row.update(dp_epsilon=2.0, dp_delta_used=1e-5, dp_group_epsilon=eps_k, dp_group_delta=delta_k)
                    rows.append(row)
    return pd.DataFrame(rows)


def test_the_privacy_table_puts_epsilon_and_the_bounds_beside_the_planted_tpr():
    df = attack_frame()
    summary = analysis.privacy_summary(df).set_index(["attack", "dp_noise_multiplier", "n_spurious"])
    assert len(summary) == 8 and (summary["targets"] == 2).all()
    private, plain = summary.loc[("loss", 1.0, 10)], summary.loc[("loss", 0.0, 10)]
    assert private["epsilon"] == 2.0 and private["group_epsilon"] == 20.0 and private["group_delta"] == 1.0
    assert private["spurious_tpr_at_0_1pct_fpr"] == pytest.approx(0.15)
    assert private["spurious_tpr_at_0_1pct_fpr_se"] == pytest.approx(0.05)
    assert private["spurious_tpr_at_0_1pct_fpr_bound"] == pytest.approx(math.exp(2) * 0.001 + 1e-5)
    assert private["spurious_tpr_at_0_1pct_fpr_group_bound"] == 1.0
    one = summary.loc[("loss", 1.0, 1)]  # k = 1: the group bound is the one-example bound
    assert one["spurious_tpr_at_1pct_fpr_group_bound"] == pytest.approx(one["spurious_tpr_at_1pct_fpr_bound"])
    assert math.isinf(plain["epsilon"]) and plain["spurious_tpr_at_1pct_fpr_bound"] == 1.0
    table = analysis.mia_privacy_table(df)
    for text in ("∞ (no DP)", "2 at δ 1e-05", "20, δ_k 1 (vacuous)", "TPR@0.1%", "TPR@1% bound", "0.0074 / 1",
                 "Kairouz"):
        assert text in table, text
    assert "online" not in table.splitlines()[-1]  # no online shadows: no per-example columns
    # the attack table splits its rows by σ once the targets differ in it, and counts the targets of each row
    assert "dp_noise_multiplier" in analysis.mia_table(df) and "over 2 target model(s)" in analysis.mia_table(df)
    fig = analysis.privacy_figure(df)
    assert len(fig.axes) == 4  # 2 attacks × 2 FPRs
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["2", "no DP"]


def test_without_dp_targets_the_attack_output_is_unchanged(tmp_path):
    plain, old = attack_frame(dp_targets=False), attack_frame(dp_targets=False, dp_columns=False)
    assert not analysis.has_dp(plain) and analysis.privacy_summary(plain).empty
    assert analysis.mia_table(plain) == analysis.mia_table(old)
    assert "(no attack trials on DP targets)" == analysis.mia_privacy_table(plain)
    sections = dict((title, (text, made)) for title, text, made in report.posthoc_sections(plain))
    text, made = sections["Membership inference"]
    assert "DP guarantee" not in text and [name for name, _ in made] == ["mia_attack_success", "mia_roc"]
    text, made = dict((t, (x, m)) for t, x, m in report.posthoc_sections(attack_frame()))["Membership inference"]
    assert "DP guarantee" in text and "mia_privacy" in [name for name, _ in made]


# ---------------------------------------------------------------- end to end, through the CLI

def study(*argv, cwd, timeout=600):
    """Run `study …` as a user would: default verbosity and W&B mode (conftest's HOME without keys, so offline)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "study.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_membership_inference_on_dp_targets_from_the_cli(tmp_path):
    """`study run mia-train --smoke --set dp_noise_multiplier=[0,1.0]` then `study mia --smoke`: each target is
    attacked with shadows of its own σ, every row carries its target's ε, and the report shows ε and the bound.
    About 3 minutes on 2 CPUs, most of it the three DP models' one epoch each (per-example gradients)."""
    done = study("run", "mia-train", "--smoke", "--set", "dp_noise_multiplier=[0,1.0]", "--name", "mia-dp",
                 cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trained = load(tmp_path / "results" / "mia-dp")
    assert len(trained) == 6 and (trained["status"] == "TERMINATED").all()
    private = trained[trained["dp_noise_multiplier"] == 1.0]
    assert private["dp_epsilon"].notna().all() and trained.loc[trained["dp_noise_multiplier"] == 0,
                                                               "dp_epsilon"].isna().all()
    done = study("mia", "--from", "results/mia-dp", "--smoke", "--attack", "loss", "--attack", "lira",
                 cwd=tmp_path)  # two attacks of the four: the test stays near 3 minutes on 2 CPUs
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 target(s); offline shadows per target: 2" in done.stdout
    df = load(tmp_path / "results" / "mia-dp-mia-loss-lira")
    assert len(df) == 4 and (df["status"] == "TERMINATED").all()
    sigma_of = dict(zip(trained["trial_id"], trained["dp_noise_multiplier"]))
    eps_of = dict(zip(trained["trial_id"], trained["dp_epsilon"]))
    handed, _ = mia_cmd.plan(str(tmp_path / "results" / "mia-dp"), None, {"shadows": 2}, {}, RunOptions())
    for target, entry in handed.sources.items():  # what each attack trial was given: same-σ shadows only
        assert [sigma_of[s["trial_id"]] for s in entry["shadows"]] == [sigma_of[target]] * 2
    assert sorted(sigma_of[t] for t in handed.sources) == [0.0, 1.0]
    for trial in df.itertuples():
        assert trial.dp_noise_multiplier == sigma_of[trial.target_trial_id]
        if trial.dp_noise_multiplier > 0:
            assert trial.dp_epsilon == pytest.approx(eps_of[trial.target_trial_id])
        else:
            assert math.isnan(trial.dp_epsilon)
    table = analysis.mia_privacy_table(df)
    assert "∞ (no DP)" in table and "(vacuous)" in table  # n = 10 planted: the group bound says nothing
    out = report.write_report(tmp_path / "results" / "mia-dp-mia-loss-lira")
    summary = (out / "summary.md").read_text()
    assert "DP guarantee" in summary and (out / "figures" / "mia_privacy.png").exists()
    print(table)
