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
from spurious.planted import plant
from study import cli
from study.mitigation import TuningOptions
from tests.conftest import requires_fashion, synthetic_dataset
from trainables import tune_mitigation as trainable


def run_trainable(monkeypatch, config, seeds, restored=None):
    """Run the tune_mitigation trainable outside Tune; return its reports as (metrics, member states)."""
    reports = []
    monkeypatch.setattr(trainable, "report_states",  # Tune writes the states to files at once: copy them
                        lambda metrics, states=None: reports.append((metrics, copy.deepcopy(states))))
    monkeypatch.setattr(trainable, "restored_states", lambda count: restored)
    monkeypatch.setattr(trainable, "use_trial_threads", lambda: None)
    trainable.tune_mitigation(config, {"fashion": synthetic_dataset(n_train=300, n_test=100)}, seeds=seeds,
                              checkpoint_every=2, min_acc=0.5)
    return reports


def averaged(metrics):
    return {k: metrics[k] for k in trainable.AVERAGED + ("spurious_score_per_seed",)}


@pytest.mark.parametrize("model", ["large_mlp", "cnn002"])  # a bundle, and Engines in lock-step (dropout)
def test_mitigation_trial_reports_the_seed_mean_of_engines_in_lock_step_and_resumes(monkeypatch, model):
    config = dict(dataset="fashion", model=model, pattern="s3", n_spurious=15, target=0, epochs=3, lr=0.05,
                  batch_size=64, device="cpu", l2=1e-3, noise_sigma=0.1)
    reports = run_trainable(monkeypatch, config, seeds=2)
    data = synthetic_dataset(n_train=300, n_test=100)
    cfgs = [TrainConfig(**{**config, "data_seed": seed}) for seed in (0, 1)]
    engines = [train.Engine(c, plant(data, "s3", 15, 0, c.data_seed)) for c in cfgs]  # the pre-issue-12 trial
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    for epoch, (metrics, states) in enumerate(reports):
        assert averaged(metrics) == averaged(trainable.seed_average([e.step() for e in engines]))
        assert "constraint" in metrics and (states is not None) == (epoch + 1 in (2, 3)), "every 2 and the last"
    resumed = run_trainable(monkeypatch, config, seeds=2, restored=reports[1][1])
    assert [averaged(m) for m, _ in resumed] == [averaged(m) for m, _ in reports[2:]]


def test_a_diverging_seed_fails_the_mitigation_trial(monkeypatch):
    config = dict(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=15, target=0, epochs=2,
                  lr=1e12, momentum=0.0, batch_size=64, device="cpu")
    with pytest.raises(train.TrainingError, match="training loss became"):
        run_trainable(monkeypatch, config, seeds=2)


def test_pareto_front_is_exactly_the_non_dominated_set():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"spurious_score": rng.random(200).round(2), "test_acc": rng.random(200).round(2)})
    front = tuning.pareto_front(df)
    for i, row in df.iterrows():
        dominated = ((df.spurious_score <= row.spurious_score) & (df.test_acc >= row.test_acc)
                     & ((df.spurious_score < row.spurious_score) | (df.test_acc > row.test_acc))).any()
        assert (i in front.index) == (not dominated)


def test_recommend_picks_lowest_score_within_the_accuracy_budget():
    df = pd.DataFrame({"l2": [0.1, 0.01, 0.001], "noise_sigma": [0.0, 0.1, 0.2], "lr": [0.01] * 3,
                       "spurious_score": [0.0, 0.02, 0.05], "test_acc": [0.70, 0.84, 0.86]})
    assert tuning.recommend(df, baseline_acc=0.86, max_acc_drop=0.02)["l2"] == 0.01
    assert tuning.recommend(df, baseline_acc=0.86, max_acc_drop=0.2)["l2"] == 0.1
    assert tuning.recommend(df, baseline_acc=0.95, max_acc_drop=0.0) is None


@pytest.mark.parametrize("kwargs,message", [
    ({"objective": "fastest"}, "objective 'fastest'"), ({"max_acc_drop": 1.5}, "[0, 1]"),
    ({"max_acc_drop": -0.1}, "[0, 1]"), ({"l2_low": -1.0}, "0 < low < high"), ({"sigma_max": -1.0}, "sigma-max"),
    ({"seeds": 0}, "--seeds"), ({"sampler": "cmaes"}, "sampler 'cmaes'"), ({"trials": 0}, "--trials"),
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
])
def test_cli_rejects_bad_tuning_input_with_one_line(capsys, tmp_path, argv, message):
    code = cli.main(["tune-mitigation", *argv, "--storage-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


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
def test_smoke_tuning_run_then_kill_and_resume_keeps_trials_and_sampler_history(tmp_path):
    """A tuning run on embedded Ray, killed during its search and resumed with `study resume` (W&B off: this is
    about the search's history; the README walk-through kills and resumes a tuning run with default W&B)."""
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

    resumed = subprocess.run([sys.executable, "-m", "study.cli", "resume", str(root)],
                             capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "unmitigated baseline" in resumed.stdout and "recommended" in resumed.stdout
    for path, text in before.items():
        assert path.read_text() == text, "a finished trial was run again"
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
    assert summary["baseline"]["test_acc"] > 0.7
    assert (root / "tradeoff.png").stat().st_size > 10_000
    assert cli.main(["report", str(root)]) == 0
    assert "Pareto set" in (root / "report" / "summary.md").read_text()
    assert (root / "report" / "tradeoff.png").exists() and (root / "report" / "index.html").exists()
