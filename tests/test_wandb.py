"""W&B: the mode, the per-trial runs the driver writes (flat config, tags, every epoch, a restarted trial
replayed), offline runs that never prompt (read back with wandb's own record schema), and an API key that is
never written anywhere."""
import json
import os
import shutil
from pathlib import Path

import pytest

from analysis.frames import SUMMARY_COLUMNS
from spurious.errors import SpuriousError
from study import wandb_runs, wandb_setup
from tests.conftest import requires_fashion
from tests.wandb_records import read_run, run_offline_smoke

GOLDEN = Path(__file__).parent / "golden" / "demo-smoke"
FAKE_KEY = "f4ke" * 10  # 40 characters, like a real key
CHANGED_BY_CONFIGURE = ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "WANDB_DISABLE_CODE", "WANDB_CONSOLE")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No API key, no netrc, an unreachable W&B host; every W&B variable restored afterwards."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", *CHANGED_BY_CONFIGURE):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    return home


def test_auto_mode_is_online_only_with_a_configured_key(no_credentials, monkeypatch):
    assert wandb_setup.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_setup.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_setup.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_setup.resolve_mode("auto") == "off"


def test_a_netrc_entry_for_the_wandb_host_counts_as_a_key(no_credentials, monkeypatch):
    netrc = no_credentials / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    assert wandb_setup.resolve_mode("auto") == "offline"  # WANDB_BASE_URL points elsewhere
    monkeypatch.delenv("WANDB_BASE_URL")
    assert wandb_setup.api_key_configured() and wandb_setup.resolve_mode("auto") == "online"


def test_online_without_a_key_is_an_error_not_a_prompt(no_credentials):
    with pytest.raises(SpuriousError, match="needs a W&B API key"):
        wandb_setup.resolve_mode("online")
    with pytest.raises(SpuriousError, match="not one of"):
        wandb_setup.resolve_mode("sometimes")
    assert wandb_setup.resolve_mode("off") == "off" and wandb_setup.callbacks("off", None, None, "x", "x") == []


def test_flat_config_fills_defaults_and_flattens_variant_dicts():
    nested = {"optim": {"optimizer": "adam", "lr": 1e-3}, "mitigation": {"l2": 1e-3, "noise_sigma": 0.0},
              "pattern": "s3", "n_spurious": 10}
    flat = wandb_runs.flat_config(nested, "train_classifier")
    assert {k: flat[k] for k in ("optimizer", "lr", "l2", "noise_sigma", "pattern", "n_spurious")} == {
        "optimizer": "adam", "lr": 1e-3, "l2": 1e-3, "noise_sigma": 0.0, "pattern": "s3", "n_spurious": 10}
    assert flat["dataset"] == "fashion" and flat["trainable"] == "train_classifier"
    assert not any(isinstance(v, dict) for v in flat.values())
    assert wandb_runs.run_tags(flat) == ["dataset:fashion", "pattern:s3", "trainable:train_classifier"]
    assert wandb_runs.flat_config({"source": {"trial": "x"}, "k": 1}) == {"trial": "x", "k": 1}  # other kinds
    clash = wandb_runs.flat_config({"a": {"lr": 0.1}, "b": {"lr": 0.2}})
    assert clash == {"a.lr": 0.1, "b.lr": 0.2}


def test_trial_runs_is_a_tune_logger_callback_that_pickles_without_its_thread(no_credentials, tmp_path):
    from ray import cloudpickle
    from ray.tune.logger import LoggerCallback

    cls = wandb_setup.callback_class()
    # Tune's LoggerCallback turns on_trial_start/result/complete/error into these hooks
    assert issubclass(cls, LoggerCallback) and {"log_trial_start", "log_trial_result", "log_trial_end"} <= set(vars(cls))
    (callback,) = wandb_setup.callbacks("offline", None, None, tmp_path / "exp", "exp")
    callback._submit(lambda: None)  # its worker thread is running now
    restored = cloudpickle.loads(cloudpickle.dumps(callback))  # as tuner.pkl keeps it
    assert restored.init == callback.init and restored.excludes == callback.excludes and restored._worker is None
    callback.on_experiment_end([])


def test_a_result_splits_into_history_numbers_and_tunes_bookkeeping_for_the_config():
    from study.wandb_callback import split_result

    result = {"epoch": 2, "spurious_score": 0.5, "pattern": "s3", "done": False, "should_checkpoint": True,
              "config": {"lr": 0.1}, "trial_id": "abcde_00001", "date": "2026-11-30", "hostname": "vm",
              "nested": {"a": 1, "text": "x"}, "indicators": "AAAA", "flag": True}
    row, config = split_result(result, excludes=["pattern", "indicators"])
    assert row == {"epoch": 2, "spurious_score": 0.5, "nested/a": 1, "flag": True}
    assert config == {"trial_id": "abcde_00001", "date": "2026-11-30", "hostname": "vm"}
    # a post-hoc trial reports its source model's config: those keys go to its run's config instead
    row, config = split_result(result, excludes=["pattern", "indicators"], to_config=["pattern"])
    assert "pattern" not in row and config["pattern"] == "s3"


