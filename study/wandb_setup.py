"""W&B for studies: the run mode, one W&B run per trial with a flat config and tags (written from the driver:
study/wandb_callback.py), and a report's tables and figures as a W&B run. W&B never prompts for a login: without an API key it runs
offline, with its run folders inside the experiment directory, and `wandb sync` uploads them later.

Examples::

    study run demo --wandb offline             # then: wandb sync results/demo-…/wandb/offline-run-*
    study run paper-mlp --address auto --wandb online --wandb-project rare-spurious --wandb-entity my-team
    study report results/demo-… --wandb        # tables and figures to the run `<experiment>-report`
"""
from __future__ import annotations

import netrc
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from spurious import config as config_lib
from spurious.errors import SpuriousError
from study.wandb_runs import WANDB_SUBDIR

MODES = ("auto", "off", "offline", "online")
DEFAULT_PROJECT = "rare-spurious-study"
DEFAULT_BASE_URL = "https://api.wandb.ai"
# Settings every W&B run of a study gets: no prompts or console capture, no code or git snapshot.
SETTINGS = {"silent": True, "save_code": False, "disable_code": True, "disable_git": True, "console": "off"}
# A trial's run is written by the driver: the driver's system metrics and hardware are not the trial's.
TRIAL_SETTINGS = {**SETTINGS, "x_disable_stats": True, "x_disable_machine_info": True}


def _netrc_file() -> Path | None:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        if Path(name).expanduser().exists():
            return Path(name).expanduser()
    return None


def _netrc_has_key(host: str) -> bool:
    path = _netrc_file()
    if path is None or not path.exists():
        return False
    try:
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def api_key_configured() -> bool:
    """Return whether W&B can authenticate without asking: WANDB_API_KEY, an identity token file, or a
    netrc entry for the W&B host (api.wandb.ai unless WANDB_BASE_URL says otherwise)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).hostname or ""
    return _netrc_has_key(host)


def resolve_mode(flag: str = "auto") -> str:
    """Return "off", "offline" or "online" for `--wandb FLAG`; auto is online iff an API key is configured
    (WANDB_MODE=offline/disabled in the environment wins); online without a key is an error, not a prompt."""
    if flag not in MODES:
        raise SpuriousError(f"--wandb {flag!r} is not one of {', '.join(MODES)}")
    if flag == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ("offline", "dryrun", "disabled"):
            return "off" if env == "disabled" else "offline"
        return "online" if api_key_configured() else "offline"
    if flag == "online" and not api_key_configured():
        raise SpuriousError("--wandb online needs a W&B API key (set WANDB_API_KEY or run `wandb login`); "
                            "--wandb offline logs locally for a later `wandb sync`")
    return flag


def wandb_dir(experiment_dir: str | Path) -> Path:
    """Return the `dir` W&B gets: the experiment directory, or ./wandb/<name> for remote storage.

    W&B writes its run folders into the `wandb` folder below it (`runs_dir`).
    """
    text = str(experiment_dir)
    if "://" in text:
        return Path(WANDB_SUBDIR).resolve() / text.rstrip("/").rsplit("/", 1)[-1]
    return Path(text).resolve()


def runs_dir(experiment_dir: str | Path) -> Path:
    """Return the folder holding an experiment's W&B run folders (offline-run-*, run-*)."""
    return wandb_dir(experiment_dir) / WANDB_SUBDIR


def configure_env(mode: str, directory: Path) -> None:
    """Point W&B (here and in the Ray workers started after this) at `directory`, in `mode`, silently."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ.update({"WANDB_MODE": mode, "WANDB_DIR": str(directory), "WANDB_SILENT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off"})


def callback_class() -> type:
    """Return the W&B callback class, study/wandb_callback.py (imported on first use: it imports Ray)."""
    from study.wandb_callback import TrialRuns

    return TrialRuns


@dataclass(frozen=True)
class Logging:
    """A study's W&B settings, recorded in study.json so `study resume` logs the same way in any shell."""

    mode: str = "off"
    project: str = DEFAULT_PROJECT
    entity: str | None = None
    provenance: dict | None = field(default=None, compare=False, repr=False)  # for run configs, not study.json

    @classmethod
    def from_flags(cls, flag: str, project: str | None, entity: str | None) -> "Logging":
        """Return the settings for `--wandb FLAG` (auto resolved now) and the project/entity flags."""
        return cls(resolve_mode(flag), project or DEFAULT_PROJECT, entity)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Logging":
        """Return the settings recorded in study.json (studies written before they were recorded: off)."""
        return cls(**meta.get("wandb", {}))

    def to_meta(self) -> dict:
        """Return the settings as study.json records them (never an API key; the provenance has its own key)."""
        return {k: v for k, v in asdict(self).items() if k != "provenance"}

    def callbacks(self, experiment_dir: str | Path, group: str) -> list:
        """Return a fresh list of Tune callbacks (one per Tuner: Tune adds its own to the list it is given)."""
        return callbacks(self.mode, self.project, self.entity, experiment_dir, group, self.provenance)

    def reactivate(self, experiment_dir: str | Path) -> None:
        """Set up this process for a resumed study whose restored callbacks log per these settings: W&B's
        mode and directory in the environment; an online study needs a key here too (one-line error, never a
        prompt)."""
        if self.mode == "off":
            return
        if self.mode == "online" and not api_key_configured():
            raise SpuriousError("this study logs to W&B online, and no W&B API key is configured in this shell "
                                "(set WANDB_API_KEY or run `wandb login`)")
        configure_env(self.mode, wandb_dir(experiment_dir))

    def print_sync_hint(self, experiment_dir: str | Path) -> None:
        """Print how to upload the experiment's offline runs, if it has any."""
        print_sync_hint(self.mode, experiment_dir)


