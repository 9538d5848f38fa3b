"""`study report EXPERIMENT_DIR --wandb-report`: a W&B Report over an experiment's W&B runs, built with
wandb-workspaces (the optional extra: pip install 'rare-spurious-study[wandb-report]').

`build` is a pure function (study.json + the experiment's `analysis.load` frame -> an unsaved `wr.Report`);
only `save` talks to W&B. The report holds, for a training study, one panel grid per pattern: its runs (the
experiment's W&B group, that pattern) grouped by the cell keys that vary (n_spurious, and e.g. l2 or model),
so each bar is one cell's final spurious score or test accuracy, mean ± s.e. over its seeds, and each line
a cell's per-epoch curve, mean ± s.e.; for a tune-mitigation study a Pareto panel (validation accuracy
against validation spurious score, one point per run); for a detection study one grid per pattern, a bar
per method and n of the AUROC and average precision, mean ± s.e. over seeds (protocol §12); then the local
report's summary.md (the tables, claims and provenance).

W&B line plots chart logged history against a logged step, and n_spurious is a config key, not a history
key: the "against n" view is therefore the bar panel (one bar per n), the line panels run over epochs.

Example::

    study run demo --wandb online && study report results/demo-… --wandb-report
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from analysis import report as report_lib, tuning
from spurious import config as config_lib
from spurious.errors import SpuriousError
from spurious.patterns import PATTERNS, short_name
from study import wandb_setup

INSTALL = "pip install 'rare-spurious-study[wandb-report]'"
STEP = "epoch"  # the history key every trial logs once per epoch
SEED_KEYS = ("data_seed", "seed")  # replicates: aggregated over, never grouped by
PANEL = {"w": 12, "h": 8}
AGGREGATE = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stderr", "aggregate": True}
SHARED_NOTE = ("Runs that score several cells (one model shared by cells, e.g. an n = 0 model scored under "
               "every pattern, or `--bundle`) log each cell under `members/<j>/` and are not in these panels; "
               "the tables below hold every cell.")


def workspaces():
    """Return wandb_workspaces.reports.v2, or raise one line saying how to install the extra."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise SpuriousError(f"--wandb-report needs wandb-workspaces: {INSTALL}") from None
    return wr


def check(experiment: Path, meta: Mapping[str, Any]) -> None:
    """Refuse (one line) what cannot make a W&B Report: no wandb-workspaces, an experiment that logged no W&B
    runs, or no way to save online (no API key, or WANDB_MODE offline/disabled)."""
    workspaces()
    logged = (meta.get("wandb") or {}).get("mode", "off")
    if logged == "off":
        raise SpuriousError(f"--wandb-report needs the experiment's W&B runs, and {str(experiment)!r} logged none "
                            "(it ran with --wandb off)")
    if wandb_setup.resolve_mode("auto") != "online":
        hint = (f"; this experiment logged offline, sync it first with `wandb sync "
                f"{wandb_setup.runs_dir(experiment)}/offline-run-*`" if logged == "offline" else "")
        why = ("WANDB_MODE is set to offline or disabled in this shell; unset it" if wandb_setup.api_key_configured()
               else "an API key: set WANDB_API_KEY or run `wandb login`")
        raise SpuriousError(f"--wandb-report needs W&B online ({why})" + hint)


def group_keys(frame: pd.DataFrame) -> list[str]:
    """Return the config keys that tell a training frame's cells apart within a pattern: those whose values
    differ (not the seeds, which are aggregated over), n_spurious always and last."""
    keys = [k for k in config_lib.field_names() if k in frame and k not in ("pattern", "n_spurious", *SEED_KEYS)
            and frame[k].astype(str).nunique() > 1]
    return [*keys, "n_spurious"]


def patterns(frame: pd.DataFrame) -> list[str]:
    """Return the canonical patterns of a frame's rows, in registration order (unregistered ones after)."""
    found = {PATTERNS.canonical(p) if p in PATTERNS else p for p in frame["pattern"].dropna().astype(str)}
    return [p for p in PATTERNS.names() if p in found] + sorted(found - set(PATTERNS.names()))


def runset(wr, experiment: str, entity: str, project: str, name: str, pattern: str | None = None,
           groupby: list[str] = ()):
    """Return a runset of the experiment's trial runs (its W&B group, job type train), one pattern's when given
    (under any of its names: a trial's config holds the name as the study gave it), grouped by `groupby`."""
    from wandb_workspaces import expr

    where = [expr.Metric("Group") == experiment, expr.Metric("JobType") == "train"]
    if pattern is not None:
        names = [pattern, *PATTERNS.aliases(pattern)] if pattern in PATTERNS else [pattern]
        where.append(expr.Config("pattern").isin(names))
    return wr.Runset(entity=entity, project=project, name=name, filters=expr.And(*where),
                     groupby=[f"config.{k}" for k in groupby])


