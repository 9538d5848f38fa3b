"""The one results loader: `load` gives one row per trained or evaluated model of any study kind,
`load_epochs` one row per model × epoch; `finished`, `errored` and `join_source` work on its frames, and
`summarize`, `score_table` and `pivot_cells` are the training studies' mean ± s.e. tables (protocol §4.3).

    from analysis import load
    df = load(["results/demo-20261128-120000", "results/demo-20261128-120000-delete-retrain"])
    df.groupby(["kind", "status"]).size()

Reads Tune's plain files (each experiment's `study.json`, each trial directory's `params.json`,
`result.json`, `error.txt` and `checkpoint_*`), so it needs no Ray and works on finished, partly finished
and resumed experiments of every kind (`study.json`'s "kind"; none: "train").
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis import stats
from spurious import checkpoint
from spurious.config import field_names
from spurious.errors import SpuriousError
from spurious.metrics import TEST_KEYS, TRAIN_KEYS

# Every training-config key: a trainable records them all, canonical, in each report (spurious.config).
TRAIN_FIELDS = tuple(field_names())
CONFIG_COLUMNS = ("dataset", "model", "pattern", "n_spurious", "target", "data_seed", "seed", "split", "optimizer",
                  "lr", "momentum", "l2", "grad_clip", "noise_sigma", "augmentation", "epochs", "batch_size",
                  "tau")
# The per-epoch metrics every training trial reports: the one key list of spurious.metrics.
METRICS = (*TRAIN_KEYS, *TEST_KEYS)
# Reported values kept in the frames but not summarised (`load_epochs` also has `epoch_lr`, the epoch's
# scheduled rate; `lr` is the configured base rate).
EXTRAS = ("epoch_time_s", "n_planted")
SUMMARY_COLUMNS = ("mean", "se", "count", "p_vs_baseline")
# Keys that identify a cell of a study; seeds are replicates, not cells.
REPLICATE_KEYS = ("data_seed", "seed")
# Post-hoc kinds: their params.json holds the post-hoc settings and their one report the source model's config;
# the column naming the source trial fills the config of trials that errored before reporting.
SOURCE_ID_COLUMNS = {"delete": "source_trial_id", "mia": "target_trial_id"}
TUNING_PHASES = ("baseline", "search", "confirm")  # the Tune experiments inside a tune-mitigation directory
# Tune's bookkeeping in result.json, left out of the rows (the columns below carry what is kept of it).
TUNE_KEYS = ("config", "done", "timestamp", "date", "pid", "node_ip", "checkpoint_dir_name", "should_checkpoint",
             "training_iteration", "time_this_iter_s", "time_since_restore", "iterations_since_restore",
             "experiment_tag", "members", "epoch")
ROW_KEYS = ("experiment", "kind", "phase", "source_experiment", "trial_id", "status", "error", "epochs_done",
            "time_total_s", "hostname", "node_id", "checkpoint", "checkpoint_file", "trial_dir")


def study_meta(path: str | Path) -> dict:
    """Return an experiment's study.json ({} when it has none; a trial directory reads its experiment's)."""
    path = Path(path)
    path = path.parent if (path / "params.json").exists() else path
    meta = path / "study.json"
    return json.loads(meta.read_text()) if meta.exists() else {}


def study_kind(path: str | Path) -> str:
    """Return an experiment's study kind: study.json's "kind", "train" when it has none."""
    return study_meta(path).get("kind", "train")


def _full_config(params: dict) -> dict:
    """Return the trial's flat config with the training defaults filled in (every row has every key)."""
    from spurious.config import TrainConfig, flatten

    return {**{f.name: f.default for f in dataclasses.fields(TrainConfig)},
            **flatten(params, on_clash="path")}  # a clash (the trial errored on it) is kept by path


def _config(params: dict, kind: str) -> dict:
    """Return a post-hoc trial's flat settings as given, any other trial's full training config."""
    from spurious.config import flatten

    return flatten(params, on_clash="path") if kind in SOURCE_ID_COLUMNS else _full_config(params)


