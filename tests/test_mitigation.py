"""Optuna mitigation tuning: Pareto logic, option checking, and end-to-end runs with kill + resume."""
import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from analysis import load, tuning
from spurious import train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from spurious.metrics import TEST_KEYS, VAL_KEYS
from spurious.planted import plant_config
from study import cli
from study.mitigation import TuningOptions
from tests.conftest import FASHION_DIR, SIGNAL_AT_FIRST_RESULT, requires_fashion, synthetic_dataset
from trainables import tune_mitigation as trainable


def run_trainable(monkeypatch, config, seeds, restored=None, min_acc=0.5):
    """Run the tune_mitigation trainable outside Tune; return its reports as (metrics, member states)."""
    reports = []
    monkeypatch.setattr(trainable, "report_states",  # Tune writes the states to files at once: copy them
                        lambda metrics, states=None: reports.append((metrics, copy.deepcopy(states))))
    monkeypatch.setattr(trainable, "restored_states", lambda count: restored)
    monkeypatch.setattr(trainable, "use_trial_threads", lambda: None)
    trainable.tune_mitigation(config, {"fashion": synthetic_dataset(n_train=300, n_test=100)}, seeds=seeds,
                              checkpoint_every=2, min_acc=min_acc)
    return reports


def averaged(metrics):
    return {k: metrics[k] for k in metrics if k.endswith("_per_seed") or k.removesuffix("_se") in trainable.AVERAGED}


def assert_close(got, want):
    """Equal metrics up to float rounding (keys, and values to 1e-5 relative or 1e-6 absolute)."""
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(np.asarray(got[key], float), np.asarray(want[key], float), rtol=1e-5, atol=1e-6,
                                   err_msg=key)


@pytest.mark.parametrize("model", ["large_mlp", "cnn002"])  # a bundle, and Engines in lock-step (dropout)
def test_mitigation_trial_reports_the_seed_mean_of_engines_in_lock_step_and_resumes(monkeypatch, model):
    config = dict(dataset="fashion", model=model, pattern="s3", n_spurious=15, target=0, epochs=3, lr=0.05,
                  batch_size=64, device="cpu", l2=1e-3, noise_sigma=0.1, val_size=40)
    reports = run_trainable(monkeypatch, config, seeds=2)
    data = synthetic_dataset(n_train=300, n_test=100)
    # replicates: data seed = training seed = 0, 1 (the pre-issue-12 trial, one Engine per seed)
    cfgs = [TrainConfig(**{**config, "data_seed": seed, "seed": seed}) for seed in (0, 1)]
    engines = [train.Engine(c, plant_config(data, c)) for c in cfgs]
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    assert all(f"{k}_se" in reports[0][0] for k in VAL_KEYS) and reports[0][0]["seed"] == 0
    for epoch, (metrics, states) in enumerate(reports):
        separate = averaged(trainable.seed_average([e.step() for e in engines]))
        if model == "large_mlp":  # a bundle's stacked matmuls: exact on an Intel Xeon, 1e-7 off on an AMD EPYC
            assert_close(averaged(metrics), separate)
        else:  # Engines in lock-step compute exactly what separate Engines do
            assert averaged(metrics) == separate
        assert "constraint" in metrics and (states is not None) == (epoch + 1 in (2, 3)), "every 2 and the last"
    resumed = run_trainable(monkeypatch, config, seeds=2, restored=reports[1][1])
    assert [averaged(m) for m, _ in resumed] == [averaged(m) for m, _ in reports[2:]]


def test_a_diverging_seed_fails_the_mitigation_trial(monkeypatch):
    config = dict(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=15, target=0, epochs=2,
                  lr=1e12, momentum=0.0, batch_size=64, device="cpu")
    with pytest.raises(train.TrainingError, match="training loss became"):
        run_trainable(monkeypatch, config, seeds=2)


def test_the_trial_reports_validation_means_and_its_constraint_reads_validation_accuracy(monkeypatch):
    config = dict(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=15, target=0, epochs=1, lr=0.05,
                  batch_size=64, device="cpu", val_size=40)
    (metrics, _), = run_trainable(monkeypatch, config, seeds=3, min_acc=0.6)
    for key in (*VAL_KEYS, *TEST_KEYS):
        assert np.isfinite(metrics[key]) and np.isfinite(metrics[f"{key}_se"]), key
    assert len(metrics["val_spurious_score_per_seed"]) == 3
    assert metrics["constraint"] == pytest.approx(0.6 - metrics["val_acc"])
    penalty = max(0.0, 0.6 - metrics["val_acc"])
    assert metrics["objective"] == pytest.approx(metrics["val_spurious_score"] + (1 + penalty if penalty else 0))


