"""Post-hoc studies (`study delete`, `study mia`): settings, source selection, shadow matching, the
trainables without Ray, the analysis frames and figures; then end to end through the CLI on real data."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import load, posthoc as analysis
from spurious import checkpoint as ckpt, config as config_lib, mia, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from spurious import planted as planted_lib
from spurious.planted import plant
from study import delete_cmd, mia_cmd, posthoc, runner
from tests.conftest import requires_fashion, synthetic_dataset
from tests.test_influence import one_thread  # noqa: F401  (autouse fixture)
from trainables import delete as delete_trainable, mia as mia_trainable
from trainables.sources import read_checkpoint, read_source

# ---------------------------------------------------------------- settings


def test_delete_settings_validate_and_fill_the_group_influence_defaults():
    s = delete_trainable.settings({"method": "group_influence", "source_trial_id": "a", "solver": "lissa",
                                   "depth": 50, "damping": "1e-3", "scale": 10})
    assert s.scale == 10.0 and s.damping == 1e-3 and s.per_example
    assert s.influence("fashion", 20) == {"mode": "corrected", "solver": "lissa", "depth": 50, "scale": 10.0,
                                          "damping": 1e-3, "repeats": 10, "batch_size": 1}
    assert delete_trainable.settings({}).influence("fashion", 100) == {  # protocol §8.2: cg, damping d·s
        "mode": "corrected", "solver": "cg", "damping": 1.0, "tol": 1e-3, "max_iter": 100}
    reference = delete_trainable.settings({"mode": "reference", "lissa_batch_size": 4}).influence("fashion", 100)
    assert reference == {"mode": "reference", "solver": "lissa", "depth": 1000, "scale": 100.0, "damping": 0.01,
                         "repeats": 10, "batch_size": 4}
    for bad, message in (({"solver": "newton"}, "solver 'newton' is not one of cg, lissa"),
                         ({"mode": "verbatim"}, "mode 'verbatim' is not one of corrected, reference"),
                         ({"mode": "reference", "solver": "cg"}, "solver must be lissa, got 'cg'"),
                         ({"depth": 50}, "depth: only for solver=lissa, and this trial's solver is cg"),
                         ({"solver": "lissa", "cg_tol": 0.01}, "cg_tol: only for solver=cg"),
                         ({"cg_tol": 0.0}, "cg_tol must be > 0 and < 1, got 0.0"),
                         ({"cg_max_iter": 0}, "cg_max_iter must be >= 1, got 0"),
                         ({"damping": -0.5}, "damping must be finite and >= 0, got -0.5"),
                         ({"residual_batch": 0}, "residual_batch must be >= 1, got 0")):
        with pytest.raises(SpuriousError, match=re.escape(message)) as err:
            delete_trainable.settings(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(SpuriousError, match="unknown deletion setting.*'epochs'.*allowed"):
        delete_trainable.settings({"epochs": 3})
    with pytest.raises(SpuriousError, match="'depth' must be int or None"):
        delete_trainable.settings({"depth": "deep"})
    with pytest.raises(SpuriousError, match="'per_example' must be bool"):
        delete_trainable.settings({"per_example": 1})
    with pytest.raises(SpuriousError, match="method 'forget'"):
        delete_trainable.settings({"method": "forget"})
    with pytest.raises(SpuriousError, match="lr_policy"):
        delete_trainable.settings({"lr_policy": "warm"})


def test_mia_settings_validate():
    assert mia_trainable.settings({"attack": "lira", "shadows": 2}).shadows == 2
    with pytest.raises(SpuriousError, match="attack 'guess'"):
        mia_trainable.settings({"attack": "guess"})
    with pytest.raises(SpuriousError, match="lira_variance"):
        mia_trainable.settings({"lira_variance": "huge"})


def test_cli_settings_reject_unknown_keys_and_take_lists_as_grid_axes():
    assert delete_cmd.parse_settings(["depth=[50,100]", "lr_policy=reset"]) == {"depth": [50, 100],
                                                                                 "lr_policy": "reset"}
    with pytest.raises(SpuriousError, match="not a deletion setting"):
        delete_cmd.parse_settings(["n_spurious=3"])
    with pytest.raises(SpuriousError, match="reference_scaling: not a deletion setting; allowed: .*mode, solver"):
        delete_cmd.parse_settings(["reference_scaling=true"])
    assert delete_cmd.smoke_settings({}) == {"retrain_epochs": 1, "cg_max_iter": 5}
    assert delete_cmd.smoke_settings({"mode": "reference"})["depth"] == 50
    assert delete_cmd.smoke_settings({"solver": ["cg", "lissa"]}) == {"retrain_epochs": 1}
    with pytest.raises(SpuriousError, match="must look like key=value"):
        posthoc.parse_pairs(["depth"], "--set")
    space, combos = posthoc.settings_grid({"depth": [50, 100], "repeats": 1})
    assert space["depth"] == {"grid_search": [50, 100]} and len(combos) == 2


# ---------------------------------------------------------------- source selection


def source_frame() -> pd.DataFrame:
    rows = [("t0", "TERMINATED", "ck0", 0, "s3", "full", 0), ("t1", "TERMINATED", "ck1", 10, "s3", "full", 0),
            ("t2", "TERMINATED", "ck2", 10, "r3", "full", 1), ("t3", "ERROR", None, 100, "r3", "full", 0),
            ("t4", "TERMINATED", None, 100, "r3", "full", 1), ("t5", "TERMINATED", "ck5", 0, "r3", "mia_shadow", 0)]
    return pd.DataFrame(rows, columns=["trial_id", "status", "checkpoint", "n_spurious", "pattern", "split",
                                       "data_seed"])


def test_filters_select_by_config_columns_with_numbers_strings_and_lists():
    df = source_frame()
    assert list(posthoc.apply_filters(df, {"n_spurious": 10})["trial_id"]) == ["t1", "t2"]
    assert list(posthoc.apply_filters(df, {"n_spurious": 10, "pattern": "r3"})["trial_id"]) == ["t2"]
    assert list(posthoc.apply_filters(df, {"n_spurious": [0, 100]})["trial_id"]) == ["t0", "t3", "t4", "t5"]
    assert list(posthoc.apply_filters(df, posthoc.parse_pairs(["pattern=s3"]))["trial_id"]) == ["t0", "t1"]
    with pytest.raises(SpuriousError, match="--filter 'colour' is not a column.*n_spurious"):
        posthoc.apply_filters(df, {"colour": "red"})


def test_only_finished_trials_with_something_planted_are_deletion_sources():
    done, notes = posthoc.finished(source_frame())
    assert list(done["trial_id"]) == ["t0", "t1", "t2", "t5"]
    assert sorted(notes) == ["skipping 1 source trial(s) with no checkpoint",
                             "skipping 1 source trial(s) with status ERROR"]
    planted, notes = delete_cmd.deletable(done)
    assert list(planted["trial_id"]) == ["t1", "t2"] and "skipping 2 source trial(s) with nothing planted" in notes[0]


def test_shadows_match_the_targets_split_seed_and_recipe_one_per_subset():
    base = {"dataset": "fashion", "model": "large_mlp", "optimizer": "adam", "lr": 0.01, "momentum": 0.9,
            "l2": 0.0, "grad_clip": 0.0, "noise_sigma": 0.0, "augmentation": "none", "epochs": 2,
            "batch_size": 128, "checkpoint": "ck", "pattern": "r3", "n_spurious": 10, "target": 0, "targets": ()}
    targets = pd.DataFrame([{**base, "trial_id": "a", "data_seed": 0, "seed": 0, "subset": 0},
                            {**base, "trial_id": "b", "data_seed": 1, "seed": 0, "subset": 0}])
    shadows = pd.DataFrame([{**base, "trial_id": "s3", "data_seed": 0, "seed": 1, "subset": 1},
                            {**base, "trial_id": "s1", "data_seed": 0, "seed": 0, "subset": 0},
                            {**base, "trial_id": "s2", "data_seed": 0, "seed": 5, "subset": 0},  # subset 0 again
                            {**base, "trial_id": "s4", "data_seed": 1, "seed": 0, "subset": 0, "lr": 0.1}])
    matched = mia_cmd.match_shadows(targets, shadows)
    assert [s["trial_id"] for s in matched["a"]] == ["s1", "s3"] and [s["subset"] for s in matched["a"]] == [0, 1]
    assert matched["b"] == []
    online = pd.DataFrame([{**base, "trial_id": "o1", "data_seed": 0, "seed": 1, "subset": 1},
                           {**base, "trial_id": "o2", "data_seed": 0, "seed": 2, "subset": 2, "n_spurious": 3}])
    matched = mia_cmd.match_shadows(targets, online, mia_cmd.ONLINE_KEYS)  # online: the same planting too
    assert [s["trial_id"] for s in matched["a"]] == ["o1"]


def test_default_experiment_names():
    assert delete_cmd.default_name("/r/demo-1/", "retrain") == "demo-1-delete-retrain"
    assert mia_cmd.default_name("s3://bucket/mia", ["loss", "lira"]) == "mia-mia-loss-lira"


# ---------------------------------------------------------------- fake experiment directories


def write_trial(exp: Path, name: str, params: dict, result: dict | None, checkpoint: dict | None = None,
                error: str | None = None) -> Path:
    trial = exp / name
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(params))
    if result is not None:
        (trial / "result.json").write_text(json.dumps(result) + "\n")
    if checkpoint is not None:
        (trial / "checkpoint_000000").mkdir()
        torch.save(checkpoint, trial / "checkpoint_000000" / ckpt.LEGACY_FILE)  # a pre-issue-12 layout
    if error:
        (trial / "error.txt").write_text(f"Traceback (most recent call last):\n  File x\n{error}\n")
    return trial


@pytest.fixture
def fake_source(tmp_path):
    """A finished 'training study': two trials (n = 0 and n = 10) with final reports and checkpoints."""
    exp = tmp_path / "src"
    for k, n in enumerate((0, 10)):
        params = {"dataset": "fashion", "pattern": "r3", "n_spurious": n, "epochs": 2, "data_seed": 0}
        write_trial(exp, f"train_classifier_abcde_0000{k}_{k}", params,
                    {"epoch": 2, "trial_id": f"abcde_0000{k}", "spurious_score": 0.1 * n, "test_acc": 0.8},
                    {"format": 1})
    return exp


def test_delete_plan_builds_one_trial_per_source_and_finds_the_retrain_oracles(fake_source, tmp_path):
    options = runner.RunOptions(storage_path=str(tmp_path))
    plan, notes = delete_cmd.plan(str(fake_source), "group_influence", {"solver": "lissa", "depth": [50, 100]}, {},
                                  "auto", options)
    assert plan.name == "src-delete-group_influence" and plan.trials == 2 and plan.datasets == ["fashion"]
    assert plan.space["source_trial_id"] == {"grid_search": ["abcde_00001"]}
    assert plan.space["depth"] == {"grid_search": [50, 100]} and plan.space["method"] == "group_influence"
    assert plan.sources["abcde_00001"]["oracle"] is None
    assert plan.sources["abcde_00001"]["checkpoint"] == str(next(fake_source.glob("*00001*/checkpoint_*")))
    assert any("trained inside each trial" in n for n in notes) and any("nothing planted" in n for n in notes)

    oracle_dir = tmp_path / "src-delete-retrain"
    write_trial(oracle_dir, "delete_fffff_00000_0", {"method": "retrain", "source_trial_id": "abcde_00001"},
                {"trial_id": "fffff_00000", "method": "retrain", "source_trial_id": "abcde_00001"}, {"format": 1})
    (oracle_dir / "study.json").write_text(json.dumps({"kind": "delete", "method": "retrain",
                                                       "source": str(fake_source.resolve())}))
    plan, notes = delete_cmd.plan(str(fake_source), "incremental_retraining", {}, {}, "auto", options)
    assert plan.sources["abcde_00001"]["oracle"] == str(next(oracle_dir.glob("*/checkpoint_*")))
    assert any("1 loaded from" in n for n in notes)
    with pytest.raises(SpuriousError, match="no source trial.*nothing planted"):
        delete_cmd.plan(str(fake_source), "retrain", {}, {"n_spurious": 0}, "auto", options)
    with pytest.raises(SpuriousError, match="unknown deletion setting"):
        delete_cmd.plan(str(fake_source), "retrain", {"colour": 1}, {}, "auto", options)


def test_a_uri_source_is_listed_without_downloading_checkpoints(fake_source):
    df = posthoc.source_trials(f"file://{fake_source}")
    assert len(df) == 2 and set(df["status"]) == {"TERMINATED"}
    assert all(c.startswith(f"file://{fake_source}/train_classifier_") and c.endswith("/checkpoint_000000")
               for c in df["checkpoint"])
    assert list(df["file"]) == ["checkpoint.pt"] * 2


def test_a_bundle_members_checkpoint_file_is_read_from_the_shared_directory(tmp_path):
    frame = pd.DataFrame({"checkpoint": ["/c", "/c", None], "checkpoint_file": ["/c/member_000.pt",
                                                                                "/c/member_001.pt", None]})
    assert posthoc._file_names(frame) == ["member_000.pt", "member_001.pt", None]
    assert posthoc._file_names(frame.drop(columns="checkpoint_file")) == ["member_000.pt", "member_000.pt", None]
    torch.save({"format": 1, "member": 1}, tmp_path / "member_001.pt")
    assert read_source({"checkpoint": str(tmp_path), "file": "member_001.pt"})["member"] == 1


def test_reading_a_missing_or_corrupt_checkpoint_fails_with_one_line(tmp_path):
    with pytest.raises(SpuriousError, match="does not exist") as missing:
        read_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ckpt.member_file(0)).write_bytes(b"not a checkpoint")
    with pytest.raises(SpuriousError, match="cannot be read") as corrupt:
        read_checkpoint(f"file://{tmp_path / 'bad'}")
    assert "\n" not in str(missing.value) and "\n" not in str(corrupt.value)


# ---------------------------------------------------------------- the trainables, without Ray


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(dataset="fashion", model="mlp", pattern="s3", n_spurious=20, target=0, epochs=3, lr=0.05,
                batch_size=64, device="cpu")
    return TrainConfig(**{**base, **kw})


def save_trained(cfg: TrainConfig, data, directory: Path) -> str:
    directory.mkdir(parents=True)
    ckpt.save(train.train(cfg, data).state, directory / ckpt.member_file(0))
    return str(directory)


@pytest.fixture
def captured(monkeypatch):
    """Run trainables outside Tune: their reports are appended to a list."""
    rows = []
    for module in (delete_trainable, mia_trainable):
        monkeypatch.setattr(module, "report", lambda metrics, state=None: rows.append((metrics, state)))
        monkeypatch.setattr(module, "use_trial_threads", lambda: None)
    return rows


@pytest.fixture
def source_checkpoint(tmp_path):
    data = synthetic_dataset()
    cfg = tiny_cfg()
    return {"fashion": data}, cfg, save_trained(cfg, plant(data, "s3", 20, 0, 0), tmp_path / "source")


def test_each_deletion_method_reports_next_to_the_oracle_and_saves_a_loadable_model(captured, source_checkpoint,
                                                                                   tmp_path):
    data, cfg, path = source_checkpoint
    sources = {"src": {"checkpoint": path, "oracle": None}}
    delete_trainable.delete({"method": "retrain", "source_trial_id": "src"}, data, sources)
    delete_trainable.delete({"method": "incremental_retraining", "source_trial_id": "src", "retrain_epochs": 1,
                             "lr_policy": "reset"}, data, sources)
    delete_trainable.delete({"method": "group_influence", "source_trial_id": "src", "cg_max_iter": 3,
                             "residual_batch": 500}, data, sources)
    (retrain, r_state), (incremental, i_state), (influence, g_state) = captured
    assert retrain["oracle_from"] == "self" and retrain["distance_to_oracle_after"] == 0.0
    assert incremental["oracle_from"] == "trained" and incremental["retrain_epochs"] == 1
    assert influence["oracle_from"] == "trained" and influence["gi_solver"] == "cg" and influence["update_norm"] > 0
    assert influence["gi_damping"] == 1.0 and influence["cg_iterations"] <= 3 and influence["ihvp_residual"] > 0
    for row in (retrain, incremental, influence):
        assert row["source_trial_id"] == "src" and row["n_spurious"] == 20 and row["n_deleted"] == 20
        assert row["spurious_score_oracle"] == pytest.approx(retrain["spurious_score_after"])  # same seeds
        assert {"spurious_score_before", "test_acc_after", "distance_to_oracle_before", "wall_time_s"} <= set(row)
    x = plant(data["fashion"], "s3", 20, 0, 0).x_test[:5]
    for state in (r_state, i_state, g_state):
        assert len(state["spurious_idx"]) == 0 and len(state["deletion"]["deleted_idx"]) == 20
        model = ckpt.model_from_checkpoint(state, (1, 28, 28))
        assert model(x).shape == (5, 10)

    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    ckpt.save(r_state, oracle_dir / ckpt.member_file(0))
    sources["src"]["oracle"] = str(oracle_dir)
    delete_trainable.delete({"method": "incremental_retraining", "source_trial_id": "src", "retrain_epochs": 1,
                             "lr_policy": "reset"}, data, sources)
    loaded = captured[-1][0]
    assert loaded["oracle_from"] == "loaded"
    assert loaded["spurious_score_oracle"] == pytest.approx(retrain["spurious_score_after"])
    assert loaded["distance_to_oracle_after"] == pytest.approx(incremental["distance_to_oracle_after"])


def test_an_oracle_of_another_config_is_refused(captured, source_checkpoint, tmp_path):
    data, cfg, path = source_checkpoint
    other = tiny_cfg(seed=1)
    state = train.train(other, plant(data["fashion"], "s3", 20, 0, 0).without_spurious()).state
    state["deletion"] = {"method": "retrain", "deleted_idx": torch.zeros(0, dtype=torch.int64)}
    (tmp_path / "other").mkdir()
    ckpt.save(state, tmp_path / "other" / ckpt.LEGACY_FILE)  # an oracle in the old layout
    with pytest.raises(SpuriousError, match="another config"):
        delete_trainable.delete({"method": "incremental_retraining", "source_trial_id": "src", "retrain_epochs": 1},
                                data, {"src": {"checkpoint": path, "oracle": str(tmp_path / "other")}})


def test_a_diverging_group_influence_fails_with_a_training_error(captured, source_checkpoint):
    data, _, path = source_checkpoint
    config = {"method": "group_influence", "source_trial_id": "src", "solver": "lissa", "depth": 200, "repeats": 1,
              "scale": 1e-3, "damping": 0.0}
    with pytest.raises(train.TrainingError, match="LiSSA diverged"):
        delete_trainable.delete(config, data, {"src": {"checkpoint": path, "oracle": None}})


@pytest.fixture
def membership_study(tmp_path):
    """A tiny membership study on synthetic data (pools of 600: quarters of 300): two targets (n = 5, seeds 0 and 1),
    offline shadows of subsets 0–2 and online shadows of subsets 0–5, as `study mia` would hand them over."""
    data = synthetic_dataset(n_train=800, n_test=400)

    def trained(name, **kw):
        cfg = tiny_cfg(n_spurious=5, epochs=4, **kw)
        return {"trial_id": name, "subset": cfg.subset, "seed": cfg.seed,
                "checkpoint": save_trained(cfg, planted_lib.plant_config(data, cfg), tmp_path / name)}
    shadows = [trained(f"s{k}", split="mia_shadow", subset=k, seed=k) for k in range(3)]
    online = [trained(f"o{k}", split="mia_online", subset=k, seed=k) for k in range(6)]
    targets = {f"t{seed}": {**trained(f"t{seed}", split="mia_target", seed=seed), "shadows": shadows,
                            "online": online} for seed in (0, 1)}
    return {"fashion": data}, targets


def test_mia_trainable_reports_calibrated_metrics_and_saves_scores_for_every_attack(captured, membership_study):
    data, targets = membership_study
    for attack in mia.ATTACKS:
        for target in ("t0", "t1"):
            mia_trainable.mia_attack({"attack": attack, "target_trial_id": target}, data, targets)
    rows = {(row["attack"], row["target_trial_id"]): (row, saved) for row, saved in captured}
    assert len(rows) == 2 * len(mia.ATTACKS)
    for (attack, target), (row, saved) in rows.items():
        online = attack in mia.ONLINE_ATTACKS
        assert row["shadows_used"] == (6 if online else 3) and row["n_spurious_members"] == 5, attack
        assert row["n_members"] + row["n_nonmembers"] + row["n_dropped"] == 600 and row["split"] == "mia_target"
        if attack.startswith("rmia"):  # the population (at most half of the 300 non-members) and as many members
            assert row["n_dropped"] == 300 and row["n_members"] == row["n_nonmembers"] == 150
        for key in ("auc", "attack_acc", "attack_acc_oracle", "spurious_attack_acc", "other_attack_acc",
                    "nonmember_flag_rate", "tpr_at_0_1pct_fpr"):
            assert 0 <= row[key] <= 1 or (attack.startswith("rmia") and math.isnan(row[key])), (attack, key)
        values, planted = saved["scores"].numpy(), saved["planted"].numpy()
        assert values.shape == (600,) and int(planted.sum()) == 5 and saved["first"] == 300
        flagged = values[:300][planted[:300]] >= saved["threshold"]
        assert row["spurious_attack_acc"] == pytest.approx(flagged.mean()), attack
        assert ("planted_tpr_at_0_1pct_fpr" in row) == online
    # a threshold never derived from the target: the same for two different target models
    for attack in mia.ATTACKS:
        if attack != "shadow":
            assert rows[(attack, "t0")][1]["threshold"] == rows[(attack, "t1")][1]["threshold"], attack
            if not attack.startswith("rmia"):  # RMIA scores are fractions of the population: thresholds may tie
                assert rows[(attack, "t0")][0]["attack_threshold_oracle"] != rows[(attack, "t1")][0][
                    "attack_threshold_oracle"], attack


def test_mia_trainable_refuses_what_it_cannot_attack(captured, membership_study):
    data, targets = membership_study
    with pytest.raises(SpuriousError, match="not a target model"):
        mia_trainable.mia_attack({"attack": "loss", "target_trial_id": "s"}, data,
                                 {"s": {**targets["t0"]["shadows"][0], "shadows": targets["t0"]["shadows"]}})
    with pytest.raises(SpuriousError, match="needs offline shadow models"):
        mia_trainable.mia_attack({"attack": "lira", "target_trial_id": "t0"}, data,
                                 {"t0": {**targets["t0"], "shadows": []}})
    with pytest.raises(SpuriousError, match="needs at least 2 reference models"):
        mia_trainable.mia_attack({"attack": "lira_online", "target_trial_id": "t0"}, data,
                                 {"t0": {**targets["t0"], "online": targets["t0"]["online"][:1]}})


def test_mia_trainable_attacks_the_original_deleted_and_oracle_models(captured, membership_study, tmp_path):
    data, targets = membership_study
    target = targets["t0"]
    sources = {"t0": {"checkpoint": target["checkpoint"], "oracle": None}}
    delete_trainable.delete({"method": "retrain", "source_trial_id": "t0"}, data, sources)
    delete_trainable.delete({"method": "incremental_retraining", "source_trial_id": "t0", "retrain_epochs": 2},
                            data, sources)
    (_, oracle_state), (_, deleted_state) = captured[-2:]
    paths = {}
    for name, state in (("oracle", oracle_state), ("deleted", deleted_state)):
        (tmp_path / name).mkdir()
        ckpt.save(state, tmp_path / name / ckpt.member_file(0))
        paths[name] = str(tmp_path / name)
    original = {"checkpoint": target["checkpoint"], "file": None}
    table = {"d": {"checkpoint": paths["deleted"], "file": None, "shadows": target["shadows"], "online": [],
                   "original": original, "oracle": paths["oracle"]},
             "r": {"checkpoint": paths["oracle"], "file": None, "shadows": target["shadows"], "online": [],
                   "original": original, "oracle": None}}
    mia_trainable.mia_attack({"attack": "lira", "target_trial_id": "d"}, data, table)
    mia_trainable.mia_attack({"attack": "lira", "target_trial_id": "r"}, data, table)
    mia_trainable.mia_attack({"attack": "lira", "target_trial_id": "t0"}, data, targets)
    (d_row, d_saved), (r_row, _), (t_row, _) = captured[-3:]
    assert d_row["roles"] == r_row["roles"] == "original,deleted,retrained"
    assert d_row["deletion_method"] == "incremental_retraining" and r_row["deletion_method"] == "retrain"
    assert d_row["original_spurious_auc"] == t_row["spurious_auc"]  # the source model, attacked as before
    assert d_row["retrained_spurious_auc"] == r_row["retrained_spurious_auc"] == r_row["deleted_spurious_auc"]
    assert d_row["deleted_spurious_auc"] != d_row["retrained_spurious_auc"]
    assert d_saved["deleted_scores"].shape == (600,) and "retrained_threshold" in d_saved
    table["d"]["oracle"] = None
    mia_trainable.mia_attack({"attack": "loss", "target_trial_id": "d"}, data, table)
    assert captured[-1][0]["roles"] == "original,deleted" and "retrained_auc" not in captured[-1][0]


# ---------------------------------------------------------------- analysis


def deletion_experiment(tmp_path: Path, fake_source: Path) -> Path:
    exp = tmp_path / "src-delete-retrain"
    for k, (seed, after) in enumerate(((0, 0.02), (1, 0.04))):
        result = {"trial_id": f"ddddd_0000{k}", "method": "retrain", "source_trial_id": "abcde_00001",
                  "pattern": "r3", "n_spurious": 10, "data_seed": seed, "dataset": "fashion",
                  "spurious_score_before": 0.3, "spurious_score_after": after, "spurious_score_oracle": after,
                  "test_acc_before": 0.8, "test_acc_after": 0.79, "test_acc_oracle": 0.79,
                  "distance_to_oracle_before": 2.0, "distance_to_oracle_after": 0.0}
        write_trial(exp, f"delete_ddddd_0000{k}_{k}", {"method": "retrain", "source_trial_id": "abcde_00001"},
                    result, {"format": 1})
    write_trial(exp, "delete_ddddd_00002_2", {"method": "retrain", "source_trial_id": "abcde_00001"}, None,
                error="spurious.errors.SpuriousError: checkpoint 'x' cannot be read: boom")
    (exp / "study.json").write_text(json.dumps({"kind": "delete", "source": str(fake_source)}))
    return exp


def test_deletion_frames_fill_errored_trials_from_the_source_and_summarise(tmp_path, fake_source):
    df = load(deletion_experiment(tmp_path, fake_source))
    assert sorted(df["status"]) == ["ERROR", "TERMINATED", "TERMINATED"]
    errored = df[df["status"] == "ERROR"].iloc[0]
    assert errored["pattern"] == "r3" and errored["n_spurious"] == 10 and "cannot be read" in errored["error"]
    assert df["n_spurious"].dtype.kind == "i"
    summary = analysis.deletion_summary(df).set_index("role")
    assert summary.loc["after", "mean"] == pytest.approx(0.03) and summary.loc["after", "count"] == 2
    assert summary.loc["before", "se"] == pytest.approx(0.0)
    table = analysis.deletion_table(df)
    assert "0.030 ± 0.010" in table and "spurious_score oracle" in table
    fig = analysis.retrain_figure(df)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["10"]


def test_settings_varied_within_a_method_make_their_own_rows_and_panels():
    rows = [{"method": "group_influence", "mode": mode, "depth": 50, "pattern": "r3", "n_spurious": 10,
             "status": "TERMINATED", "spurious_score_before": 0.5, "spurious_score_after": after,
             "spurious_score_oracle": 0.0}
            for mode, after in (("corrected", 0.4), ("reference", 0.1), ("reference", 0.2))]
    rows.append({"method": "retrain", "pattern": "r3", "n_spurious": 10, "status": "TERMINATED",
                 "spurious_score_before": 0.5, "spurious_score_after": 0.0, "spurious_score_oracle": 0.0})
    df = pd.DataFrame(rows)
    summary = analysis.deletion_summary(df).query("role == 'after'").set_index(["method", "mode"])
    assert "depth" not in summary.index.names  # the same for every group-influence trial
    assert summary.loc[("group_influence", "reference"), "mean"] == pytest.approx(0.15)
    assert summary.loc[("retrain", "-"), "mean"] == 0.0
    titles = [ax.get_title() for ax in analysis.retrain_figure(df).axes]
    assert titles == ["group_influence · mode=corrected · r3", "group_influence · mode=reference · r3",
                      "retrain · r3"]


def test_mia_frames_summaries_and_figures_from_saved_scores(tmp_path):
    exp = tmp_path / "mia"
    rng = np.random.default_rng(0)
    for k, n in enumerate((1, 10)):
        values = np.r_[rng.normal(1, 1, 200), rng.normal(0, 1, 200)]
        values[-5:] = np.nan  # e.g. the RMIA population: left out
        planted = np.zeros(400, bool)
        planted[:n] = True
        saved = {"format": mia_trainable.SCORES_FORMAT, "scores": torch.from_numpy(values), "first": 200,
                 "planted": torch.from_numpy(planted), "threshold": 0.5,
                 "vulnerability_n_in": torch.full((400,), 16), "vulnerability_tpr_at_1pct_fpr": torch.full((400,), 0.25,
                                                                                                   dtype=torch.float64),
                 "vulnerability_tpr_at_0_1pct_fpr": torch.zeros(400, dtype=torch.float64)}
        result = {"trial_id": f"mmmmm_0000{k}", "attack": "loss", "target_trial_id": f"t{k}", "n_spurious": n,
                  "data_seed": 0, "auc": 0.76, "attack_acc": 0.69, "attack_acc_oracle": 0.7,
                  "spurious_attack_acc": 0.9, "other_attack_acc": 0.68, "planted_tpr_at_1pct_fpr": 0.25,
                  "other_examples_tpr_at_1pct_fpr": 0.01}
        write_trial(exp, f"mia_attack_mmmmm_0000{k}_{k}", {"attack": "loss", "target_trial_id": f"t{k}"}, result,
                    saved)
    (exp / "study.json").write_text(json.dumps({"kind": "mia", "source": str(tmp_path / "absent")}))
    df = load(exp)
    summary = analysis.mia_summary(df)
    assert set(summary["n_spurious"]) == {1, 10} and set(summary["attack"]) == {"loss"}
    assert "spurious_attack_acc" in analysis.mia_table(df) and "attack_acc_oracle" in analysis.mia_table(df)
    assert "spurious: flagged" in analysis.mia_reference_table(df)
    assert "planted TPR@1%" in analysis.vulnerability_table(df)
    planted = analysis.planted_vulnerability(df)  # n ≤ 10: one row per planted member of each trial
    assert len(planted) == 1 + 10 and set(planted["n_in"]) == {16} and set(planted["tpr_at_1pct_fpr"]) == {0.25}
    saved = analysis.scores(df["checkpoint"][0])
    assert len(saved["member"]) == 200 and len(saved["nonmember"]) == 195
    fpr, tpr = analysis.roc_points(saved, "spurious")
    assert fpr[0] == 0 and tpr[-1] == 1
    assert len(analysis.mia_figure(df).axes) == 1
    roc = analysis.roc_figure(df).axes[0]
    assert roc.get_xscale() == "log" and roc.get_yscale() == "log"


# ---------------------------------------------------------------- end to end, through the CLI


def study(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "study.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ})


def assert_ok(proc, code=0):
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_deletion_studies_from_a_smoke_training_study(tmp_path):
    run = ("--storage-path", str(tmp_path), "--wandb", "off")  # W&B is the walk-through's subject, not this one's
    # --bundle 1: one trial per model, so that one model's checkpoint can be corrupted below by its trial's name
    assert_ok(study("run", "demo", "--smoke", "--set", "epochs=2", "--set", "n_spurious=[0,100]", "--set",
                    "data_seed=[0,1]", "--name", "src", "--bundle", "1", *run))
    retrain = study("delete", "--from", str(tmp_path / "src"), "--method", "retrain", *run)
    assert_ok(retrain)
    assert "skipping 2 source trial(s) with nothing planted" in retrain.stdout
    oracle = load(tmp_path / "src-delete-retrain")
    assert len(oracle) == 2 and (oracle["status"] == "TERMINATED").all()
    assert (oracle["distance_to_oracle_after"] == 0).all() and (oracle["spurious_score_before"] > 0).all()

    incremental = study("delete", "--from", str(tmp_path / "src"), "--method", "incremental_retraining", "--set",
                        "retrain_epochs=1", "--set", "lr_policy=reset", *run)
    assert_ok(incremental)
    inc = load(tmp_path / "src-delete-incremental_retraining").sort_values("source_trial_id")
    assert (inc["oracle_from"] == "loaded").all() and (inc["source_epoch"] == 2).all()
    assert list(inc["spurious_score_oracle"]) == pytest.approx(
        list(oracle.sort_values("source_trial_id")["spurious_score_after"]))

    shutil.copytree(tmp_path / "src", tmp_path / "bad")
    corrupt = next((tmp_path / "bad").glob("*_n100_c0_d0_*/checkpoint_*"))  # protocol §7.3 names
    (corrupt / ckpt.member_file(0)).write_bytes(b"corrupted on disk")
    influence = study("delete", "--from", str(tmp_path / "bad"), "--method", "group_influence", "--set",
                      "solver=lissa", "--set", "depth=50", "--set", "repeats=1", "--set", "per_example=false",
                      "--max-failures", "0", *run)
    assert_ok(influence, 1)
    assert "errored:" in influence.stdout and "cannot be read" in influence.stdout
    gi = load(tmp_path / "bad-delete-group_influence")
    assert sorted(gi["status"]) == ["ERROR", "TERMINATED"]
    done = gi[gi["status"] == "TERMINATED"].iloc[0]
    assert done["oracle_from"] == "trained" and done["gi_depth"] == 50 and done["ihvp_residual"] > 0
    assert done["pattern"] == config_lib.canonical_name("pattern", "s3")
    assert gi[gi["status"] == "ERROR"].iloc[0]["n_spurious"] == 100  # filled from the source

    resumed = study("resume", str(tmp_path / "bad-delete-group_influence"))
    assert_ok(resumed, 1)
    assert "errored:" in resumed.stdout and "experiment:" in resumed.stdout
    frame = pd.concat([oracle, inc, gi])
    assert len(analysis.retrain_figure(frame).axes) == 3