def pattern_grid(wr, experiment: str, entity: str, project: str, pattern: str, keys: list[str]):
    """Return a pattern's panel grid: per metric of the summary tables, its final value per cell (bars) and its
    per-epoch curve per cell (lines), both mean ± s.e. over the seeds of a cell."""
    panels = []
    for metric in report_lib.SUMMARY_METRICS:
        panels.append(wr.BarPlot(title=f"{metric} by {', '.join(keys)} (final epoch, mean ± s.e. over seeds)",
                                 metrics=[metric], orientation="v", layout=wr.Layout(**PANEL), **AGGREGATE))
    for metric in report_lib.SUMMARY_METRICS:
        panels.append(wr.LinePlot(title=f"{metric} per epoch (mean ± s.e. over seeds)", x=STEP, y=[metric],
                                  layout=wr.Layout(**PANEL), **AGGREGATE))
    name = f"{experiment}: {short_name(pattern)}"
    return wr.PanelGrid(runsets=[runset(wr, experiment, entity, project, name, pattern, keys)], panels=panels)


def pareto_grid(wr, experiment: str, entity: str, project: str):
    """Return the tuning study's Pareto panel: each run's final validation accuracy against its validation
    spurious score (the values selection used; lower-right is better)."""
    scatter = wr.ScatterPlot(title=f"{tuning.ACC} against {tuning.SCORE} (one point per setting)",
                             x=wr.SummaryMetric(tuning.SCORE), y=wr.SummaryMetric(tuning.ACC),
                             layout=wr.Layout(w=24, h=10))
    return wr.PanelGrid(runsets=[runset(wr, experiment, entity, project, experiment)], panels=[scatter])


DETECTION_METRICS = ("auroc", "average_precision")
DETECTION_NOTE = ("Each bar is one detection method (and direction) at one n: the AUROC or average precision of its "
                  "suspicion scores, "
                  "planted against the other candidate training images, mean ± s.e. over seeds (protocol §12). The "
                  "n = 0 controls have nothing planted, hence no bar; their top scores are in the tables below.")


def detection_grid(wr, experiment: str, entity: str, project: str, pattern: str):
    """Return a detection study's panel grid of one pattern: per metric a bar per (method, direction, n)."""
    panels = [wr.BarPlot(title=f"{metric} by method, direction, n_spurious (mean ± s.e. over seeds)", metrics=[metric],
                         orientation="v", layout=wr.Layout(**PANEL), **AGGREGATE) for metric in DETECTION_METRICS]
    return wr.PanelGrid(runsets=[runset(wr, experiment, entity, project, f"{experiment}: {short_name(pattern)}",
                                        pattern, ["method", "direction", "n_spurious"])], panels=panels)


def build(meta: Mapping[str, Any], frame: pd.DataFrame, experiment: str, entity: str, summary_md: str = ""):
    """Return the W&B Report (not saved) of one experiment: its study.json `meta` (W&B project and kind), its
    `analysis.load` frame, its name (the W&B group of its runs), the W&B entity and the local summary.md."""
    wr = workspaces()
    project = (meta.get("wandb") or {}).get("project") or wandb_setup.DEFAULT_PROJECT
    kind = meta.get("kind", "train")
    training = frame[frame["kind"] == "train"] if "kind" in frame else frame
    blocks = []
    if kind == "tune-mitigation":
        blocks += [wr.H2("Pareto: validation accuracy against validation spurious score"),
                   pareto_grid(wr, experiment, entity, project)]
    elif kind == "detect" and "pattern" in frame and not frame.empty:
        blocks.append(wr.MarkdownBlock(text=DETECTION_NOTE))
        planted = frame[pd.to_numeric(frame["n_spurious"], errors="coerce") > 0]
        for pattern in patterns(planted):
            blocks += [wr.H2(f"Detection of pattern {short_name(pattern)} ({pattern})"),
                       detection_grid(wr, experiment, entity, project, pattern)]
    elif "pattern" in training and not training.empty:
        keys = group_keys(training)
        blocks.append(wr.MarkdownBlock(
            text=f"Each bar is one cell ({', '.join(keys)}) at the final epoch, each line one cell per epoch: mean ± "
                 f"s.e. over its seeds ({', '.join(SEED_KEYS)}). " + (SHARED_NOTE if _shared(training) else "")))
        for pattern in patterns(training):
            blocks += [wr.H2(f"Pattern {short_name(pattern)} ({pattern})"),
                       pattern_grid(wr, experiment, entity, project, pattern, keys)]
    if summary_md:
        blocks += [wr.H2("Summary tables"), wr.MarkdownBlock(text=summary_md)]
    return wr.Report(project=project, entity=entity, title=experiment[:128], blocks=blocks,
                     description=f"study {meta.get('study', '?')} ({kind}): the experiment's W&B runs "
                                 f"(group {experiment}) and its `study report` tables", width="fluid")


def _shared(frame: pd.DataFrame) -> bool:
    """Return whether some rows come from trials of several cells (their trial ids end in -m<k>)."""
    return bool(frame["trial_id"].astype(str).str.contains(r"-m\d+$").any()) if "trial_id" in frame else False


def default_entity() -> str:
    """Return the W&B entity the configured API key logs to by default (network)."""
    import wandb

    try:
        entity = wandb.Api().default_entity
    except Exception as err:  # network, authentication: one line, not a traceback
        raise SpuriousError(f"cannot reach W&B to find your entity ({_one_line(err)}); pass --wandb-entity") from None
    if not entity:
        raise SpuriousError("W&B reports no default entity for this API key; pass --wandb-entity")
    return entity


def save(report) -> str:
    """Save `report` to W&B (network) and return its URL."""
    try:
        report.save()
        return report.url
    except Exception as err:  # network, permissions, a project that does not exist: one line
        raise SpuriousError(f"could not save the W&B report to {report.entity}/{report.project}: "
                            f"{_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]
