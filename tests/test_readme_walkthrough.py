"""The README, walked through as a new user would: every `study` command of its `bash` blocks, in the README's
order, exactly as written except for size-reducing flags (`--smoke`, a small `--set epochs=…`, fewer tuning
trials), with default verbosity and default W&B mode, in a shell with no W&B variables and a HOME without
keys (so `--wandb auto` resolves to offline by itself).

Each step runs in a fresh process, as separate shell commands would: `study resume` runs in a shell that
never had WANDB_MODE set. Results go to ./results under a temporary working directory, as the README's
relative paths say.

Kept in step with the README: `test_every_readme_command_is_walked` fails when the README gains a `study`
command that this walk does not run. The block under "Running on a cluster" needs a cloud account and is
not walked; tests/test_cluster.py validates cluster.yaml with Ray's own checks and runs `study doctor`,
`study run` and `study delete` against a local multi-node cluster.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis import load
from spurious import checkpoint
from study import wandb_setup
from tests.conftest import requires_fashion
from tests.wandb_records import read_run

pytestmark = [pytest.mark.slow, pytest.mark.ray, requires_fashion]
REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NOT_WALKED_SECTIONS = ("Running on a cluster",)

# README command -> the flags the walk adds (size only: smoke variants, fewer epochs or tuning trials).
WALK: dict[str, list[str]] = {
    "study list": [],
    "study show demo --smoke": [],
    "study run demo --smoke": [],
    "study run demo --name demo": ["--smoke", "--set", "epochs=6"],
    "study report results/demo": [],
    "study resume results/demo": [],
    "study run my_study.yaml --max-concurrent 2": ["--smoke"],
    "study doctor": [],
    "study bench": ["--only", "cli", "--repeats", "1"],
    "study show paper-fashion-short": [],
    "study run paper-fashion-short --bundle 8 --yes --name paper-fashion-short": ["--smoke"],
    "study report results/paper-fashion-short": [],
    "study run two-class --name two-class": ["--smoke"],
    "study run demo --set pattern=r3 --set n_spurious=[0,10,100] --name rare": ["--set", "epochs=1"],
    "study delete --from results/rare --method retrain": ["--smoke"],
    "study delete --from results/rare --method incremental_retraining --set lr_policy=reset": ["--smoke"],
    "study delete --from results/rare --method group_influence --filter n_spurious=10": ["--smoke"],
    "study report results/rare results/rare-delete-retrain --out reports/rare": [],
    "study run mia-train --name mia": ["--smoke"],
    "study mia --from results/mia": ["--smoke"],
    "study delete --from results/mia --method retrain": ["--smoke"],
    "study mia --from results/mia-delete-retrain --attack lira": ["--smoke"],
    "study run mia-online --bundle 8 --name online": ["--smoke"],
    "study mia --from results/online --attack lira_online --attack rmia_online": ["--smoke"],
    "study run mia-paper --bundle 8 --name mia-paper": ["--smoke"],
    "study mia --from results/mia-paper --attack shadow --attack lira": ["--smoke"],
    "study report results/mia-paper-mia-shadow-lira --out reports/mia-paper": [],
    "study run detect-demo --name detect": ["--smoke"],
    "study detect --from results/detect --method all --yes": ["--smoke"],
    "study report results/detect-detect": [],
    "study tune-mitigation --set pattern=s3 --set n_spurious=10 --trials 20 --seeds 3 --name tune-s3":
        ["--smoke", "--trials", "2", "--seeds", "2"],
    "study tune-mitigation --objective constrained --max-acc-drop 0.01 --tune-lr": ["--smoke", "--trials", "2"],
    "study resume results/tune-s3": [],
    "study tune-mitigation --study mitigation-dp --name tune-dp": ["--smoke"],
    "study run dp-compare --name dp-compare": ["--smoke"],
    "study report results/dp-compare": [],
}


def readme_commands() -> list[str]:
    """Return the `study …` lines of the README's bash blocks (comments stripped), in order."""
    commands, section, in_bash = [], "", False
    for line in README.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            in_bash = line.strip() == "```bash" and not in_bash
            continue
        text = line.split(" #", 1)[0].strip()
        if in_bash and section not in NOT_WALKED_SECTIONS and text.startswith("study "):
            commands.append(text)
    return commands