def callbacks(mode: str, project: str | None, entity: str | None, experiment_dir: str | Path,
              group: str, provenance: Mapping[str, Any] | None = None) -> list:
    """Return the Tune callbacks for `mode`: [] when off, else one W&B run per trial, grouped by `group`, its
    config holding the trial's flat config and the study's `provenance` (study/provenance.py).

    No API key is passed to the callback (it would be pickled into tuner.pkl): online runs read
    WANDB_API_KEY or the netrc file themselves.
    """
    if mode == "off":
        return []
    if mode not in ("offline", "online"):
        raise SpuriousError(f"W&B mode {mode!r} must be resolved first (off, offline or online)")
    directory = wandb_dir(experiment_dir)
    configure_env(mode, directory)
    init = {"mode": mode, "dir": str(directory), "settings": dict(TRIAL_SETTINGS), "job_type": "train",
            "project": project or DEFAULT_PROJECT, "group": group}
    if entity:
        init["entity"] = entity
    if provenance:
        init["config"] = {"provenance": dict(provenance)}  # study/provenance.py's record, in every trial's run
    # the run's config holds the trial's config; its history leaves out the copy every result row carries, and
    # the packed per-image indicators (a 1.7 kB string for analysis, not a curve)
    from spurious.metrics import INDICATORS_KEY  # here: the quick commands import no torch

    excludes = [*config_lib.field_names(), INDICATORS_KEY]
    # How long the end of a study waits for W&B to finish its runs: offline there is nothing to upload, and a
    # run that never finishes (seen after Ctrl-C) must not hold the terminal for half an hour.
    wait = OFFLINE_FINISH_S if mode == "offline" else ONLINE_FINISH_S
    return [callback_class()(init, excludes=excludes, finish_timeout=wait)]


OFFLINE_FINISH_S = 30
ONLINE_FINISH_S = 1800  # Ray's default wait for uploads


def offline_runs(directory: str | Path) -> list[Path]:
    """Return the offline run folders under a W&B directory."""
    return sorted(Path(directory).glob("offline-run-*"))


def sync_hint(mode: str, experiment_dir: str | Path) -> str | None:
    """Return the lines telling how to upload offline runs, or None when there are none."""
    directory = runs_dir(experiment_dir)
    runs = offline_runs(directory) if mode == "offline" else []
    if not runs:
        return None
    return (f"W&B: {len(runs)} offline run(s) in {directory}; upload with:\n"
            f"  wandb sync {directory}/offline-run-*")


def print_sync_hint(mode: str, experiment_dir: str | Path) -> None:
    """Print how to upload the offline runs of an experiment, if it has any."""
    hint = sync_hint(mode, experiment_dir)
    if hint:
        print(hint)


def log_report(report_dir: str | Path, experiment_dirs: Sequence[str | Path], mode: str = "offline",
               project: str | None = None, entity: str | None = None,
               provenance: Mapping[str, Any] | None = None) -> Path | None:
    """Log a report's summary tables (wandb.Table) and figures (wandb.Image) to the run `<experiment>-report`
    in the experiment's group, its config holding the report's own `provenance` and each experiment's (from
    study.json); return the run's local folder (None when `mode` is off)."""
    import pandas as pd
    import wandb

    from analysis.frames import study_meta

    if mode == "off":
        return None
    report_dir, first = Path(report_dir), Path(experiment_dirs[0])
    directory = wandb_dir(first)
    configure_env(mode, directory)
    run = wandb.init(project=project or DEFAULT_PROJECT, entity=entity or None, group=first.name,
                     name=f"{first.name}-report", job_type="report", mode=mode, dir=str(directory),
                     settings=dict(SETTINGS), reinit="finish_previous",
                     config={"experiments": [str(Path(d).resolve()) for d in experiment_dirs],
                             "report_dir": str(report_dir.resolve()), "provenance": dict(provenance or {}),
                             "experiment_provenance": {Path(d).name: study_meta(d).get("provenance")
                                                       for d in experiment_dirs}})
    tables = {f"summary/{p.stem.removeprefix('summary_')}": _table(p)
              for p in sorted(report_dir.glob("summary_*.csv"))}
    tables["trials"] = _table(report_dir / "trials.csv")
    images = {f"figures/{p.stem}": wandb.Image(str(p))
              for p in sorted((report_dir / "figures").glob("*.png"))}
    run.log({**tables, **images})
    folder = Path(run.settings.sync_dir)
    run.finish()
    wandb.teardown()  # returns once W&B's service has written the run folder completely
    return folder


def _table(csv: Path):
    """Return a CSV as a wandb.Table; text columns get "" for missing cells (a W&B column has one type)."""
    import pandas as pd
    import wandb

    df = pd.read_csv(csv)
    text = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    df[text] = df[text].astype(object).where(df[text].notna(), "").astype(str)
    return wandb.Table(dataframe=df)