def test_objectives_and_constraint_use_validation_values_only():
    metrics = {"val_acc": 0.80, "val_spurious_score": 0.10, "test_acc": 0.99, "spurious_score": 0.0}
    assert trainable.constrained_objective(metrics, min_acc=0.85) == {
        "constraint": pytest.approx(0.05), "objective": pytest.approx(0.10 + 1.05)}
    assert trainable.constrained_objective({**metrics, "test_acc": 0.0, "spurious_score": 9.0}, 0.75) == {
        "constraint": pytest.approx(-0.05), "objective": pytest.approx(0.10)}
    assert trainable.replicate_configs(TrainConfig(data_seed=4), 3) == [
        TrainConfig(data_seed=s, seed=s) for s in (4, 5, 6)]


@pytest.mark.parametrize("objective,metric,mode", [
    ("pareto", ["val_spurious_score", "val_acc"], ["min", "max"]), ("constrained", "val_spurious_score", "min")])
def test_optuna_searcher_optimises_validation_metrics(tmp_path, objective, metric, mode):
    from study import mitigation

    searcher = mitigation.make_searcher(TuningOptions(objective=objective), tmp_path / "j.journal", "s")
    assert (searcher._metric, searcher._mode) == (metric, mode)
    assert mitigation._scheduler(TuningOptions(objective="constrained"), 6).metric == "objective"


def test_pareto_front_is_exactly_the_non_dominated_set():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"val_spurious_score": rng.random(200).round(2), "val_acc": rng.random(200).round(2)})
    front = tuning.pareto_front(df)
    for i, row in df.iterrows():
        dominated = ((df.val_spurious_score <= row.val_spurious_score) & (df.val_acc >= row.val_acc)
                     & ((df.val_spurious_score < row.val_spurious_score) | (df.val_acc > row.val_acc))).any()
        assert (i in front.index) == (not dominated)


def test_recommend_picks_lowest_score_within_the_accuracy_budget():
    df = pd.DataFrame({"l2": [0.1, 0.01, 0.001], "noise_sigma": [0.0, 0.1, 0.2], "lr": [0.01] * 3,
                       "val_spurious_score": [0.0, 0.02, 0.05], "val_acc": [0.70, 0.84, 0.86]})
    assert tuning.recommend(df, baseline_acc=0.86, max_acc_drop=0.02)["l2"] == 0.01
    assert tuning.recommend(df, baseline_acc=0.86, max_acc_drop=0.2)["l2"] == 0.1
    assert tuning.recommend(df, baseline_acc=0.95, max_acc_drop=0.0) is None
    # a setting must beat the unmitigated baseline's validation score: a tie is no mitigation worth its cost
    assert tuning.recommend(df, 0.86, 0.02, baseline_score=0.02) is None
    assert tuning.recommend(df, 0.86, 0.2, baseline_score=0.02)["l2"] == 0.1


def test_one_seed_prints_no_standard_error_and_no_negative_zero():
    row = {"val_spurious_score": -0.0, "val_spurious_score_se": float("nan"), "val_acc": 0.78, "val_acc_se": 0.01}
    assert tuning._pm(row, "val_spurious_score", 3) == "0.000 (one seed: no s.e.)"
    assert tuning._pm(row, "val_acc", 4) == "0.7800 ± 0.0100"


def test_pareto_front_and_recommend_ignore_test_columns():
    df = pd.DataFrame({"l2": [0.1, 0.01, 0.001], "noise_sigma": [0.0, 0.1, 0.2], "lr": [0.01] * 3,
                       "val_spurious_score": [0.0, 0.02, 0.05], "val_acc": [0.70, 0.84, 0.86]})
    noisy = df.assign(spurious_score=[0.9, 0.0, 0.5], test_acc=[0.99, 0.1, 0.5])  # would pick another setting
    assert tuning.recommend(noisy, 0.86, 0.02) == {**tuning.recommend(df, 0.86, 0.02), "spurious_score": 0.0,
                                                   "test_acc": 0.1}
    assert tuning.pareto_front(noisy)["l2"].tolist() == tuning.pareto_front(df)["l2"].tolist() == [0.1, 0.01, 0.001]
    frame = pd.DataFrame([{"phase": "search", "trial_id": "a", **df.iloc[0].to_dict(), "spurious_score": 0.3,
                           "test_acc": 0.5, "status": "TERMINATED", "epochs_done": 1}])
    assert not {"spurious_score", "test_acc"} & set(tuning.search_trials(frame).columns)