def _read_params(trial_dir: Path) -> dict:
    try:
        return json.loads((trial_dir / "params.json").read_text())
    except json.JSONDecodeError as err:
        raise SpuriousError(f"{str(trial_dir / 'params.json')!r} is not valid JSON ({err})") from None


def _read_results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed driver
    return [r for r in rows if isinstance(r, dict)]


def _reports(rows: list[dict]) -> list[dict]:
    """Return the reports that count: the last report of each epoch in epoch order (a restored trial repeats
    the epochs after its checkpoint), or every row of a trainable that reports no epochs (delete, mia)."""
    by_epoch = {r["epoch"]: r for r in rows if "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)] if by_epoch else rows


def is_final(report: dict, config: dict) -> bool:
    """Return whether `report` is a trial's final one: it reports the configured last epoch (`epochs`), or it
    is a report of a trainable that reports once, when done, and counts no epochs (delete, mia)."""
    return bool(report) and ("epoch" not in report or report["epoch"] == config.get("epochs"))


def status(reports: list[dict], config: dict, error: str | None) -> str:
    """Return a model's status from its files, by one rule for every kind: TERMINATED when its last report
    is final (`is_final`), else ERROR when it has an error line, else RUNNING when it has reported (it was
    interrupted, or a scheduler stopped it early), else PENDING."""
    if reports and is_final(reports[-1], config):
        return "TERMINATED"
    return "ERROR" if error else "RUNNING" if reports else "PENDING"


def _trial_dirs(path: Path) -> list[Path]:
    if (path / "params.json").exists():
        return [path]
    dirs = sorted(p.parent for p in path.glob("*/params.json"))
    if not dirs and not path.exists():
        raise SpuriousError(f"experiment directory {str(path)!r} does not exist")
    return dirs


def _tune_dirs(path: Path, kind: str) -> list[tuple[str | None, Path]]:
    """Return (phase, Tune experiment directory) pairs: a tune-mitigation study's baseline and search, else
    the directory itself."""
    if kind != "tune-mitigation":
        return [(None, path)]
    return [(phase, path / phase) for phase in TUNING_PHASES if (path / phase).exists()]


def _error_line(trial_dir: Path) -> str | None:
    path = trial_dir / "error.txt"
    if not path.exists():
        return None
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    causes = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "^", "~")) and ":" in ln]
    return (causes[-1] if causes else lines[-1] if lines else "unknown error")[:300]


def _latest_checkpoint(trial_dir: Path) -> str | None:
    ckpts = sorted(trial_dir.glob("checkpoint_*"))
    return str(ckpts[-1]) if ckpts else None


def _dir_trial_id(trial_dir: Path) -> str:
    match = re.search(r"_([0-9a-f]{5}_[0-9]{5})(_|$)", trial_dir.name)
    return match.group(1) if match else trial_dir.name


def _units(trial_dir: Path, kind: str) -> list[dict]:
    """Return the models of a trial directory: one for an ordinary trial, one per member of a bundle
    (`--bundle K`), each with its id, flat config, counted reports, error and checkpoint file."""
    params, results = _read_params(trial_dir), _read_results(trial_dir)
    trial_id = next((r["trial_id"] for r in reversed(results) if r.get("trial_id")), None) or _dir_trial_id(trial_dir)
    latest = _latest_checkpoint(trial_dir)
    if "bundle" not in params:
        reports = _reports(results)
        return [{"trial_id": trial_id, "config": _recorded(_config(params, kind), reports), "reports": reports,
                 "error": _error_line(trial_dir), "checkpoint": latest,
                 "checkpoint_file": _model_file(latest, 0)}]
    units = []
    for k, member in enumerate(params["bundle"]):
        reports = [r["members"][str(k)] for r in results if str(k) in r.get("members", {})]
        member_error = next((m["error"] for m in reversed(reports) if "error" in m), None)
        rows = [{**r, **r["members"][str(k)]} for r in results if "epoch" in r.get("members", {}).get(str(k), {})]
        units.append({"trial_id": f"{trial_id}-m{k}", "config": _recorded(_config(member, kind), _reports(rows)),
                      "reports": _reports(rows),
                      "error": member_error or _error_line(trial_dir), "checkpoint": latest,
                      "checkpoint_file": _model_file(latest, k)})
    return units


