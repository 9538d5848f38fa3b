"""End-to-end studies on embedded Ray (2 CPUs) through the real `study` CLI, on real Fashion-MNIST.

Each test runs the CLI in a subprocess (as a user would), so Ray starts and stops with it. Tests whose
subject is not W&B pass `--wandb off` (W_OFF): the default W&B path (auto → offline without a key) is
exercised by the README walk-through (tests/test_readme_walkthrough.py), by the fault-retry test below
and by tests/test_wandb.py, and one W&B process per trial would cost the suite time for nothing here.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis import frames
from tests.conftest import SIGNAL_AT_FIRST_RESULT, requires_fashion

pytestmark = [pytest.mark.slow, pytest.mark.ray, requires_fashion]
W_OFF = ("--wandb", "off")
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "spurious_score", "spurious_score_nontarget",
           "patterned_acc", "patterned_target_rate")


def assert_tune_wrote_only_what_is_read(exp: Path) -> None:
    """Each trial directory has result.json and params.json, and none of Tune's unread files."""
    trials = [p.parent for p in exp.glob("*/params.json")]
    assert trials and all((t / "result.json").exists() for t in trials)
    for pattern in ("progress.csv", "events.out.tfevents.*", "params.pkl"):
        assert not list(exp.glob(f"*/{pattern}")), f"Tune wrote {pattern}"