def test_confirm_settings_are_the_baseline_the_recommendation_and_optionally_the_pareto_set():
    front = pd.DataFrame({"l2": [0.1, 0.01], "noise_sigma": [0.0, 0.1], "lr": [0.01, 0.01]})
    selection = {"front": front, "recommended": front.iloc[1].to_dict()}
    assert tuning.confirm_settings(selection, 0.01) == [
        {"roles": ["baseline"], "l2": 0.0, "noise_sigma": 0.0, "dp_noise_multiplier": 0.0, "dp_max_grad_norm": 1.0,
         "lr": 0.01},
        {"roles": ["recommended"], "l2": 0.01, "noise_sigma": 0.1, "dp_noise_multiplier": 0.0, "dp_max_grad_norm": 1.0,
         "lr": 0.01}]  # a study of l2 and noise: DP off, its clip norm the training default
    assert [s["roles"] for s in tuning.confirm_settings(selection, 0.01, pareto=True)] == [
        ["baseline"], ["recommended", "pareto"], ["pareto"]]
    assert len(tuning.confirm_settings({"front": front, "recommended": None}, 0.01)) == 1
    options = TuningOptions(seeds=3, confirm_seeds=2)
    assert options.search_seeds(5) == [5, 6, 7] and options.confirm_seeds_from(5) == [8, 9]


def test_the_summary_shows_validation_selection_and_test_confirmation_over_fresh_seeds():
    settings = [{"roles": ["baseline"], "l2": 0.0, "noise_sigma": 0.0, "lr": 0.01},
                {"roles": ["recommended"], "l2": 0.01, "noise_sigma": 0.1, "lr": 0.01}]
    frame = pd.DataFrame([
        {"phase": "confirm", "trial_id": "a", "l2": 0.0, "noise_sigma": 0.0, "lr": 0.01, "data_seed": 3, "seeds": 2,
         "spurious_score": 0.30, "spurious_score_se": 0.03, "test_acc": 0.85, "test_acc_se": 0.004,
         "status": "TERMINATED", "epochs_done": 5},
        {"phase": "confirm", "trial_id": "b", "l2": 0.01, "noise_sigma": 0.1, "lr": 0.01, "data_seed": 3,
         "seeds": 2, "spurious_score": 0.10, "spurious_score_se": 0.04, "test_acc": 0.83, "test_acc_se": 0.003,
         "status": "TERMINATED", "epochs_done": 5},
        {"phase": "search", "trial_id": "c", "l2": 0.01, "noise_sigma": 0.1, "lr": 0.01, "spurious_score": 0.9,
         "status": "TERMINATED"}])
    base, rec = tuning.confirmation(frame, settings)
    assert (base["d_spurious_score"], base["d_test_acc"]) == (0.0, 0.0)
    assert rec["d_spurious_score"] == pytest.approx(-0.2) and rec["d_spurious_score_se"] == pytest.approx(0.05)
    assert rec["d_test_acc"] == pytest.approx(-0.02) and rec["status"] == "TERMINATED"
    val = {"l2": 0.01, "noise_sigma": 0.1, "lr": 0.01, "val_spurious_score": 0.05, "val_spurious_score_se": 0.01,
           "val_acc": 0.84, "val_acc_se": 0.002}
    summary = {"objective": "pareto", "max_acc_drop": 0.02, "finished": 1, "pareto": [val], "recommended": val,
               "baseline": {"val_spurious_score": 0.2, "val_spurious_score_se": 0.02, "val_acc": 0.85,
                            "val_acc_se": 0.003},
               "selection": {"note": tuning.provenance(5000, [0, 1], [2, 3]), "confirm_data_seeds": [2, 3]},
               "confirmation": [base, rec]}
    text = tuning.format_summary(summary)
    assert text.startswith("selected on validation (5000 images held out of training), confirmed on test with "
                           "data seeds 2–3 (the search used data seeds 0–1; training seed = data seed)")
    assert "val score=0.050 ± 0.010  val acc=0.8400 ± 0.0020" in text
    assert "test score=0.100 ± 0.040  test acc=0.8300 ± 0.0030  vs baseline: score -0.200 ± 0.050" in text


