"""`study detect` (protocol §12): settings and source selection without Ray; bad input through the CLI (one
line, exit 2, nothing started); every method end to end on a real Fashion-MNIST study, as a user runs it."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis import load
from spurious import config as config_lib, detection
from spurious.errors import SpuriousError
from study import detect_cmd
from tests.conftest import requires_fashion
from tests.wandb_records import read_run
from trainables import detect as detect_trainable
from trainables.sources import read_checkpoint

# ---------------------------------------------------------------- settings and methods


def test_detect_settings_validate_with_one_line_errors():
    s = detect_trainable.settings({"method": "influence", "source_trial_id": "a", "damping": "0.5",
                                   "influence_candidates": 20})
    assert s.damping == 0.5 and s.influence_candidates == 20 and s.scope == "class"
    for bad, message in (({"method": "gradcam"}, "method 'gradcam' is not one of loss, loss_trajectory"),
                         ({"scope": "everything"}, "scope 'everything' is not one of class, all"),
                         ({"pca_dims": 0}, "pca_dims must be an integer >= 1, got 0"),
                         ({"damping": -1.0}, "damping must be finite and >= 0, got -1.0"),
                         ({"cg_tol": 1.5}, "cg_tol must be > 0 and < 1, got 1.5"),
                         ({"direction": "up"}, "direction 'up' is not one of low, high"),
                         ({"epochs": 3}, "unknown detection setting(s) 'epochs'")):
        with pytest.raises(SpuriousError) as err:
            detect_trainable.settings(bad)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_methods_parse_all_in_order_and_settings_must_be_read_by_a_chosen_method():
    assert detect_cmd.parse_methods(["all"]) == list(detection.METHODS)
    assert detect_cmd.parse_methods(["spectral", "loss,spectral"]) == ["loss", "spectral"]
    with pytest.raises(SpuriousError, match="--method 'gradcam' is not a detection method; allowed: loss"):
        detect_cmd.parse_methods(["gradcam"])
    assert detect_cmd.parse_settings(["pca_dims=[5,10]", "scope=all"], ["activation_clustering"]) == {
        "pca_dims": [5, 10], "scope": "all"}
    with pytest.raises(SpuriousError, match="--set pca_dims: not read by --method loss"):
        detect_cmd.parse_settings(["pca_dims=5"], ["loss"])
    with pytest.raises(SpuriousError, match="--set n_spurious: not a detection setting"):
        detect_cmd.parse_settings(["n_spurious=3"], ["loss"])
    assert detect_cmd.default_name("/x/rare", detection.METHODS) == "rare-detect"
    assert detect_cmd.default_name("/x/rare", ["loss", "tracin"]) == "rare-detect-loss-tracin"


# ---------------------------------------------------------------- through the CLI


def test_checkpoint_flags_are_shown_and_checked():
    shown = study("show", "detect-demo")
    assert shown.returncode == 0 and "checkpoints: every 2 epochs and at the last, all kept" in shown.stdout
    shown = study("show", "demo", "--checkpoint-every", "1", "--keep-checkpoints", "0")
    assert shown.returncode == 0 and "checkpoints: every epoch, all kept" in shown.stdout
    assert "checkpoints: every 2 epochs and at the last, the latest 2 kept" in study("show", "demo").stdout
    for flag in ("--checkpoint-every", "--keep-checkpoints"):
        bad = study("run", "demo", "--smoke", flag, "-1")
        assert bad.returncode == 2 and bad.stderr.strip() == f"study: error: {flag} must be >= 0, got -1"


def study(*argv, timeout=900):
    return subprocess.run([sys.executable, "-m", "study.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ})


def assert_ok(proc, code=0):
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small real training study: R3 planted into 100 Fashion-MNIST images of class 0 and its n = 0 model,
    trained on the membership split's target quarter (17,500 images, 1,707 of class 0: the 100 planted are 6 %
    of it), 4 epochs, every checkpoint kept (detect-demo's smoke variant with R3, that split, 4 epochs and
    --checkpoint-every 1)."""
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("real Fashion-MNIST not installed")
    root = tmp_path_factory.mktemp("detect-source")
    # --wandb off: this fixture only makes the source models; the detection runs below use the default W&B mode
    assert_ok(study("run", "detect-demo", "--smoke", "--set", "pattern=r3", "--set", "split=mia_target", "--set",
                    "epochs=4", "--checkpoint-every", "1", "--name", "src", "--storage-path", str(root),
                    "--wandb", "off"))
    return root / "src"


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_bad_detect_inputs_are_one_line_exit_2_and_start_nothing(source, tmp_path):
    other = tmp_path / "other-kind"
    other.mkdir()
    (other / "study.json").write_text(json.dumps({"kind": "delete", "study": "delete"}))
    tuning = tmp_path / "tuning"
    (tuning / "baseline").mkdir(parents=True)  # a tune-mitigation study's phase folder is no training study
    (tuning / "study.json").write_text(json.dumps({"kind": "tune-mitigation", "study": "mitigation"}))
    trial = next(p for p in source.iterdir() if p.is_dir() and (p / "params.json").exists())
    cases = (
        (["--from", str(tuning / "baseline"), "--method", "loss"], "is a folder inside the tune-mitigation study"),
        (["--from", str(trial), "--method", "loss"], "is a folder inside the train study"),
        (["--from", str(source), "--method", "gradcam"], "--method 'gradcam' is not a detection method"),
        (["--from", str(other), "--method", "loss"], "is a delete study; study detect scores the models of a training"),
        (["--from", str(source), "--method", "loss", "--filter", "n_spurious=0"],
         "has planted examples (every selected model has n_spurious = 0): nothing to detect"),
        (["--from", str(tmp_path / "missing"), "--method", "loss"], "does not exist"),
        (["--from", str(source), "--method", "loss", "--set", "pca_dims=5"], "--set pca_dims: not read by"),
        (["--from", str(source), "--method", "spectral", "--set", "scope=everything"], "scope 'everything'"),
        (["--from", str(source), "--method", "loss", "--filter", "colour=red"], "--filter 'colour' is not a column"),
    )
    storage = tmp_path / "results"
    for argv, message in cases:
        proc = study("detect", *argv, "--storage-path", str(storage))
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1 and proc.stdout == "", (argv, proc.stderr)
        assert not storage.exists(), argv  # nothing started, nothing written


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_every_method_runs_from_the_cli_on_a_real_study_and_finds_a_strong_pattern(source, tmp_path):
    proc = study("detect", "--from", str(source), "--method", "all", "--smoke", "--storage-path", str(tmp_path))
    assert_ok(proc)
    out = proc.stdout
    # 2 models × (4 directed methods × 2 directions + spectral + activation clustering)
    assert "detect: 20 trials" in out and "source models: 1 with planted examples, 1 n = 0 control(s)" in out
    assert "loss_trajectory, tracin: the source models kept 4 checkpoint(s) each" in out
    assert "flagging the hardest (direction high) and, separately, the easiest (direction low) images" in out
    experiment = tmp_path / "src-detect"
    assert f"experiment: {experiment}" in out and "W&B: 20 offline run(s)" in out  # the default W&B mode, keyless
    df = load(experiment)
    assert len(df) == 20 and (df["status"] == "TERMINATED").all() and set(df["method"]) == set(detection.METHODS)
    df["label"] = [m if m not in detection.DIRECTED else f"{m}_{d}" for m, d in zip(df["method"], df["direction"])]
    r3 = config_lib.canonical_name("pattern", "r3")
    planted = df[df["n_spurious"] == 100].set_index("label")
    controls = df[df["n_spurious"] == 0].set_index("label")
    assert len(planted) == 10 and (planted["n_planted"] == 100).all() and (planted["k_n"] == 100).all()
    assert (planted["n_candidates"] == 1707).all() and (planted["k_1pct"] == 18).all()  # class 0 of the quarter
    assert planted["auroc"].between(0, 1).all() and planted["average_precision"].between(0, 1).all()
    assert (planted["source_spurious_score"] > 0.2).all()  # R3 from 100 images is learnt in 4 epochs
    # the two directions of a method are one statistic, ranked from either end
    for method in detection.DIRECTED:
        if method != "influence":  # influence solves a different subset from each end
            high, low = planted.loc[f"{method}_high"], planted.loc[f"{method}_low"]
            assert high["auroc"] + low["auroc"] == pytest.approx(1.0, abs=1e-9), method
    # the n = 0 control: no positives, so the planted-based metrics are undefined; its top scores are reported
    assert controls["auroc"].isna().all() and controls["precision_at_n"].isna().all()
    assert controls["score_top1"].notna().all() and (controls["n_planted"] == 0).all()
    assert (controls["control_patterns"] == r3).all()
    # trajectory methods read both kept checkpoints, the others the final one
    assert planted.loc["tracin_low", "checkpoint_epochs"] == "1,2,3,4"
    assert planted.loc["loss_trajectory_high", "checkpoints"] == 4
    assert planted.loc["spectral", "checkpoints"] == 1 and planted.loc["loss_high", "checkpoint_epochs"] == "4"
    # spectral signatures and TracIn find a strong planted pattern (measured 0.70 and 0.79 in-process on this
    # study; on the full training set, where the 100 are 1.7 % of the class, neither does: protocol §12.4)
    print({label: round(float(planted.loc[label, "auroc"]), 3) for label in planted.index})
    assert planted.loc["spectral", "auroc"] > 0.6 and planted.loc["tracin_high", "auroc"] > 0.65
    # the per-example scores are saved with the trial
    row = df[(df["label"] == "tracin_high") & (df["n_spurious"] == 100)].iloc[0]
    saved = read_checkpoint(row["checkpoint"])
    assert saved["scores"].shape == (1707,) and int(saved["planted"].sum()) == 100
    assert math.isclose(float(np.median(saved["scores"].numpy())), row["score_median"], rel_tol=1e-9)
    # W&B: each run's config names the source model, so runs group by pattern and n (study/wandb_callback.py)
    run = read_run(next(Path(experiment, "wandb").glob("offline-run-*")))
    assert {"method", "pattern", "n_spurious", "source_trial_id"} <= set(run["config"])

    report = study("report", str(experiment), "--out", str(tmp_path / "report"))
    assert_ok(report)
    assert (tmp_path / "report" / "figures" / "detection_auroc.png").exists()
    assert "Detection" in (tmp_path / "report" / "summary.md").read_text()
    assert_ok(study("resume", str(experiment)))  # a finished detect study resumes to its table