def yaml_example() -> str:
    """Return the README's YAML study file example."""
    return re.search(r"```yaml\n(.*?)```", README.read_text(), re.S).group(1)


class Shell:
    """A user's shell: a working directory, a HOME without keys, no W&B variables."""

    def __init__(self, root: Path):
        self.cwd = root / "work"
        self.cwd.mkdir(parents=True)
        home = root / "home"
        home.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
        self.env.update(HOME=str(home), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")

    def argv(self, command: str) -> list[str]:
        assert command in WALK, f"README command not in the walk: {command}"
        return [sys.executable, "-m", "study.cli", *shlex.split(command)[1:], *WALK[command]]

    def run(self, command: str, timeout: int = 600) -> subprocess.CompletedProcess:
        done = subprocess.run(self.argv(command), cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        print(f"\n$ {command}  [+ {' '.join(WALK[command])}]\n  -> {last_line(done)}")  # the transcript (pytest -s)
        return done

    def start(self, command: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen(self.argv(command), cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def shell(tmp_path_factory) -> Shell:
    return Shell(tmp_path_factory.mktemp("walk"))


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.strip().splitlines()[-1]


def reported_epochs(exp: Path) -> dict[str, list[int]]:
    out = {}
    for result in exp.glob("*/result.json"):
        out[result.parent.name] = [json.loads(ln).get("epoch") for ln in result.read_text().splitlines()
                                   if ln.strip().endswith("}")]
    return out


def kill_when(proc: subprocess.Popen, ready, settle_s: float = 2.5, timeout: float = 300) -> None:
    """SIGKILL the driver `settle_s` seconds after `ready()` holds (2.5 s: Tune saves its state every 2 s)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        assert proc.poll() is None, "the study ended before it could be interrupted"
        time.sleep(0.2)
    assert ready(), "the study did not reach the point of interruption in time"
    time.sleep(settle_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def wandb_runs(exp: Path) -> dict[str, Path]:
    """Return {run id: folder} of an experiment's offline W&B runs; a run id appearing twice fails."""
    runs = wandb_setup.offline_runs(wandb_setup.runs_dir(exp))
    ids = [run.name.rsplit("-", 1)[-1] for run in runs]
    assert len(ids) == len(set(ids)), f"a trial has two W&B runs: {sorted(ids)}"
    return dict(zip(ids, runs))


def test_every_readme_command_is_walked():
    commands = readme_commands()
    assert commands, "no study commands found in the README"
    assert set(commands) == set(WALK), (f"README commands not walked: {sorted(set(commands) - set(WALK))}; "
                                        f"walked but not in the README: {sorted(set(WALK) - set(commands))}")
    assert commands == list(WALK), "the walk must follow the README's order"


def test_list_and_show(shell):
    assert "demo" in shell.run("study list").stdout
    shown = shell.run("study show demo --smoke").stdout
    assert "2 cells, 2 trainings" in shown and "seed policy: replicate" in shown


def test_first_smoke_run_uses_offline_wandb_by_default(shell):
    done = shell.run("study run demo --smoke")
    (exp,) = (shell.cwd / "results").glob("demo-smoke-*")
    assert f"experiment: {exp}" in done.stdout and "spurious_score (mean ± s.e. over seeds)" in done.stdout
    assert len(wandb_runs(exp)) == 2 and f"wandb sync {exp}/wandb/offline-run-*" in done.stdout


def test_main_job_killed_then_resumed_in_a_fresh_shell_keeps_one_wandb_run_per_trial(shell, tmp_path):
    exp = shell.cwd / "results" / "demo"
    proc = shell.start("study run demo --name demo", tmp_path / "run.log")
    # demo checkpoints every 2 epochs: interrupt once a trial is past its epoch-2 checkpoint
    kill_when(proc, lambda: any(2 in e for e in reported_epochs(exp).values()))
    assert not all(e[-1:] == [6] for e in reported_epochs(exp).values()), "interrupted before the end"

    done = shell.run("study resume results/demo")
    assert "spurious_score (mean ± s.e. over seeds)" in done.stdout
    epochs = reported_epochs(exp)
    assert len(epochs) == 2 and all(e[-1] == 6 for e in epochs.values())
    runs = wandb_runs(exp)
    assert len(runs) == 2, "one W&B run per trial after the resume"
    for run in runs.values():
        history = [row["epoch"] for row in read_run(run)["history"] if "epoch" in row]
        assert history == [1, 2, 3, 4, 5, 6], f"{run.name}: the resumed run holds every epoch once, got {history}"
    assert f"wandb sync {exp}/wandb/offline-run-*" in done.stdout
    sync = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(exp / "wandb")],
                          cwd=shell.cwd, env=shell.env, capture_output=True, text=True, timeout=120)
    assert "Would sync 2 run(s)" in sync.stdout + sync.stderr, sync.stdout + sync.stderr
    print("resume:", last_line(done))


def test_report(shell):
    shell.run("study report results/demo")
    assert (shell.cwd / "results" / "demo" / "report" / "index.html").exists()


def test_resume_of_a_finished_study_is_a_no_op(shell):
    before = reported_epochs(shell.cwd / "results" / "demo")
    shell.run("study resume results/demo")
    assert reported_epochs(shell.cwd / "results" / "demo") == before


def test_yaml_study_file(shell):
    (shell.cwd / "my_study.yaml").write_text(yaml_example())
    done = shell.run("study run my_study.yaml --max-concurrent 2")
    # smoke n ∈ {0, 10} × the base study's 2 data seeds; a sampled l2 makes each cell its own training
    assert "study rarity-r3: 4 cells, 4 trainings in 4 trials" in done.stdout


def test_doctor_and_bench(shell):
    assert "verdict: ready to launch" in shell.run("study doctor").stdout
    bench = shell.run("study bench").stdout
    assert "CLI start-up" in bench and "study list" in bench


def test_paper_reproduction_and_two_class(shell):
    shown = shell.run("study show paper-fashion-short").stdout
    assert "147 cells, 127 trainings" in shown and "seed policy: reference" in shown
    done = shell.run("study run paper-fashion-short --bundle 8 --yes --name paper-fashion-short")
    assert "2 cells, 2 trainings in 1 trial (seed policy reference)" in done.stdout  # smoke: n ∈ {0, 100}
    report = shell.run("study report results/paper-fashion-short").stdout
    assert "Smallest significant n" in report and "Holm" in report
    assert (shell.cwd / "results" / "paper-fashion-short" / "report" / "claims.txt").exists()
    done = shell.run("study run two-class --name two-class")
    assert "4 cells, 2 trainings" in done.stdout  # smoke: n ∈ {0, 100}, each model scored for classes 0 and 1
    rows = load(shell.cwd / "results" / "two-class")
    assert sorted(rows["target"]) == [0, 0, 1, 1] and set(rows["n_planted"]) == {0, 200}
    assert rows.groupby("n_spurious")["training_id"].nunique().tolist() == [1, 1]


def test_deletion_studies(shell):
    shell.run("study run demo --set pattern=r3 --set n_spurious=[0,10,100] --name rare")
    for command in ("study delete --from results/rare --method retrain",
                    "study delete --from results/rare --method incremental_retraining --set lr_policy=reset",
                    "study delete --from results/rare --method group_influence --filter n_spurious=10"):
        done = shell.run(command)
        assert "experiment:" in done.stdout, command
    meta = json.loads((shell.cwd / "results" / "rare-delete-group_influence" / "study.json").read_text())
    assert meta["settings"]["cg_max_iter"] == 5 and meta["wandb"]["mode"] == "offline"
    shell.run("study report results/rare results/rare-delete-retrain --out reports/rare")
    report = shell.cwd / "reports" / "rare"
    assert (report / "index.html").exists() and (report / "figures" / "deletion_retrain.png").exists()
    summary = (report / "summary.md").read_text()
    assert "Deletion: original, deleted and retrained (oracle) models" in summary and "retrain" in summary
    assert re.search(r"Rows: (\d+) \(\1 terminated\)", summary), "every source and deletion trial finished"
    resumed = subprocess.run([sys.executable, "-m", "study.cli", "resume", "results/rare-delete-retrain"],
                             cwd=shell.cwd, env=shell.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=300)  # a post-hoc study resumes in a fresh shell too (not a README line)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_detection_chain(shell):
    done = shell.run("study run detect-demo --name detect")
    assert "2 cells, 2 trainings" in done.stdout
    done = shell.run("study detect --from results/detect --method all --yes")
    assert "detect: 20 trials" in done.stdout and "AUROC" in done.stdout
    exp = shell.cwd / "results" / "detect-detect"
    meta = json.loads((exp / "study.json").read_text())
    assert meta["kind"] == "detect" and meta["methods"] == ["loss", "loss_trajectory", "tracin", "spectral",
                                                            "activation_clustering", "influence"]
    assert meta["wandb"]["mode"] == "offline" and len(wandb_runs(exp)) == 20
    df = load(exp)
    assert (df["status"] == "TERMINATED").all() and df[df["n_spurious"] > 0]["auroc"].between(0, 1).all()
    shell.run("study report results/detect-detect")
    report = exp / "report"  # the default --out
    assert (report / "figures" / "detection_auroc.png").exists(), sorted(p.name for p in report.iterdir())
    assert "Detection" in (report / "summary.md").read_text()


def test_membership_inference(shell):
    shell.run("study run mia-train --name mia")
    done = shell.run("study mia --from results/mia")
    assert "experiment:" in done.stdout
    exp = shell.cwd / "results" / "mia-mia-loss-shadow-lira-rmia"
    meta = json.loads((exp / "study.json").read_text())
    assert meta["settings"] == {"shadows": 2} and meta["kind"] == "mia"
    df = load(exp)
    assert sorted(df["attack"]) == ["lira", "loss", "rmia", "shadow"] and (df["status"] == "TERMINATED").all()
    assert (df["n_spurious_members"] == 10).all() and (df["shadows_used"] == 2).all()
    for column in ("auc", "tpr_at_0_1pct_fpr", "attack_acc", "attack_acc_oracle", "spurious_attack_acc",
                   "other_attack_acc", "spurious_auc"):
        assert df[column].between(0, 1).all(), column
    assert (df["attack_acc"] <= df["attack_acc_oracle"] + 1e-12).all()  # calibrated: never above the oracle
    resumed = subprocess.run([sys.executable, "-m", "study.cli", "resume", str(exp)],
                             cwd=shell.cwd, env=shell.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=300)  # not a README line: the mia kind resumes in a fresh shell too
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # after deletion: the original, deleted (here: retrained) and oracle models on the forget set
    shell.run("study delete --from results/mia --method retrain")
    shell.run("study mia --from results/mia-delete-retrain --attack lira")
    row = load(shell.cwd / "results" / "mia-delete-retrain-mia-lira").iloc[0]
    assert row["deletion_method"] == "retrain" and row["roles"] == "original,deleted,retrained"
    assert row["deleted_spurious_auc"] == row["retrained_spurious_auc"]
    assert 0 <= row["original_spurious_auc"] <= 1 and 0 <= row["original_spurious_tpr_at_0_1pct_fpr"] <= 1


def test_online_membership_inference_and_the_reference_protocol(shell):
    done = shell.run("study run mia-online --bundle 8 --name online")
    assert "35 cells, 35 trainings in 6 trials" in done.stdout  # smoke: a target, 2 offline shadows, 32 online (4 × 8)
    done = shell.run("study mia --from results/online --attack lira_online --attack rmia_online")
    assert "online shadows per target: 32" in done.stdout
    df = load(shell.cwd / "results" / "online-mia-lira_online-rmia_online").set_index("attack")
    assert (df["shadows_used"] == 32).all() and (df["vulnerability_models"] == 32).all()
    for column in ("auc", "spurious_auc", "tpr_at_0_1pct_fpr", "attack_acc", "planted_tpr_at_1pct_fpr",
                   "other_examples_tpr_at_1pct_fpr"):
        assert df[column].between(0, 1).all(), column
    n_in = checkpoint.read_member(df.loc["lira_online", "checkpoint"], 0)["vulnerability_n_in"].numpy()
    assert n_in.mean() == 16 and np.percentile(n_in, 1) >= 8  # halves: about 16 IN and 16 OUT models each

    shell.run("study run mia-paper --bundle 8 --name mia-paper")
    shell.run("study mia --from results/mia-paper --attack shadow --attack lira")
    shell.run("study report results/mia-paper-mia-shadow-lira --out reports/mia-paper")
    summary = (shell.cwd / "reports" / "mia-paper" / "summary.md").read_text()
    assert "all: attack accuracy" in summary and "spurious: flagged" in summary


def test_tuning_with_default_flags_killed_and_resumed_then_constrained(shell, tmp_path):
    root = shell.cwd / "results" / "tune-s3"
    proc = shell.start("study tune-mitigation --set pattern=s3 --set n_spurious=10 --trials 20 --seeds 3 "
                       "--name tune-s3", tmp_path / "tune.log")
    # interrupt as soon as the baseline reported: the resume finishes it and starts the search, a phase whose
    # Tuner (and W&B callbacks) the resume must build itself
    kill_when(proc, lambda: any(reported_epochs(root / "baseline").values()), settle_s=0)
    assert not (root / "tuning.json").exists()
    done = shell.run("study resume results/tune-s3")
    assert "Pareto set" in done.stdout and "recommended" in done.stdout
    assert "confirmed on test" in done.stdout
    confirmed = json.loads((root / "tuning.json").read_text())["confirmation"]
    runs = wandb_runs(root)
    assert len(runs) == 1 + 2 + len(confirmed), ("one W&B run for the baseline, per search trial and per "
                                                 "confirmed setting, the resumed phases included")
    constrained = shell.run("study tune-mitigation --objective constrained --max-acc-drop 0.01 --tune-lr")
    assert "experiment:" in constrained.stdout
    print("tune-mitigation constrained:", last_line(constrained))


def test_dp_tuning_and_the_dp_comparison(shell):
    done = shell.run("study tune-mitigation --study mitigation-dp --name tune-dp")
    summary = json.loads((shell.cwd / "results" / "tune-dp" / "tuning.json").read_text())
    assert summary["epsilon_objective"] and summary["finished"] == 3
    assert all(row["dp_noise_multiplier"] > 0 and row["dp_epsilon"] > 0 for row in summary["pareto"])
    assert "Pareto set on validation score, accuracy and ε" in done.stdout and "10 planted: group ε=" in done.stdout
    shell.run("study run dp-compare --name dp-compare")
    shell.run("study report results/dp-compare")
    text = (shell.cwd / "results" / "dp-compare" / "report" / "summary.md").read_text()
    assert "DP-SGD: privacy guarantee and the planted pattern" in text and "matched clean accuracy" in text
    assert "DP σ=1 C=1" in text and "L2 0.01" in text