def study(*argv, env=None, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "study.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, **kw)


def start_study(*argv, log: Path, env=None):
    """Start the CLI in the background, its output to `log` (a pipe nobody reads could fill and block it)."""
    return subprocess.Popen([sys.executable, "-m", "study.cli", *argv], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def finished_trials(exp: Path, epochs: int) -> list[Path]:
    done = []
    for result in exp.glob("*/result.json"):
        lines = [json.loads(ln) for ln in result.read_text().splitlines() if ln.strip().endswith("}")]
        if any(r.get("epoch") == epochs for r in lines):
            done.append(result)
    return done


def test_smoke_study_completes_with_all_metrics_in_the_result_grid(tmp_path):
    """Storage given as a URI (file://, as s3:// or gs:// would be): results and study.json land there."""
    proc = study("run", "demo", "--smoke", "--storage-path", f"file://{tmp_path}", "--name", "smoke", *W_OFF)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "spurious_score (mean ± s.e. over seeds)" in proc.stdout and "experiment:" in proc.stdout
    from ray import tune

    grid = tune.ResultGrid(tune.ExperimentAnalysis(str(tmp_path / "smoke")))
    df = grid.get_dataframe()
    assert len(df) == 2 and not grid.errors
    for metric in METRICS:
        assert df[metric].notna().all(), metric
    tidy = frames.load(tmp_path / "smoke")
    assert (tidy["status"] == "TERMINATED").all()
    assert sorted(tidy["spurious_score"]) == pytest.approx(sorted(df["spurious_score"]))
    assert all(Path(c).exists() for c in tidy["checkpoint"])
    assert json.loads((tmp_path / "smoke" / "study.json").read_text())["study"] == "demo"
    assert_tune_wrote_only_what_is_read(tmp_path / "smoke")  # ResultGrid above reads result.json
    from spurious import config as config_lib

    for result in (tmp_path / "smoke").glob("*/result.json"):  # every row carries the full canonical config
        for row in map(json.loads, result.read_text().splitlines()):
            assert set(config_lib.field_names()) <= set(row) and row["pattern"] == "corner_square_5"


def test_a_study_interrupted_by_ctrl_c_exits_130_and_names_study_resume(tmp_path):
    """Ctrl+C (SIGINT) stops Tune, which returns: the run must say that trials are unfinished and how to continue,
    and exit 130, not print a partial table as the result with exit 0. The driver sends itself SIGINT when the
    first trial reports (tests.conftest.SIGNAL_AT_FIRST_RESULT), so the point does not depend on timing. (W&B
    off: this is about the exit.)"""
    exp = tmp_path / "stopped"
    args = ["run", "demo", "--smoke", "--set", "epochs=2", "--max-concurrent", "1", "--storage-path", str(tmp_path),
            "--name", "stopped", "--wandb", "off"]  # 2 epochs: the first report is not the last
    stopped = subprocess.run([sys.executable, "-c", SIGNAL_AT_FIRST_RESULT, *args], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=600,
                             env={**os.environ, "SIGNAL_AT_FIRST_RESULT": "stopped:SIGINT"})
    assert stopped.returncode == 130, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert f"trials did not finish; `study resume {exp}` continues them" in stopped.stdout
    resumed = study("resume", str(exp))
    assert resumed.returncode == 0 and "did not finish" not in resumed.stdout, resumed.stdout[-2000:]


def test_killed_driver_then_resume_finishes_without_rerunning_finished_trials(tmp_path):
    exp = tmp_path / "killed"
    args = ("run", "demo", "--smoke", "--set", "n_spurious=[0,3,10,100]", "--set", "epochs=3",
            "--max-concurrent", "1", "--bundle", "1", "--storage-path", str(tmp_path), "--name", "killed", *W_OFF)
    # --bundle 1: the subject is resuming a study of several trials (auto layout would make it one bundle)
    proc = start_study(*args, log=tmp_path / "run.log")
    deadline = time.time() + 300
    while time.time() < deadline and not finished_trials(exp, 3):
        time.sleep(0.5)
    assert finished_trials(exp, 3), "no trial finished in time"
    time.sleep(3)  # let Tune record the finished trial (experiment state is saved every 2 s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = {p: p.read_text() for p in finished_trials(exp, 3)}
    assert len(before) < 4, "the study must be interrupted before it ends"
    launch = json.loads((exp / "study.json").read_text())["provenance"]

    resumed = study("resume", str(exp), timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    meta = json.loads((exp / "study.json").read_text())  # the launch's provenance kept, the resume's added
    assert meta["provenance"] == launch and "run demo --smoke" in launch["command"]
    assert len(meta["resumed"]) == 1 and f"resume {exp}" in meta["resumed"][0]["command"]
    df = frames.load(exp)
    assert len(df) == 4 and (df["status"] == "TERMINATED").all()
    assert_tune_wrote_only_what_is_read(exp)  # the restored Tuner carries the study's logger too
    for path, text in before.items():
        assert path.read_text() == text, f"finished trial {path.parent.name} was run again"
    epochs = frames.load_epochs(exp)
    assert len(epochs) == 4 * 3, "every trial keeps every reported epoch exactly once"


def test_trial_fault_is_retried_from_its_last_checkpoint_and_stays_one_wandb_run(tmp_path):
    """Default flags (W&B auto → offline here): the retried trial keeps one W&B run holding each epoch once."""
    from study import wandb_setup
    from tests.wandb_records import read_run

    fault = tmp_path / "fault.txt"
    fault.write_text("2")  # fail once, at epoch 3 (epoch 2 is checkpointed: demo checkpoints every 2 epochs)
    proc = study("run", "demo", "--smoke", "--set", "n_spurious=100", "--set", "epochs=3", "--storage-path",
                 str(tmp_path), "--name", "fault", env={"SPURIOUS_FAULT_FILE": str(fault)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not fault.exists(), "the fault must have fired"
    (result,) = (tmp_path / "fault").glob("*/result.json")
    epochs = [json.loads(ln)["epoch"] for ln in result.read_text().splitlines()]
    assert epochs == [1, 2, 3], f"the retry must continue after the epoch-2 checkpoint, saw {epochs}"
    assert frames.load(tmp_path / "fault")["status"].tolist() == ["TERMINATED"]
    (run,) = wandb_setup.offline_runs(wandb_setup.runs_dir(tmp_path / "fault"))
    assert [row["epoch"] for row in read_run(run)["history"] if "epoch" in row] == [1, 2, 3]
    assert_tune_wrote_only_what_is_read(tmp_path / "fault")


def test_diverging_trial_errors_with_one_line_and_the_study_goes_on(tmp_path):
    proc = study("run", "demo", "--smoke", "--set", "n_spurious=100", "--set", "lr=[0.01,1.0e12]",
                 "--set", "momentum=0.0", "--max-failures", "0", "--storage-path", str(tmp_path), "--name", "nan",
                 *W_OFF)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    df = frames.load(tmp_path / "nan")
    assert sorted(df["status"]) == ["ERROR", "TERMINATED"]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("errored:")]
    assert "training loss became" in line


def test_replicate_clean_models_give_a_real_standard_error_and_are_each_trained_once(tmp_path):
    """Under the default seed policy the n = 0 replicates are independently trained clean models, so n = 0 has
    a standard error above zero; the two patterns' n = 0 cells of one data seed share that seed's model
    (protocol §6.4, §7.3). Default W&B mode: this is what `make demo` shows."""
    proc = study("run", "demo", "--set", "n_spurious=0", "--set", "epochs=1", "--storage-path", str(tmp_path),
                 "--name", "clean")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "study demo: 4 cells, 2 trainings in 2 trials (seed policy replicate)" in proc.stdout
    df = frames.load(tmp_path / "clean")
    assert len(df) == 4 and (df["status"] == "TERMINATED").all() and df["training_id"].nunique() == 2
    assert sorted(set(zip(df["data_seed"], df["seed"]))) == [(0, 0), (1, 1)]
    assert (df.groupby("training_id")["test_acc"].nunique() == 1).all(), "one model per training"
    summary = frames.summarize(df, metric="test_acc")  # (a 1-epoch S3 score can be 0 for both models)
    assert (summary["count"] == 2).all() and (summary["se"] > 0).all(), summary


def test_tunes_default_files_go_and_the_analysis_frame_stays_the_same():
    """The same grid with Tune's default loggers and with the study's: equal frames, only the unread files gone
    (the tune-output benchmark at 4 trials; no timing is checked)."""
    import ray

    from study import bench

    try:
        out = bench.tune_output_section(None, trials=4)
    finally:
        ray.shutdown()
    assert out["frames_equal"]
    assert {"progress.csv", "events.out.tfevents.*", "params.pkl"} <= set(out["defaults"]["kinds"])
    assert set(out["study"]["kinds"]) & {"progress.csv", "events.out.tfevents.*", "params.pkl"} == set()
    assert out["study"]["kinds"]["result.json"][0] == out["study"]["kinds"]["params.json"][0] == 4
