"""Default paths: `~` in path options, one callbacks list per Tuner, resources on autoscaling clusters,
W&B runs of restarted trials, the settings study.json records for `study resume`, and fast start-up."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spurious.errors import SpuriousError
from study import cli, cluster, options as options_lib, wandb_runs, wandb_setup
from tests.conftest import requires_fashion

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "pandas", "optuna", "wandb", "matplotlib")


@pytest.mark.parametrize("argv,attr", [
    (["run", "demo", "--storage-path=~/res"], "storage_path"),
    (["run", "demo", "--data-dir", "~/data"], "data_dir"),
    (["run", "~/studies/mine.yaml"], "study"),
    (["show", "~/studies/mine.yaml"], "study"),
    (["resume", "~/res/exp"], "experiment"),
    (["report", "~/res/exp", "--out", "~/reports"], "out"),
    (["report", "~/res/exp"], "experiments"),
    (["delete", "--from", "~/res/exp", "--method", "retrain"], "source"),
    (["mia", "--from", "$HOME/res/exp"], "source"),
    (["tune-mitigation", "--storage-path", "~/res"], "storage_path"),
    (["doctor", "--storage-path", "~/res", "--data-dir", "~/data"], "data_dir"),
])
def test_path_options_expand_home_and_variables(argv, attr):
    args = cli.build_parser(argv).parse_args(argv)
    value = getattr(args, attr)
    for item in value if isinstance(value, list) else [value]:
        assert item.startswith(os.environ["HOME"] + "/") and "~" not in item and "$" not in item, item


def test_run_options_and_experiment_locations_expand_paths():
    from study import runner

    opts = options_lib.RunOptions(storage_path="~/res", data_dir="$HOME/data")
    assert opts.storage_uri() == str(Path.home() / "res") and opts.data_dir == str(Path.home() / "data")
    assert runner.location("~/res/exp") == Path.home() / "res" / "exp"
    assert runner.location("s3://bucket/exp") == "s3://bucket/exp"


def test_every_tuner_gets_its_own_callbacks_list():
    """Tune appends its progress reporter to the callbacks list it gets: a list shared by the baseline and the
    search Tuner of tune-mitigation handed the second Tuner the first one's finished reporter (a hang)."""
    from study import runner

    shared = [object()]
    first = runner.run_config(options_lib.RunOptions(), "a", shared)
    second = runner.run_config(options_lib.RunOptions(), "b", shared)
    assert first.callbacks[:-1] == shared and first.callbacks is not shared and second.callbacks is not first.callbacks
    # each ends with its own result.json logger
    assert isinstance(first.callbacks[-1], runner.ResultLogger) and first.callbacks[-1] is not second.callbacks[-1]
    first.callbacks.append("reporter")
    assert second.callbacks[:-1] == shared == [shared[0]]


def test_logging_settings_give_fresh_callbacks_and_round_trip_through_study_json(tmp_path):
    logging = wandb_setup.Logging.from_flags("offline", "proj", "team")
    first, second = logging.callbacks(tmp_path / "exp", "exp"), logging.callbacks(tmp_path / "exp", "exp")
    assert first is not second and first[0] is not second[0]
    assert wandb_setup.Logging.from_meta(json.loads(json.dumps({"wandb": logging.to_meta()}))) == logging
    assert wandb_setup.Logging.from_meta({}).mode == "off"


def test_resuming_an_online_study_without_a_key_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(SpuriousError, match="logs to W&B online, and no W&B API key"):
        wandb_setup.Logging("online").reactivate(tmp_path)


def test_reactivating_an_offline_study_sets_wandb_up_as_its_launch_did(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "WANDB_DISABLE_CODE", "WANDB_CONSOLE"):
        monkeypatch.delenv(var, raising=False)
    wandb_setup.Logging("offline").reactivate(tmp_path / "exp")
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str((tmp_path / "exp").resolve())


class Trial:
    trial_id = "abcde_00001"
    trainable_name = "train_classifier"
    config = {"pattern": "s3"}

    def __init__(self, folder: Path):
        self.local_path = str(folder)


def test_a_restarted_trial_keeps_one_offline_run_with_every_epoch_once(tmp_path):
    runs = tmp_path / "wandb"
    first = runs / "offline-run-20260101_000000-abcde_00001"
    other = runs / "offline-run-20260101_000000-abcde_00002"
    first.mkdir(parents=True)
    other.mkdir()
    assert wandb_runs.supersede_runs(tmp_path, "abcde_00001")
    assert not first.exists() and (runs / "superseded" / first.name).is_dir() and other.is_dir()
    assert wandb_setup.offline_runs(runs) == [other]
    assert not wandb_runs.supersede_runs(tmp_path, "abcde_00001")

    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    rows = [{"training_iteration": i, "epoch": i} for i in (1, 2, 3)] + [{"training_iteration": 3, "epoch": 3.5}]
    (trial_dir / "result.json").write_text("\n".join(map(json.dumps, rows)) + '\n{"training_iteration": 4, "ep')
    replay = wandb_runs.earlier_results(Trial(trial_dir), before_iteration=3)
    assert [r["epoch"] for r in replay] == [1, 2], "epochs the restarted trial reports again are not replayed"
    assert [r["epoch"] for r in wandb_runs.earlier_results(Trial(trial_dir), 9)] == [1, 2, 3.5]