class FakeTrial:
    trainable_name = "train_classifier"
    experiment_dir_name = "exp"
    config = {"optim": {"optimizer": "sgd", "lr": 0.01}, "pattern": "r3", "n_spurious": 3}

    def __init__(self, folder: Path, number: int = 1):
        self.trial_id = f"abcde_{number:05d}"
        self.local_path = str(folder / f"trial_{number}")
        Path(self.local_path).mkdir(parents=True, exist_ok=True)

    def __str__(self):
        return f"train_classifier_{self.trial_id}"


def report(trial: FakeTrial, epoch: int) -> dict:
    """Return a trial's result as Tune hands it to callbacks (metrics, its config keys, Tune's bookkeeping)."""
    return {"epoch": epoch, "spurious_score": epoch / 10, "pattern": "corner_square_5", "lr": 0.01,
            "training_iteration": epoch, "trial_id": trial.trial_id, "pid": 4242, "done": False,
            "config": trial.config}


def test_each_trial_is_one_offline_run_with_flat_config_tags_group_and_every_epoch(no_credentials, tmp_path):
    exp = tmp_path / "exp"
    (callback,) = wandb_setup.callbacks("offline", None, "team", exp, "exp")
    assert os.environ["WANDB_MODE"] == "offline"
    trials = [FakeTrial(exp, 1), FakeTrial(exp, 2)]
    init = callback.init_kwargs(trials[0])
    assert (init["group"], init["project"], init["entity"], init["id"]) == ("exp", "rare-spurious-study", "team",
                                                                            "abcde_00001")
    assert init["mode"] == "offline" and init["dir"] == str(exp.resolve()) and init["reinit"] == "create_new"
    assert init["settings"]["silent"] and not init["settings"]["save_code"] and init["settings"]["x_disable_stats"]
    callback.setup()
    for trial in trials:
        callback.on_trial_start(0, trials, trial)
    for epoch in (1, 2):
        for trial in trials:
            callback.on_trial_result(epoch, trials, trial, report(trial, epoch))
    callback.on_trial_complete(2, trials, trials[0])
    callback.on_trial_error(2, trials, trials[1])
    callback.on_experiment_end(trials)
    runs = wandb_setup.offline_runs(wandb_setup.runs_dir(exp))
    assert sorted(run.name.split("-")[-1] for run in runs) == ["abcde_00001", "abcde_00002"]
    for run in runs:
        trial_id = run.name.split("-")[-1]
        logged = read_run(run)
        assert logged["group"] == "exp" and logged["name"] == f"train_classifier_{trial_id}"
        assert logged["tags"] == ["dataset:fashion", "pattern:r3", "trainable:train_classifier"]
        config = logged["config"]
        assert config["optimizer"] == "sgd" and config["l2"] == 0.0 and "optim" not in config
        assert config["trial_id"] == trial_id and config["pid"] == 4242
        history = [row for row in logged["history"] if "epoch" in row]
        assert [(row["epoch"], row["spurious_score"]) for row in history] == [(1, 0.1), (2, 0.2)]
        assert not {"pattern", "lr", "config", "done", "trial_id"} & set(history[0])  # in the config instead


def test_a_restarted_trial_replaces_its_offline_run_and_replays_its_earlier_epochs(no_credentials, tmp_path):
    from ray import cloudpickle

    exp = tmp_path / "exp"
    (callback,) = wandb_setup.callbacks("offline", None, None, exp, "exp")
    pickled = cloudpickle.dumps(callback)  # tuner.pkl: what `study resume` restores
    trial = FakeTrial(exp)
    for epoch in (1, 2):
        callback.on_trial_result(epoch, [trial], trial, report(trial, epoch))
    callback.on_experiment_end([trial])  # the driver stopped with the trial unfinished
    (Path(trial.local_path) / "result.json").write_text("".join(json.dumps(report(trial, e)) + "\n" for e in (1, 2)))

    restored = cloudpickle.loads(pickled)
    restored.on_trial_start(0, [trial], trial)
    restored.on_trial_result(3, [trial], trial, report(trial, 3))
    restored.on_trial_complete(3, [trial], trial)
    restored.on_experiment_end([trial])
    (run,) = wandb_setup.offline_runs(wandb_setup.runs_dir(exp))
    assert [row["epoch"] for row in read_run(run)["history"] if "epoch" in row] == [1, 2, 3]
    (old,) = wandb_setup.offline_runs(wandb_setup.runs_dir(exp) / wandb_runs.SUPERSEDED_SUBDIR)
    assert [row["epoch"] for row in read_run(old)["history"] if "epoch" in row] == [1, 2]


