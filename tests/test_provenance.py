"""Provenance (study/provenance.py) in study.json, W&B run configs and `study report`; the W&B Report of
`study report --wandb-report` (study/wandb_report.py), built offline and checked against what a real
offline study logs."""
import hashlib
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from analysis import frames
from spurious import datasets
from study import cli, provenance, runner, wandb_setup
from tests.conftest import requires_fashion
from tests.wandb_records import read_run, run_offline_smoke

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "demo-smoke"
FAKE_KEY = "f4ke" * 10
RECORD = {"time": "2026-11-30T12:00:00+0000", "version": "0.1.0", "git_commit": "abc123def4567890" * 2 + "abcd",
          "git_dirty": True, "python": "3.11.7", "packages": {"torch": "2.14.1", "ray": "2.60.0"},
          "cpu": "Test CPU", "gpu": "Test GPU", "cuda": "13.0", "torch_threads": 2, "trial_threads": 1,
          "command": "study run demo --smoke", "cwd": "/somewhere",
          "datasets": {"fashion": {"dir": "/data",
                                   "sha256": {"train-images-idx3-ubyte.gz": "0123456789ab" + "f" * 52}}}}
requires_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


@pytest.fixture
def no_key(tmp_path, monkeypatch):
    """No W&B API key, no netrc, an unreachable W&B host; W&B variables restored afterwards."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_MODE", "WANDB_DIR", "WANDB_SILENT",
                "WANDB_DISABLE_CODE", "WANDB_CONSOLE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")


def golden_copy(tmp_path: Path, **meta) -> Path:
    """Copy the committed demo-smoke experiment, its study.json updated with `meta`."""
    exp = tmp_path / "demo-smoke"
    shutil.copytree(GOLDEN, exp)
    path = exp / "study.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **meta}))
    return exp


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


# ---------------------------------------------------------------- collecting


@requires_git
def test_git_state_is_the_commit_and_whether_anything_changed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "one")
    assert provenance.git_state(repo) == (git(repo, "rev-parse", "HEAD"), False)
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.git_state(repo) == (git(repo, "rev-parse", "HEAD"), True)
    (repo / "sub").mkdir()  # a package installed below some other checkout is not that checkout
    assert provenance.git_state(repo / "sub") == (None, None)
    assert provenance.git_state(tmp_path) == (None, None)


def test_collect_never_fails_without_git_or_local_data(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git
    monkeypatch.delenv("SPURIOUS_DATA", raising=False)
    monkeypatch.setenv("SPURIOUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "SYSTEM_DATA_ROOT", tmp_path / "system")
    record = provenance.collect(["fashion"], None, {"cpu": 2.0}, argv=["study", "run", "my study.yaml"])
    assert record["git_commit"] is None and record["git_dirty"] is None
    assert record["datasets"] == {"fashion": None} and record["trial_threads"] == 2
    assert record["command"] == "study run 'my study.yaml'" and record["version"] == "0.1.0"
    assert provenance.command_line(["/x/study/cli.py", "run", "demo"]) == "python -m study.cli run demo"
    assert set(record["packages"]) == {"torch", "ray", "optuna", "numpy", "wandb"} and record["python"]
    assert record["cpu"] and record["torch_threads"] >= 1 and set(record) >= {"gpu", "cuda", "time", "cwd"}


def test_gpu_and_cuda_are_recorded_when_torch_sees_a_gpu(monkeypatch):
    import torch

    assert provenance.gpu() == {"gpu": None, "cuda": None} or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert provenance.gpu() == {"gpu": "Fake GPU (×2)", "cuda": "13.0"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: 1 / 0)  # a broken driver
    assert provenance.gpu() == {"gpu": None, "cuda": None}


def test_cpu_name_reads_proc_cpuinfo(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Test CPU @ 2.0GHz\n")
    assert provenance.cpu_name(tmp_path / "cpuinfo") == "Test CPU @ 2.0GHz"
    assert provenance.cpu_name(tmp_path / "missing")  # falls back to what `platform` knows


def test_large_files_keep_their_checksum_across_processes_until_they_change(tmp_path, monkeypatch):
    monkeypatch.setenv("SPURIOUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(provenance, "LARGE_FILE", 10)
    data = tmp_path / "big.bin"
    data.write_bytes(b"0123456789" * 5)
    assert provenance.sha256(data) == hashlib.sha256(data.read_bytes()).hexdigest()
    cache_file = tmp_path / "cache" / provenance.SHA_CACHE
    cache = json.loads(cache_file.read_text())
    cache[str(data.resolve())]["sha256"] = "from-the-cache"
    cache_file.write_text(json.dumps(cache))
    provenance._sha256.cache_clear()  # as a new process would
    assert provenance.sha256(data) == "from-the-cache"
    data.write_bytes(b"changed" * 5)
    assert provenance.sha256(data) == hashlib.sha256(data.read_bytes()).hexdigest()


# ---------------------------------------------------------------- recording


def test_resume_appends_its_provenance_and_keeps_the_launch(tmp_path):
    runner.write_meta(tmp_path, {"study": "demo", "provenance": RECORD})
    for command in ("study resume a", "study resume b"):
        runner.record_resume(tmp_path, runner.read_meta(tmp_path), {**RECORD, "command": command})
    meta = runner.read_meta(tmp_path)
    assert meta["provenance"] == RECORD
    assert [r["command"] for r in meta["resumed"]] == ["study resume a", "study resume b"]


def test_wandb_runs_carry_the_provenance_and_study_json_keeps_it_apart(no_key, tmp_path):
    logging = replace(wandb_setup.Logging("offline"), provenance=RECORD)
    assert logging.to_meta() == {"mode": "offline", "project": "rare-spurious-study", "entity": None}
    (callback,) = logging.callbacks(tmp_path / "exp", "exp")

    class Trial:
        trial_id, trainable_name, experiment_dir_name = "abcde_00001", "train_classifier", "exp"
        config = {"pattern": "s3", "n_spurious": 3}

    config = callback.init_kwargs(Trial())["config"]
    assert config["provenance"] == RECORD and config["n_spurious"] == 3


# ---------------------------------------------------------------- showing


def test_report_shows_each_experiments_provenance(tmp_path, capsys):
    exp = golden_copy(tmp_path, provenance=RECORD, resumed=[{**RECORD, "command": "study resume x"}])
    assert cli.main(["report", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "provenance of demo-smoke:" in out and "version 0.1.0, commit abc123def456 (dirty)" in out
    assert "Python 3.11.7, torch 2.14.1, ray 2.60.0" in out and "Test CPU; GPU Test GPU (CUDA 13.0)" in out
    assert "torch 2 on the driver, 1 per trial" in out and "command   study run demo --smoke" in out
    assert "fashion: train-images-idx3-ubyte.gz 0123456789ab" in out and "study resume x" in out
    summary = (exp / "report" / "summary.md").read_text()
    assert "## Provenance" in summary and "commit abc123def456 (dirty)" in summary
    assert "<h2>Provenance</h2>" in (exp / "report" / "index.html").read_text()


def test_report_of_an_experiment_without_provenance_says_so(tmp_path, capsys):
    assert cli.main(["report", str(golden_copy(tmp_path))]) == 0
    assert "none recorded (study.json predates provenance)" in capsys.readouterr().out


# ---------------------------------------------------------------- the W&B Report


@pytest.mark.parametrize("logged, key, message", [
    ("offline", None, "--wandb-report needs W&B online (an API key"),
    ("offline", None, "this experiment logged offline, sync it first with `wandb sync "),
    ("online", None, "--wandb-report needs W&B online (an API key"),
    ("off", FAKE_KEY, "logged none (it ran with --wandb off)"),
    ("online", FAKE_KEY + ":offline", "(WANDB_MODE is set to offline or disabled in this shell; unset it)"),
])
def test_wandb_report_refusals_are_one_line_and_write_nothing(no_key, tmp_path, capsys, monkeypatch, logged, key,
                                                               message):
    pytest.importorskip("wandb_workspaces")
    if key:
        key, _, mode = key.partition(":")
        monkeypatch.setenv("WANDB_API_KEY", key)
        if mode:
            monkeypatch.setenv("WANDB_MODE", mode)
    exp = golden_copy(tmp_path, wandb={"mode": logged, "project": "p", "entity": "team"})
    assert cli.main(["report", str(exp), "--wandb-report"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (exp / "report").exists()


def test_wandb_report_needs_the_extra_and_one_experiment(no_key, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # as if not installed
    exp = golden_copy(tmp_path, wandb={"mode": "online", "project": "p", "entity": "team"})
    assert cli.main(["report", str(exp), "--wandb-report"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'rare-spurious-study[wandb-report]'" in err and err.count("\n") == 1
    assert cli.main(["report", str(exp), str(exp), "--wandb-report"]) == 2
    assert "takes one experiment directory, got 2" in capsys.readouterr().err
    assert not (exp / "report").exists()


def test_wandb_report_is_built_from_the_experiment_and_saved(no_key, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb_workspaces")
    from study import wandb_report

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    saved = []
    monkeypatch.setattr(wandb_report, "save", lambda report: saved.append(report) or "https://wandb.example/r")
    exp = golden_copy(tmp_path, wandb={"mode": "online", "project": "p", "entity": "team"}, provenance=RECORD)
    assert cli.main(["report", str(exp), "--wandb-report"]) == 0
    assert "W&B report: https://wandb.example/r" in capsys.readouterr().out
    (report,) = saved
    assert (report.entity, report.project, report.title) == ("team", "p", "demo-smoke")
    tables = report.blocks[-1].text
    assert "| S3 | 0.000 ± 0.000 |" in tables and "commit abc123def456 (dirty)" in tables


def grids(report) -> list:
    import wandb_workspaces.reports.v2 as wr

    return [b for b in report.blocks if isinstance(b, wr.PanelGrid)]


def filters(runset) -> dict:
    """Return a runset's filters as W&B's backend gets them: {(section, key): value}."""
    from wandb_workspaces import expr

    leaves = [f.to_model() for f in expr.string_to_filterexpr_list(runset.filters)]
    return {(leaf.key.section, leaf.key.name): leaf.value for leaf in leaves}


def test_wandb_report_structure_of_a_training_study():
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    from study import wandb_report

    meta = {**frames.study_meta(GOLDEN), "wandb": {"mode": "online", "project": "p", "entity": None}}
    report = wandb_report.build(meta, frames.load(GOLDEN), "demo-smoke", "team", "TABLES")
    headings = [b.text for b in report.blocks if isinstance(b, wr.H2)]
    assert headings == ["Pattern S3 (corner_square_5)", "Pattern R3 (uniform_noise_1.0)", "Summary tables"]
    assert report.blocks[-1].text == "TABLES" and (report.entity, report.project) == ("team", "p")
    for grid, names in zip(grids(report), (["corner_square_5", "s3", "v8"], ["uniform_noise_1.0", "r3", "v20"])):
        (runset,) = grid.runsets
        assert (runset.entity, runset.project, runset.groupby) == ("team", "p", ["config.n_spurious"])
        assert filters(runset) == {("run", "group"): "demo-smoke", ("run", "jobType"): "train",
                                   ("config", "pattern"): names}
        bars = [p for p in grid.panels if isinstance(p, wr.BarPlot)]
        lines = [p for p in grid.panels if isinstance(p, wr.LinePlot)]
        assert [p.metrics for p in bars] == [["spurious_score"], ["test_acc"]]
        assert [(p.x, p.y) for p in lines] == [("epoch", ["spurious_score"]), ("epoch", ["test_acc"])]
        for panel in grid.panels:  # mean ± s.e. over the seeds of each group
            config = panel._to_model().config
            assert (config.group_agg, config.group_area, config.aggregate) == ("mean", "stderr", True)


def test_wandb_report_of_a_detection_study_has_bars_per_method_and_n():
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    import pandas as pd

    from study import wandb_report

    meta = {"study": "detect", "kind": "detect", "wandb": {"mode": "online", "project": "p", "entity": "t"}}
    frame = pd.DataFrame({"kind": ["detect"] * 3, "method": ["loss", "tracin", "loss"], "n_spurious": [3, 3, 0],
                          "pattern": ["r3", "r3", "s3"], "trial_id": ["a", "b", "c"]})
    report = wandb_report.build(meta, frame, "src-detect", "t", "TABLES")
    headings = [b.text for b in report.blocks if isinstance(b, wr.H2)]
    assert headings == ["Detection of pattern R3 (uniform_noise_1.0)", "Summary tables"]  # no grid for n = 0 only
    (grid,) = grids(report)
    (runset,) = grid.runsets
    assert runset.groupby == ["config.method", "config.direction", "config.n_spurious"]
    assert filters(runset) == {("run", "group"): "src-detect", ("run", "jobType"): "train",
                               ("config", "pattern"): ["uniform_noise_1.0", "r3", "v20"]}
    assert [p.metrics for p in grid.panels] == [["auroc"], ["average_precision"]]


def test_wandb_report_of_a_tuning_study_has_a_pareto_panel():
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    import pandas as pd

    from study import wandb_report
    from trainables.tune_mitigation import SELECTION_ACC, SELECTION_SCORE

    meta = {"study": "tune", "kind": "tune-mitigation", "wandb": {"mode": "online", "project": "p", "entity": "t"}}
    frame = pd.DataFrame({"kind": ["tune-mitigation"] * 2, "phase": ["search"] * 2, "pattern": ["s3"] * 2,
                          "l2": [0.0, 1e-3], "trial_id": ["a", "b"]})
    report = wandb_report.build(meta, frame, "tune-1", "t", "TABLES")
    (grid,) = grids(report)
    (scatter,) = grid.panels
    assert isinstance(scatter, wr.ScatterPlot)
    assert (scatter.x, scatter.y) == (wr.SummaryMetric(SELECTION_SCORE), wr.SummaryMetric(SELECTION_ACC))
    assert filters(grid.runsets[0]) == {("run", "group"): "tune-1", ("run", "jobType"): "train"}


# ---------------------------------------------------------------- a real study


@pytest.fixture(scope="module")
def offline_study(tmp_path_factory):
    """`study run demo --smoke --wandb offline` as a user runs it from this checkout: (experiment, stdout)."""
    root = tmp_path_factory.mktemp("prov")
    run_offline_smoke(root, "prov")
    return root / "prov"


def git_here() -> tuple[str | None, bool | None]:
    """Return (HEAD, dirty) of this checkout as git itself says, (None, None) outside one."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None, None
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return head.stdout.strip(), bool(status.stdout.strip())


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_a_real_study_records_provenance_in_study_json_and_every_wandb_run(offline_study):
    record = json.loads((offline_study / "study.json").read_text())["provenance"]
    assert (record["git_commit"], record["git_dirty"]) == git_here()
    assert record["version"] == provenance.version() and record["python"] == platform.python_version()
    assert record["command"].endswith("run demo --smoke --wandb offline --storage-path "
                                      f"{offline_study.parent} --name prov -v 0")
    assert record["trial_threads"] == 1 and record["packages"]["torch"] and record["cpu"]
    fashion = record["datasets"]["fashion"]
    files = datasets.source_files("fashion")
    assert fashion["dir"] == str(files[0].parent) and list(fashion["sha256"]) == [p.name for p in files]
    for path in files:
        assert fashion["sha256"][path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    runs = [read_run(r) for r in wandb_setup.offline_runs(wandb_setup.runs_dir(offline_study))]
    trials = [run for run in runs if run["job_type"] == "train"]
    assert len(trials) == 2 and all(run["config"]["provenance"] == record for run in trials)


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_report_of_a_real_study_prints_its_provenance_and_the_report_run_holds_it(offline_study, no_key, capsys):
    record = json.loads((offline_study / "study.json").read_text())["provenance"]
    assert cli.main(["report", str(offline_study), "--wandb", "offline", "--out", str(offline_study / "r")]) == 0
    out = capsys.readouterr().out
    commit = record["git_commit"]
    assert (f"commit {commit[:12]}" if commit else "not a git checkout") in out
    digest = record["datasets"]["fashion"]["sha256"]["train-images-idx3-ubyte.gz"]
    assert f"train-images-idx3-ubyte.gz {digest[:12]}" in out
    (report_run,) = [r for r in wandb_setup.offline_runs(wandb_setup.runs_dir(offline_study))
                     if read_run(r)["job_type"] == "report"]
    config = read_run(report_run)["config"]
    assert config["experiment_provenance"] == {"prov": record}
    assert config["provenance"]["git_commit"] == record["git_commit"] and config["provenance"]["datasets"] == {}


@pytest.mark.slow
@pytest.mark.ray
@requires_fashion
def test_wandb_report_keys_match_what_the_study_logged(offline_study):
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    from study import wandb_report

    meta = json.loads((offline_study / "study.json").read_text())
    report = wandb_report.build(meta, frames.load(offline_study), offline_study.name, "team")
    runs = [read_run(r) for r in wandb_setup.offline_runs(wandb_setup.runs_dir(offline_study))]
    trials = [r for r in runs if r["job_type"] == "train"]
    assert len(trials) == 2 and report.project == meta["wandb"]["project"] == wandb_setup.DEFAULT_PROJECT
    history = {key for run in trials for row in run["history"] for key in row}
    (grid,) = grids(report)
    (runset,) = grid.runsets
    where = filters(runset)
    for run in trials:  # every trial run passes the runset's filter
        assert where[("run", "group")] == run["group"] and where[("run", "jobType")] == run["job_type"]
        assert run["config"]["pattern"] in where[("config", "pattern")]
        assert {k.removeprefix("config.") for k in runset.groupby} <= set(run["config"])
    for panel in grid.panels:
        keys = panel.metrics if isinstance(panel, wr.BarPlot) else [panel.x, *panel.y]
        assert set(keys) <= history, keys