def test_the_callback_replays_earlier_epochs_into_a_restarted_trials_new_run(tmp_path, monkeypatch):
    from study.wandb_callback import TrialRuns

    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / "result.json").write_text("\n".join(json.dumps({"training_iteration": i, "epoch": i})
                                                     for i in (1, 2, 3)))
    (tmp_path / "exp" / "wandb" / "offline-run-20260101_000000-abcde_00001").mkdir(parents=True)
    (callback,) = wandb_setup.callbacks("offline", None, None, tmp_path / "exp", "exp")
    jobs = []  # what the callback hands its W&B thread
    monkeypatch.setattr(TrialRuns, "_submit", lambda self, job, *args: jobs.append((job.__name__, args)))
    trial = Trial(trial_dir)
    callback.log_trial_start(trial)
    callback.log_trial_result(3, trial, {"training_iteration": 3, "epoch": 3})
    callback.log_trial_result(4, trial, {"training_iteration": 4, "epoch": 4})
    assert jobs[0][0] == "_start" and jobs[0][1][0] == "abcde_00001"
    assert [args[1]["epoch"] for name, args in jobs if name == "_write"] == [1, 2, 3, 4]


@pytest.fixture
def nodes(monkeypatch):
    """Fake alive nodes and autoscaler node types for cluster.plan_resources."""
    state = {"nodes": [{"cpus": 0, "gpus": 0}], "types": None}
    monkeypatch.setattr(cluster, "alive_nodes", lambda: state["nodes"])
    monkeypatch.setattr(cluster, "node_types", lambda: state["types"])
    return state


def test_embedded_ray_refuses_what_this_machine_lacks(nodes):
    nodes["nodes"] = [{"cpus": 2, "gpus": 0}]
    with pytest.raises(SpuriousError, match="--gpus-per-trial 0.5 asked for GPUs but the cluster has none; use 0"):
        cluster.plan_resources(1, 0.5, None)
    with pytest.raises(SpuriousError, match="--cpus-per-trial 4 is more than any node's CPUs"):
        cluster.plan_resources(4, 0, None)
    assert cluster.plan_resources(1, None, None) == {"cpu": 1, "gpu": 0.0}


def test_an_autoscaling_cluster_waits_for_workers_and_refuses_only_the_impossible(nodes):
    said = []
    # cluster.yaml: a 0-CPU head, no worker yet, node types unknown → wait, one line
    assert cluster.plan_resources(1, 0.5, "auto", say=said.append) == {"cpu": 1, "gpu": 0.5}
    assert cluster.plan_resources(1, 0, "auto", say=said.append) == {"cpu": 1, "gpu": 0}
    assert len(said) == 2 and all(s.startswith("trials wait for workers") for s in said)
    with pytest.raises(SpuriousError, match="static-cluster"):
        cluster.plan_resources(1, 0.5, "auto", static=True)
    nodes["types"] = [{"name": "head", "resources": {"CPU": 0}, "max_count": 1},
                      {"name": "gpu_worker", "resources": {"CPU": 8, "GPU": 1}, "max_count": -1}]
    assert cluster.plan_resources(1, None, "auto", say=said.append)["gpu"] == 0.25, "a GPU node type: 1/4 GPU"
    with pytest.raises(SpuriousError, match="no node type .* fits a trial of 1 CPU and 2 GPU"):
        cluster.plan_resources(1, 2, "auto")
    nodes["types"][1]["max_count"] = 0
    with pytest.raises(SpuriousError, match="no node type"):
        cluster.plan_resources(1, 0.5, "auto")


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["show", "demo"]])
def test_quick_commands_import_neither_torch_nor_ray(argv):
    """`study --help`, `study list` and `study show` answer in well under a second (timed by `study bench`,
    not here): they must not import the heavy libraries."""
    code = ("import sys; from study import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60,
                          cwd=REPO, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_every_command_has_arguments_and_full_help():
    parser = cli.build_parser(full=True)
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command.name, "--help"])
        assert done.value.code == 0


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_tilde_in_storage_path_lands_in_home(tmp_path):
    """`--storage-path=~/res`: the shell leaves this `~` alone; the study must still write to $HOME/res."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "study.cli", "run", "demo", "--smoke", "--storage-path=~/res",
                           "--name", "exp", "--yes"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (home / "res" / "exp" / "study.json").exists() and not (work / "~").exists()
    assert f"experiment: {home / 'res' / 'exp'}" in done.stdout