def _recorded(config: dict, reports: list[dict]) -> dict:
    """Return a model's config as its last report records it — canonical names (`v8` reported as
    `corner_square_5`, a reference model string as architecture + augmentation; `config.canonical`) — where
    the trainable recorded one; trials whose reports carry no config keep params.json's, as typed."""
    last = reports[-1] if reports else {}
    if all(key in last for key in TRAIN_FIELDS):
        return {**config, **{key: last[key] for key in TRAIN_FIELDS}}
    return config


def _model_file(directory: str | None, k: int) -> str | None:
    path = checkpoint.member_path(directory, k)
    return None if path is None else str(path)


def _unit_row(trial_dir: Path, unit: dict, where: dict) -> dict:
    """Return the row of one model; `where` holds its experiment, kind and (tune-mitigation) phase."""
    config, reports = unit["config"], unit["reports"]
    final = reports[-1] if reports else {}
    state = status(reports, config, unit["error"])
    expected = {} if where["kind"] in SOURCE_ID_COLUMNS else {m: math.nan for m in (*METRICS, *EXTRAS)}
    reported = {k: v for k, v in final.items() if k not in config and k not in TUNE_KEYS and k not in ROW_KEYS}
    return {**where, "trial_id": unit["trial_id"], "status": state,
            "error": unit["error"] if state != "TERMINATED" else None,
            "epochs_done": final.get("epoch", math.nan if final else 0), **config, **expected, **reported,
            "time_total_s": final.get("time_total_s", math.nan), "hostname": final.get("hostname"),
            "node_id": final.get("node_id"), "checkpoint": unit["checkpoint"],
            "checkpoint_file": unit["checkpoint_file"], "trial_dir": str(trial_dir)}