@pytest.mark.parametrize("kwargs,message", [
    ({"objective": "fastest"}, "objective 'fastest'"), ({"max_acc_drop": 1.5}, "[0, 1]"),
    ({"max_acc_drop": -0.1}, "[0, 1]"), ({"l2_low": -1.0}, "0 < low < high"), ({"sigma_max": -1.0}, "sigma-max"),
    ({"seeds": 0}, "--seeds"), ({"sampler": "cmaes"}, "sampler 'cmaes'"), ({"trials": 0}, "--trials"),
    ({"val_size": 0}, "--val-size must be >= 1"), ({"val_size": -5}, "--val-size"),
    ({"confirm_seeds": 0}, "--confirm-seeds"),
])
def test_bad_tuning_options(kwargs, message):
    with pytest.raises(SpuriousError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TuningOptions(**kwargs)


@pytest.mark.parametrize("argv,message", [
    (["--objective", "fastest"], "objective 'fastest' is not one of pareto, constrained"),
    (["--max-acc-drop", "3"], "--max-acc-drop must be in [0, 1]"),
    (["--l2-range", "-1", "1"], "l2 bounds must satisfy 0 < low < high"),
    (["--study", "demo"], "not a tune-mitigation study"),
    (["--set", "n_spurious=[0,3]"], "needs one value for 'n_spurious'"),
    (["--val-size", "0"], "--val-size must be >= 1"),
    (["--val-size", "-3"], "--val-size must be >= 1"),
    (["--confirm-seeds", "0"], "--confirm-seeds must be >= 1"),
    (["--set", "val_size=100"], "tune-mitigation sets val_size with --val-size (5000)"),
    (["--set", "val_size=0"], "tune-mitigation sets val_size with --val-size (5000)"),
    (["--set", "l2=0.001"], "tune-mitigation sets l2 itself"),
    (["--set", "dp_noise_multiplier=1.0"], "tune-mitigation sets dp_noise_multiplier itself"),
    (["--mitigations", "dp,dropout"], "--mitigations dropout is not a list of l2, noise, dp"),
    (["--mitigations", "dp,dp"], "--mitigations names one twice: dp,dp"),
    (["--max-epsilon", "2"], "--max-epsilon 2.0 needs DP-SGD in the search: add dp to --mitigations"),
    (["--mitigations", "dp", "--max-epsilon", "-1"], "--max-epsilon must be a finite number > 0"),
    (["--mitigations", "dp", "--dp-noise-range", "2", "1"], "--dp-noise-range must satisfy 0 < low < high"),
    (["--mitigations", "dp", "--dp-clip-range", "0", "1"], "--dp-clip-range must satisfy 0 < low < high"),
    (["--mitigations", "dp", "--max-epsilon", "0.001"], "--max-epsilon 0.001 is unreachable: even --dp-noise-range"),
    (["--mitigations", "dp", "--set", "grad_clip=0.5"], "grad_clip=0.5 (element-wise clipping of the batch gradient)"),
    (["--dp-noise-range", "1", "2"], "--dp-noise-range bounds the dp search, which --mitigations l2,noise leaves out"),
    (["--mitigations", "dp", "--sigma-max", "0.5"], "--sigma-max bounds the noise search"),
    (["--mitigations", "noise", "--l2-range", "1e-5", "1e-2"], "--l2-range bounds the l2 search"),
])
def test_cli_rejects_bad_tuning_input_with_one_line(capsys, tmp_path, argv, message):
    code = cli.main(["tune-mitigation", *argv, "--storage-path", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir()), "nothing is created"


def journal_trials(root, name):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=name,
                              storage=JournalStorage(JournalFileBackend(str(root / "optuna.journal"))))
    return study.trials


def finished_search_trials(root, epochs):
    out = {}
    for path in (root / "search").glob("*/result.json"):
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().endswith("}")]
        if any(r.get("epoch") == epochs for r in rows):
            out[path] = path.read_text()
    return out


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_smoke_tuning_killed_in_its_search_and_in_its_confirmation_resumes_each_phase(tmp_path):
    """A tuning run on embedded Ray, killed during its search, resumed with `study resume` and killed again once
    its confirmation has reported, then resumed to the end: finished trials are never run again, the sampler
    keeps its history, and the confirmation finishes where it stopped (W&B off: this is about the phases; the
    README walk-through kills and resumes a tuning run with default W&B)."""
    root = tmp_path / "tune"
    args = [sys.executable, "-m", "study.cli", "tune-mitigation", "--smoke", "--trials", "4", "--seeds", "2",
            "--set", "epochs=2", "--set", "n_spurious=100", "--max-concurrent", "1", "--storage-path",
            str(tmp_path), "--name", "tune", "--wandb", "off"]
    proc = subprocess.Popen(args, stdout=(tmp_path / "run.log").open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and len(finished_search_trials(root, 2)) < 2:
        time.sleep(0.5)
    time.sleep(3)  # let Tune save its experiment state and searcher
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = finished_search_trials(root, 2)
    assert 2 <= len(before) < 4, f"expected an interrupted search, found {len(before)} finished trials"
    history = {t.number: t.params for t in journal_trials(root, "tune") if t.state.name == "COMPLETE"}
    assert len(history) >= 2

    # The confirmation can be one trial of a few seconds (when no setting qualifies, only the baseline is
    # confirmed), too short to kill from outside by polling: the driver kills itself with SIGKILL when its
    # confirmation first reports (a Tune callback added by SIGNAL_AT_FIRST_RESULT).
    again = subprocess.run([sys.executable, "-c", SIGNAL_AT_FIRST_RESULT, "resume", str(root)],
                           stdout=(tmp_path / "resume.log").open("w"), stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=600,
                           env={**os.environ, "SIGNAL_AT_FIRST_RESULT": "confirm:SIGKILL"})
    assert again.returncode == -signal.SIGKILL, (tmp_path / "resume.log").read_text()[-2000:]
    assert (root / "confirm").is_dir() and not (root / "tuning.json").exists()  # killed inside the confirmation
    search = {p: (p / "result.json").read_text() for p in reported_rows(root / "search")}
    assert len(search) == 4, "the resume finished the search before confirming"

    resumed = subprocess.run([sys.executable, "-m", "study.cli", "resume", str(root)],
                             capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "unmitigated baseline" in resumed.stdout and "recommended" in resumed.stdout
    assert "confirmed on test (mean ± s.e. over 2 fresh seeds, data seeds 2–3)" in resumed.stdout
    for path, text in before.items():
        assert path.read_text() == text, "a finished trial was run again"
    assert {p: (p / "result.json").read_text() for p in search} == search, "the search was not run again"
    trials = journal_trials(root, "tune")
    complete = {t.number: t.params for t in trials if t.state.name == "COMPLETE"}
    assert len(complete) == 4, "the search must finish its 4 settings"
    assert all(complete[n] == p for n, p in history.items()), "the sampler's history must be kept"

    summary = json.loads((root / "tuning.json").read_text())
    df = tuning.search_trials(load(root))
    finished = df[df.status == "TERMINATED"]
    assert len(finished) == 4 and summary["finished"] == 4
    front = {(r["l2"], r["noise_sigma"]) for r in summary["pareto"]}
    assert front == set(zip(*[tuning.pareto_front(finished)[k] for k in ("l2", "noise_sigma")]))
    assert summary["baseline"]["val_acc"] > 0.7 and summary["selection"]["val_size"] == 5000
    confirmed = summary["confirmation"]
    assert [c["roles"][0] for c in confirmed] == ["baseline"] + (["recommended"] if summary["recommended"] else [])
    assert all(c["status"] == "TERMINATED" and c["test_acc"] > 0.7 for c in confirmed)
    assert set(tuning.confirm_trials(load(root))["data_seed"]) == {2}, "fresh seeds 2, 3 after the search's 0, 1"
    assert (root / "tradeoff.png").stat().st_size > 10_000
    assert cli.main(["report", str(root)]) == 0
    assert "Pareto set" in (root / "report" / "summary.md").read_text()
    assert "confirmed on test" in (root / "report" / "summary.md").read_text()
    meta = json.loads((root / "study.json").read_text())  # the launch's provenance, then one per resume
    assert "tune-mitigation --smoke" in meta["provenance"]["command"] and len(meta["resumed"]) == 2
    assert "## Provenance" in (root / "report" / "summary.md").read_text()
    assert (root / "report" / "confirm.csv").exists()
    assert (root / "report" / "tradeoff.png").exists() and (root / "report" / "index.html").exists()


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_a_tuning_interrupted_in_its_search_exits_130_without_confirming_and_resumes(tmp_path):
    """Ctrl+C (SIGINT) during the search: Tune stops and returns, and the study must not go on to select from the
    partial search and confirm on test: one line naming `study resume`, exit 130, no tuning.json, no confirmation.
    The driver sends itself SIGINT when the search's first trial reports (SIGNAL_AT_FIRST_RESULT), so the point
    of interruption does not depend on timing. (W&B off: this is about the phases.)"""
    root = tmp_path / "tune"
    args = ["tune-mitigation", "--smoke", "--max-concurrent", "1", "--storage-path", str(tmp_path), "--name", "tune",
            "--wandb", "off"]
    stopped = subprocess.run([sys.executable, "-c", SIGNAL_AT_FIRST_RESULT, *args], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=600,
                             env={**os.environ, "SIGNAL_AT_FIRST_RESULT": "search:SIGINT"})
    assert stopped.returncode == 130, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "study: interrupted in the search: " in stopped.stderr and f"`study resume {root}`" in stopped.stderr
    assert not (root / "tuning.json").exists() and not (root / "confirm").exists()
    assert "confirmed on test (mean" not in stopped.stdout  # the summary's confirmation block

    resumed = subprocess.run([sys.executable, "-m", "study.cli", "resume", str(root)], capture_output=True,
                             text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "confirmed on test (mean" in resumed.stdout
    assert json.loads((root / "tuning.json").read_text())["finished"] == 3


# The shuffled test labels cannot match the md5 of the real file, which `datasets.load` checks by default (a file
# that fails the check is skipped for the next place, the real system folder). This wrapper runs the CLI with
# the check off, so the --data-dir with the shuffled labels is the one read.
UNVERIFIED_CLI = ("import functools, sys\n"
                  "from spurious import datasets\n"
                  "datasets.load = functools.partial(datasets.load, verify=False)\n"
                  "from study import cli\n"
                  "sys.exit(cli.main(sys.argv[1:]))\n")


def shuffled_test_labels_dir(tmp_path):
    """Return a data folder with the real Fashion-MNIST files, except test labels permuted (IDX, gzipped)."""
    import gzip
    import struct

    out = tmp_path / "data-shuffled-test-labels"
    out.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (out / name).symlink_to(FASHION_DIR / name)
    payload = gzip.decompress((FASHION_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    magic, count = struct.unpack(">II", payload[:8])
    labels = np.frombuffer(payload, np.uint8, offset=8).copy()
    assert magic == 2049 and count == len(labels) == 10_000
    shuffled = np.random.default_rng(0).permutation(labels)
    (out / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", magic, count)
                                                                  + shuffled.tobytes()))
    return out, labels, shuffled


def proposals(root):
    """Return the search's proposals in Optuna's order: (l2, noise_sigma) of each trial."""
    trials = sorted(journal_trials(root, root.name), key=lambda t: t.number)
    return [(t.params["l2"], t.params["noise_sigma"]) for t in trials]


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_selection_never_reads_the_test_split(tmp_path):
    """The same tiny tuning study on the real data and on a copy whose test labels are shuffled: the search's
    proposals, its validation values and the recommendation are the same; only the confirmed test numbers
    (trained after the selection) differ. W&B is off: it is not this test's subject, and two offline W&B
    runs per trial would only slow it down."""
    data_dir, labels, shuffled = shuffled_test_labels_dir(tmp_path)
    assert (labels != shuffled).mean() > 0.8
    common = ["tune-mitigation", "--smoke", "--trials", "3", "--seeds", "1", "--confirm-seeds", "1",
              "--val-size", "500", "--max-acc-drop", "1", "--set", "epochs=1", "--set", "n_spurious=100",
              "--storage-path", str(tmp_path / "results"), "--wandb", "off"]
    runs = {"real": [sys.executable, "-m", "study.cli", *common, "--name", "real", "--data-dir", str(FASHION_DIR)],
            "shuffled": [sys.executable, "-c", UNVERIFIED_CLI, *common, "--name", "shuffled",
                         "--data-dir", str(data_dir)]}
    summaries, searches = {}, {}
    for name, argv in runs.items():
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "selected on validation (500 images held out of training), confirmed on test with data seed 1" \
            in done.stdout
        root = tmp_path / "results" / name
        assert json.loads((root / "study.json").read_text())["tuning"]["val_size"] == 500
        summaries[name] = json.loads((root / "tuning.json").read_text())
        values = {(r["l2"], r["noise_sigma"]): [r[k] for k in tuning.SELECTION_KEYS]
                  for r in tuning.search_trials(load(root)).to_dict(orient="records")}
        searches[name] = (proposals(root), values)

    real, mixed = summaries["real"], summaries["shuffled"]
    assert len(searches["real"][0]) == 3 and searches["real"][0] == searches["shuffled"][0]
    assert set(searches["real"][1]) == set(searches["real"][0])
    for setting, values in searches["real"][1].items():  # one seed: its standard errors are NaN on both runs
        assert values == pytest.approx(searches["shuffled"][1][setting], rel=1e-6, nan_ok=True), setting
    assert real["baseline"] == pytest.approx(mixed["baseline"], rel=1e-6, nan_ok=True)
    assert real["recommended"] is not None
    assert {k: real["recommended"][k] for k in tuning.SETTING_KEYS} == \
        {k: mixed["recommended"][k] for k in tuning.SETTING_KEYS}
    assert [r["l2"] for r in real["pareto"]] == [r["l2"] for r in mixed["pareto"]]

    assert [r["roles"] for r in real["confirmation"]] == [["baseline"], ["recommended"]]
    for confirmed, other in zip(real["confirmation"], mixed["confirmation"]):
        assert confirmed["status"] == other["status"] == "TERMINATED"
        assert confirmed["test_acc"] > 0.6 and other["test_acc"] < 0.3, "the shuffled run read shuffled labels"
    assert real["selection"]["confirm_data_seeds"] == [1] and real["selection"]["search_data_seeds"] == [0]
    confirm = tuning.confirm_trials(load(tmp_path / "results" / "real"))
    assert sorted(confirm["data_seed"]) == [1, 1] and (confirm["status"] == "TERMINATED").all()


def reported_rows(experiment):
    """Return {trial dir: result rows} of a Tune experiment directory."""
    out = {}
    for path in experiment.glob("*/result.json"):
        out[path.parent] = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().endswith("}")]
    return out


# --- DP-SGD as a searched mitigation (issue 17, protocol §10.5) ---

def test_the_space_searches_only_the_chosen_mitigations_and_keeps_the_others_off():
    from study import space as space_lib

    dp_only = TuningOptions(mitigations=("dp",)).space(0.05, dp_noise_floor=0.8)
    assert {k: dp_only[k] for k in ("l2", "noise_sigma")} == {"l2": 0.0, "noise_sigma": 0.0}
    assert dp_only["dp_noise_multiplier"].lower == 0.8 and dp_only["dp_noise_multiplier"].upper == 4.0
    assert (dp_only["dp_max_grad_norm"].lower, dp_only["dp_max_grad_norm"].upper) == (0.1, 10.0)
    both = TuningOptions(mitigations=("l2", "dp"), dp_clip_low=0.5, dp_clip_high=2.0).space(0.05)
    assert both["noise_sigma"] == 0.0 and both["l2"].lower == 1e-6 and both["dp_noise_multiplier"].lower == 0.5
    assert both["dp_max_grad_norm"].upper == 2.0
    default = TuningOptions().space(0.05)
    assert default["dp_noise_multiplier"] == 0.0 and "dp_max_grad_norm" not in default
    assert set(space_lib.to_tune(ss_dp())) == {"dp_noise_multiplier", "dp_max_grad_norm"}


def ss_dp():
    import search_spaces as ss

    return ss.dp_space()


@pytest.mark.parametrize("options,metric,mode", [
    ({"mitigations": ("dp",)}, ["val_spurious_score", "val_acc", "dp_epsilon"], ["min", "max", "min"]),
    ({"mitigations": ("dp", "l2"), "max_epsilon": 2.0}, ["val_spurious_score", "val_acc"], ["min", "max"]),
    ({"mitigations": ("dp",), "objective": "constrained"}, "val_spurious_score", "min"),
])
def test_epsilon_is_a_third_objective_unless_it_is_a_budget(tmp_path, options, metric, mode):
    from study import mitigation

    searcher = mitigation.make_searcher(TuningOptions(**options), tmp_path / "j.journal", "s")
    assert (searcher._metric, searcher._mode) == (metric, mode)


def test_the_noise_floor_meets_the_epsilon_budget_and_is_tight():
    from spurious import dp
    from study import mitigation

    base = TrainConfig(dataset="fashion", batch_size=256, epochs=4, val_size=500).to_dict()
    data = {"fashion": synthetic_dataset(n_train=3000, n_test=100)}
    n = len(plant_config(data["fashion"], TrainConfig(**base)).y_train)
    q, steps = 256 / n, 4 * (n // 256)
    floor = mitigation.dp_noise_floor(base, TuningOptions(mitigations=("dp",), max_epsilon=3.0), data)
    assert dp.epsilon(floor, q, steps, 1 / n) <= 3.0 < dp.epsilon(floor * 0.97, q, steps, 1 / n)
    assert mitigation.dp_noise_floor(base, TuningOptions(mitigations=("dp",)), data) == 0.0
    with pytest.raises(SpuriousError, match="upper bound 4.0 gives ε = .* after 4 epochs of batch 256"):
        mitigation.dp_noise_floor(base, TuningOptions(mitigations=("dp",), max_epsilon=0.01), data)


def test_a_three_objective_pareto_front_is_the_non_dominated_set_and_the_budget_filters_the_recommendation():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"val_spurious_score": rng.random(40), "val_acc": rng.random(40), "dp_epsilon": rng.random(40),
                       "l2": 0.0, "noise_sigma": 0.0, "lr": 0.01})
    front = tuning.pareto_front(df, ("val_spurious_score", "dp_epsilon"))
    v = df[["val_spurious_score", "dp_epsilon"]].to_numpy()
    a = df["val_acc"].to_numpy()
    dominated = [any((v[j] <= v[i]).all() and a[j] >= a[i] and ((v[j] < v[i]).any() or a[j] > a[i])
                     for j in range(40)) for i in range(40)]
    assert sorted(front.index) == [i for i in range(40) if not dominated[i]]
    assert len(front) > len(tuning.pareto_front(df))  # a third objective keeps more settings
    best = tuning.recommend(df, baseline_acc=0.5, max_acc_drop=0.1)
    budget = tuning.recommend(df, baseline_acc=0.5, max_acc_drop=0.1, max_epsilon=0.3)
    assert budget["dp_epsilon"] <= 0.3 and budget["val_spurious_score"] >= best["val_spurious_score"]


def test_the_summary_prints_epsilon_and_the_planted_group_bound_for_dp_settings():
    val = {"l2": 0.0, "noise_sigma": 0.0, "dp_noise_multiplier": 1.2, "dp_max_grad_norm": 0.5, "lr": 0.05,
           "val_spurious_score": 0.05, "val_spurious_score_se": 0.01, "val_acc": 0.8, "val_acc_se": 0.002,
           "dp_epsilon": 1.5, "dp_delta_used": 1.8e-5, "dp_group_epsilon": 15.0, "dp_group_delta": 1.0,
           "n_spurious": 10}
    small = {**val, "n_spurious": 3, "dp_group_epsilon": 4.5, "dp_group_delta": 3 * np.exp(3.0) * 1.8e-5}
    summary = {"objective": "pareto", "max_acc_drop": 0.02, "finished": 2, "pareto": [val, small],
               "recommended": small, "epsilon_objective": False, "max_epsilon": 2.0,
               "baseline": {"val_spurious_score": 0.2, "val_spurious_score_se": 0.02, "val_acc": 0.85,
                            "val_acc_se": 0.003},
               "selection": {"note": tuning.provenance(5000, [0, 1], [2, 3]), "confirm_data_seeds": [2, 3]},
               "confirmation": []}
    text = tuning.format_summary(summary)
    assert "DP σ=1.2 C=0.5  lr=0.05" in text and "ε=1.5 (δ=1.8e-05)" in text
    assert "10 planted: group ε=15 (vacuous: δ = 1)" in text and "3 planted: group ε=4.5 (δ=0.0011)" in text
    assert "and ε <= 2.0" in text and "(l2=0, σ=0, no DP)" in text
    assert "ε=" not in tuning.format_summary({**summary, "pareto": [{**val, "dp_epsilon": float("nan")}],
                                              "recommended": None})
    failed = tuning.format_summary({**summary, "errored": ["search a1: SpuriousError: bad"]})
    assert "ERRORED: 1 trial(s) failed; the sets above leave them out:\n  search a1: SpuriousError: bad" in failed


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_a_dp_search_under_an_epsilon_budget_only_tries_settings_that_meet_it(tmp_path):
    """`--max-epsilon` from the CLI: every searched setting's reported ε is within the budget, the objectives stay
    two, and the recommendation rule names the budget (W&B off and one seed: this is about the budget; the
    README walk runs the DP search with default flags)."""
    done = subprocess.run(
        [sys.executable, "-m", "study.cli", "tune-mitigation", "--study", "mitigation-dp", "--smoke", "--trials", "2",
         "--seeds", "1", "--confirm-seeds", "1", "--max-epsilon", "0.5", "--storage-path", str(tmp_path),
         "--name", "budget", "--wandb", "off"], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root = tmp_path / "budget"
    summary = json.loads((root / "tuning.json").read_text())
    assert summary["max_epsilon"] == 0.5 and not summary["epsilon_objective"]
    searched = tuning.search_trials(load(root))
    assert len(searched) == 2 and (searched["dp_noise_multiplier"] > 0).all()
    assert (searched["dp_epsilon"] <= 0.5).all()
    assert "and ε <= 0.5" in done.stdout and "ε=" in done.stdout


def test_show_names_what_a_tuning_study_searches(capsys):
    assert cli.main(["show", "mitigation-dp"]) == 0
    out = capsys.readouterr().out
    assert ("trials: 13; tuning: trials=12, seeds=2, confirm_seeds=2, objective=pareto, mitigations=dp, "
            "max_acc_drop=0.1, confirm_pareto=True") in out