def test_wandb_trouble_is_a_warning_and_never_stops_the_study(no_credentials, tmp_path, monkeypatch, caplog):
    from study.wandb_callback import TrialRuns

    def broken(self, trial_id, kwargs):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(TrialRuns, "_start", broken)
    (callback,) = wandb_setup.callbacks("offline", None, None, tmp_path / "exp", "exp")
    trial = FakeTrial(tmp_path / "exp")
    callback.on_trial_result(1, [trial], trial, report(trial, 1))
    callback.on_trial_complete(1, [trial], trial)
    callback.on_experiment_end([trial])
    assert "W&B: broken failed: no W&B today" in caplog.text
    assert wandb_setup.offline_runs(wandb_setup.runs_dir(tmp_path / "exp")) == []


def test_sync_hint_names_the_offline_run_folders(tmp_path):
    exp = tmp_path / "exp"
    assert wandb_setup.sync_hint("offline", exp) is None
    (wandb_setup.runs_dir(exp) / "offline-run-20260101_000000-abc").mkdir(parents=True)
    hint = wandb_setup.sync_hint("offline", exp)
    assert hint.endswith(f"wandb sync {exp.resolve()}/wandb/offline-run-*")
    assert wandb_setup.runs_dir("s3://bucket/studies/exp") == Path("wandb").resolve() / "exp" / "wandb"


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_api_key_never_reaches_callbacks_metadata_report_or_wandb_files(no_credentials, tmp_path, monkeypatch):
    from ray import cloudpickle

    from study import cli, runner

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    exp = tmp_path / "demo-smoke"
    shutil.copytree(GOLDEN, exp)
    callbacks = wandb_setup.callbacks("online", None, None, exp, exp.name)
    assert FAKE_KEY.encode() not in cloudpickle.dumps(callbacks)  # Tune pickles callbacks into tuner.pkl
    from study import catalog
    logging = wandb_setup.Logging.from_flags("online", None, None)
    runner.write_meta(tmp_path / "meta", runner.session_meta("train", catalog.get("demo").name, runner.RunOptions(),
                                                             logging, {"cpu": 1}, ["fashion"], 16))
    assert cli.main(["report", str(exp), "--wandb", "offline"]) == 0
    (report_run,) = wandb_setup.offline_runs(wandb_setup.runs_dir(exp))
    logged = read_run(report_run)
    assert logged["name"] == "demo-smoke-report" and logged["group"] == "demo-smoke"
    keys = {k for row in logged["history"] for k in row}
    assert {"summary/spurious_score", "summary/test_acc", "trials", "figures/spurious_score_vs_n"} <= keys
    table = logged["history"][0]["summary/spurious_score"]
    assert table["_type"] == "table-file" and table["nrows"] == 4
    content = json.loads((report_run / "files" / table["path"]).read_text())
    assert content["columns"] == ["pattern", "n_spurious", *SUMMARY_COLUMNS]
    assert logged["history"][0]["figures/spurious_score_vs_n"]["_type"] == "image-file"
    assert files_containing(tmp_path, FAKE_KEY.encode()) == []


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_offline_study_without_key_or_network_never_blocks_and_logs_config_and_metrics(tmp_path):
    from analysis import frames

    done = run_offline_smoke(tmp_path, "wb")  # a login prompt would fail on the closed stdin or hit the timeout
    exp = tmp_path / "wb"
    runs = wandb_setup.offline_runs(wandb_setup.runs_dir(exp))
    assert len(runs) == 2 and all(exp in run.parents for run in runs)
    assert f"wandb sync {exp}/wandb/offline-run-*" in done.stdout
    scores = frames.load(exp).set_index("trial_id")["spurious_score"]
    for run in runs:
        logged = read_run(run)
        trial_id = run.name.split("-")[-1]
        # runs carry the canonical config the trial trained (S3 is `corner_square_5`, protocol §2.1)
        assert logged["group"] == "wb" and "pattern:corner_square_5" in logged["tags"]
        assert "dataset:fashion" in logged["tags"]
        config = logged["config"]
        assert config["pattern"] == "corner_square_5" and config["n_spurious"] in (0, 100) and config["l2"] == 0.0
        assert config["noise_sigma"] == 0.0 and config["trainable"] == "train_classifier"
        history = [row for row in logged["history"] if "spurious_score" in row]
        assert history[-1]["spurious_score"] == pytest.approx(scores[trial_id])
        assert history[-1]["epoch"] == 1