def _as_list(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def _experiment_rows(path: Path) -> tuple[list[dict], dict]:
    """Return the model rows of one experiment directory (or one trial directory) and its study.json."""
    meta = study_meta(path)
    kind, name = meta.get("kind", "train"), _experiment_name(path)
    rows = []
    for phase, tune_dir in _tune_dirs(path, kind):
        where = {"experiment": name, "kind": kind, **({"phase": phase} if phase else {}),
                 **({"source_experiment": meta["source"]} if meta.get("source") else {})}
        rows += [_unit_row(d, u, where) for d in _trial_dirs(tune_dir) for u in _units(d, kind)]
    return rows, meta


def load(paths: str | Path | Iterable[str | Path], fill_from_source: bool = True) -> pd.DataFrame:
    """Return one row per model of one or more experiment (or trial) directories of any kind: per trial, per
    bundle member, per deletion, per attack, per tuning setting (tune-mitigation: the baseline and each search
    trial, `phase`).

    Columns: experiment, kind (study.json's; "train" without one), phase (tune-mitigation), source_experiment
    (post-hoc), trial_id, status, error (the cause line of error.txt, or the member's error, unless finished),
    epochs_done (the last reported epoch; 0 before any report, NaN for a one-report trainable), the flat config
    (training trials: every TrainConfig key, defaults filled in; post-hoc trials: their settings, the source
    model's config from their report, filled from the source experiment for trials that errored before
    reporting when `fill_from_source` and the source is a readable local directory), every value of the last
    counted report (training trials: METRICS and EXTRAS always, NaN until reported; units as reported:
    accuracies and scores in [0, 1], times in seconds), time_total_s, hostname, node_id, checkpoint (the latest
    checkpoint directory), checkpoint_file (the model's file in it) and trial_dir.

    Status, one rule for every kind (`status`): TERMINATED when the last counted report (the last report of
    each epoch, so a resumed trial counts its re-run epochs once) is final, i.e. reports the configured last
    epoch, or is the one report of a trainable that counts no epochs (delete, mia); else ERROR with an error
    line; else RUNNING when it has reported (interrupted, or stopped early by a scheduler: Tune's own status is
    not in the trial's files), with its last metrics; else PENDING. Lines cut short by a killed driver are
    skipped. Raises SpuriousError for a missing directory or an unreadable params.json.
    """
    parts = []
    for path in _as_list(paths):
        rows, meta = _experiment_rows(path)
        if rows:
            parts.append(_fill_config(pd.DataFrame(rows), meta) if fill_from_source else pd.DataFrame(rows))
    if not parts:
        return pd.DataFrame(columns=["experiment", "kind", "trial_id", "status", *CONFIG_COLUMNS, *METRICS])
    return _integer_columns(pd.concat(parts, ignore_index=True))


def _integer_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Return `df` with the integer config columns (n_spurious, seeds …) as ints where none is missing."""
    from spurious.config import FIELD_TYPES

    for column in [c for c, t in FIELD_TYPES.items() if t == "int" and c in df]:
        if df[column].notna().all():
            df[column] = df[column].astype(int)
    return df


def _fill_config(df: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Return a post-hoc frame with missing config values taken from the source trial named in its id column."""
    id_column, source = SOURCE_ID_COLUMNS.get(meta.get("kind")), meta.get("source")
    if id_column not in df or not source or "://" in str(source) or not Path(source).exists():
        return df
    sources = load(source)
    config = sources.set_index("trial_id")[[c for c in CONFIG_COLUMNS if c in sources]]
    looked_up = config.reindex(df[id_column]).reset_index(drop=True)
    for column in looked_up:
        own = df[column] if column in df else pd.Series([None] * len(df))
        df[column] = [a if pd.notna(a) else b for a, b in zip(own, looked_up[column])]
    return df


def _experiment_name(path: Path) -> str:
    return path.parent.name if (path / "params.json").exists() else path.name


def _epoch_rows(trial_dir: Path, kind: str, experiment: str) -> list[dict]:
    return [{"experiment": experiment, "trial_id": unit["trial_id"], **unit["config"],
             "epoch": r["epoch"], "epoch_lr": r.get("epoch_lr", r.get("lr", math.nan)),
             **{m: r.get(m, math.nan) for m in (*METRICS, *EXTRAS)}}
            for unit in _units(trial_dir, kind) for r in unit["reports"] if "epoch" in r]


def load_epochs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Return one row per (model, epoch) of training trials: experiment, trial_id, the config columns (`lr` is the
    configured base rate) and that epoch's METRICS and EXTRAS (`epoch_lr` is the epoch's scheduled learning rate;
    records written before it was named so carried it as `lr`); post-hoc trials have none."""
    rows = []
    for path in _as_list(paths):
        kind = study_kind(path)
        for _, tune_dir in _tune_dirs(path, kind):
            rows += [row for d in _trial_dirs(tune_dir) for row in _epoch_rows(d, kind, _experiment_name(path))]
    if not rows:
        return pd.DataFrame(columns=["experiment", "trial_id", *CONFIG_COLUMNS, "epoch", *METRICS])
    return pd.DataFrame(rows)


def join_source(df: pd.DataFrame, sources: pd.DataFrame, on: str = "source_trial_id") -> pd.DataFrame:
    """Return `df` with the row of `sources` whose trial_id equals `df[on]` joined on, its columns suffixed
    `_source` (e.g. a deletion study's trials next to the training trials they started from)."""
    if on not in df:
        raise SpuriousError(f"column {on!r} is not in the frame; columns: {', '.join(map(str, df.columns))}")
    renamed = sources.rename(columns=lambda c: f"{c}_source")
    return df.merge(renamed, how="left", left_on=on, right_on="trial_id_source")


def errored(df: pd.DataFrame) -> list[str]:
    """Return `trial_id: reason` for each errored trial."""
    if df.empty:
        return []
    bad = df[df["status"] == "ERROR"]
    return [f"{r.trial_id}: {r.error}" for r in bad.itertuples()]


def cell_keys(df: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """Return `by` plus every other config column that varies across `df` (excluding seeds)."""
    extra = [c for c in CONFIG_COLUMNS if c in df and c not in by and c not in REPLICATE_KEYS
             and df[c].astype(str).nunique(dropna=False) > 1]
    return [*extra, *by]


def finished(df: pd.DataFrame) -> pd.DataFrame:
    """Return the TERMINATED rows of a `load` frame (every row of a frame without a status column)."""
    return df[df["status"] == "TERMINATED"] if "status" in df else df


def summarize(df: pd.DataFrame, by: Sequence[str] = ("pattern", "n_spurious"),
              metric: str = "spurious_score") -> pd.DataFrame:
    """Return mean, standard error and count of `metric` per cell, and the one-sided Welch p-value of
    each cell against its n = 0 baseline cell (same other keys; protocol §4.3)."""
    done = finished(df)
    done = done[done[metric].notna()] if metric in done else done.iloc[0:0]  # e.g. post-hoc rows only
    keys = cell_keys(done, list(by))
    if done.empty:
        return pd.DataFrame(columns=[*keys, *SUMMARY_COLUMNS])
    out = stats.mean_se(done, keys, metric)
    grouped = done.groupby(keys, dropna=False, sort=True)[metric]
    samples = {_hashable(k): v.to_numpy(dtype=float) for k, v in grouped}
    cells = out[keys].itertuples(index=False, name=None)
    out["p_vs_baseline"] = [_p_value(samples, key, keys) for key in cells]
    return out


def _hashable(key) -> tuple:
    """Return a dict key for a group; NaN (a missing config value) compares equal to itself here."""
    key = key if isinstance(key, tuple) else (key,)
    return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in key)


def _p_value(samples: dict, key: tuple, keys: list[str]) -> float:
    if "n_spurious" not in keys or key[keys.index("n_spurious")] == 0:
        return math.nan
    baseline = samples.get(_hashable(_baseline_key(key, keys)), np.array([]))
    return stats.welch_greater_p(samples[_hashable(key)], baseline)


def _baseline_key(key: tuple, keys: list[str]) -> tuple:
    return tuple(0 if k == "n_spurious" else v for k, v in zip(keys, key))


def score_table(df: pd.DataFrame, metric: str = "spurious_score") -> str:
    """Return a plain-text table of `metric` (mean ± s.e. over seeds): rows pattern (and other varying
    factors), columns n_spurious."""
    summary = summarize(df, metric=metric)
    if summary.empty:
        return f"(no finished trials to summarise {metric})"
    return f"{metric} (mean ± s.e. over seeds)\n" + pivot_cells(summary).to_string()


def pivot_cells(summary: pd.DataFrame, digits: int = 3, mark_p: float | None = None) -> pd.DataFrame:
    """Return a `summarize` frame as text cells 'mean ± se': rows pattern (and other varying factors),
    columns n=…; with `mark_p`, cells whose p-value vs n = 0 is below it get a '*'."""
    summary = summary.copy()
    summary["cell"] = [stats.cell(m, s, digits) + ("*" if mark_p is not None and p < mark_p else "")
                       for m, s, p in zip(summary["mean"], summary["se"], summary["p_vs_baseline"])]
    rows = [k for k in cell_keys(summary, ["pattern"]) if k != "n_spurious"]
    table = summary.pivot_table(index=rows, columns="n_spurious", values="cell", aggfunc="first")
    table.columns = [f"n={c}" for c in table.columns]
    return table
