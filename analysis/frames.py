"""Tidy DataFrames from experiment directories: one row per trial (`load`) or per trial × epoch (`load_epochs`).

Reads Tune's plain files (each trial directory's `params.json`, `result.json`, `error.txt` and
`checkpoint_*`), so it needs no Ray and works on finished, partly finished and resumed experiments.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from spurious import checkpoint
from spurious.errors import SpuriousError

CONFIG_COLUMNS = ("dataset", "model", "pattern", "n_spurious", "target", "data_seed", "seed", "split", "optimizer",
                  "lr", "momentum", "l2", "grad_clip", "noise_sigma", "augmentation", "epochs", "batch_size",
                  "tau")
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "spurious_score", "spurious_score_nontarget",
           "patterned_acc", "patterned_target_rate")
# Reported values kept in the frames but not summarised (`lr` per epoch is the scheduled rate, so
# `load` keeps the config's `lr` and only `load_epochs` has the epoch's).
EXTRAS = ("epoch_time_s", "n_planted")
SUMMARY_COLUMNS = ("mean", "se", "count", "p_vs_baseline")
# Keys that identify a cell of a study; seeds are replicates, not cells.
REPLICATE_KEYS = ("data_seed", "seed")


def _full_config(params: dict) -> dict:
    """Return the trial's flat config with the training defaults filled in (every row has every key)."""
    from spurious.config import TrainConfig

    return {**{f.name: f.default for f in dataclasses.fields(TrainConfig)},
            **_flatten(params)}


def _flatten(config: dict) -> dict:
    flat = {}
    for key, value in config.items():
        flat.update(_flatten(value) if isinstance(value, dict) else {key: value})
    return flat


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


def _epochs(rows: list[dict]) -> list[dict]:
    """Keep the last report of each epoch (a restored trial repeats epochs after its checkpoint)."""
    by_epoch = {r["epoch"]: r for r in rows if "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)]


def _trial_dirs(path: Path) -> list[Path]:
    if (path / "params.json").exists():
        return [path]
    dirs = sorted(p.parent for p in path.glob("*/params.json"))
    if not dirs and not path.exists():
        raise SpuriousError(f"experiment directory {str(path)!r} does not exist")
    return dirs


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


def _units(trial_dir: Path) -> list[dict]:
    """Return the trained models of a trial directory: one for an ordinary trial, one per member of a bundle
    (`--bundle K`), each with its id, flat config, deduplicated epoch reports, error and checkpoint file."""
    params, results = _read_params(trial_dir), _read_results(trial_dir)
    trial_id = next((r["trial_id"] for r in reversed(results) if r.get("trial_id")), None) or _dir_trial_id(trial_dir)
    latest = _latest_checkpoint(trial_dir)
    if "bundle" not in params:
        return [{"trial_id": trial_id, "config": _full_config(params), "epochs": _epochs(results),
                 "error": _error_line(trial_dir), "checkpoint": latest,
                 "checkpoint_file": _model_file(latest, 0)}]
    units = []
    for k, member in enumerate(params["bundle"]):
        reports = [r["members"][str(k)] for r in results if str(k) in r.get("members", {})]
        member_error = next((m["error"] for m in reversed(reports) if "error" in m), None)
        rows = [{**r, **r["members"][str(k)]} for r in results if "epoch" in r.get("members", {}).get(str(k), {})]
        units.append({"trial_id": f"{trial_id}-m{k}", "config": _full_config(member), "epochs": _epochs(rows),
                      "error": member_error or _error_line(trial_dir), "checkpoint": latest,
                      "checkpoint_file": _model_file(latest, k)})
    return units


def _model_file(directory: str | None, k: int) -> str | None:
    path = checkpoint.member_path(directory, k)
    return None if path is None else str(path)


def _unit_row(trial_dir: Path, unit: dict) -> dict:
    config, epochs = unit["config"], unit["epochs"]
    final = epochs[-1] if epochs else {}
    done = bool(epochs) and final.get("epoch") == config.get("epochs")
    status = "TERMINATED" if done else "ERROR" if unit["error"] else "INCOMPLETE"
    return {"experiment": trial_dir.parent.name, "trial_id": unit["trial_id"], "status": status,
            "error": unit["error"] if not done else None, "epochs_done": final.get("epoch", 0),
            **config, **{m: final.get(m, math.nan) for m in (*METRICS, *EXTRAS)},
            "time_total_s": final.get("time_total_s", math.nan), "hostname": final.get("hostname"),
            "node_id": final.get("node_id"), "checkpoint": unit["checkpoint"],
            "checkpoint_file": unit["checkpoint_file"], "trial_dir": str(trial_dir)}


def _as_list(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def load(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Return one row per trial of one or more experiment directories: config, final metrics, status."""
    rows = [_unit_row(d, u) for p in _as_list(paths) for d in _trial_dirs(p) for u in _units(d)]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["experiment", "trial_id", "status", *CONFIG_COLUMNS, *METRICS])
    return df


def _epoch_rows(trial_dir: Path) -> list[dict]:
    return [{"experiment": trial_dir.parent.name, "trial_id": unit["trial_id"], **unit["config"],
             "epoch": r["epoch"], "epoch_lr": r.get("epoch_lr", r.get("lr", math.nan)), **{m: r.get(m, math.nan) for m in (*METRICS, *EXTRAS)}}
            for unit in _units(trial_dir) for r in unit["epochs"]]


def load_epochs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Return one row per (trial, epoch): the trial's config columns (`lr` is the configured base rate) and that
    epoch's metrics (`epoch_lr` is the epoch's scheduled learning rate; records written before it was named so
    carried it as `lr`)."""
    rows = [row for p in _as_list(paths) for d in _trial_dirs(p) for row in _epoch_rows(d)]
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


def summarize(df: pd.DataFrame, by: Sequence[str] = ("pattern", "n_spurious"),
              metric: str = "spurious_score") -> pd.DataFrame:
    """Return mean, standard error and count of `metric` per cell, and the one-sided Welch p-value of
    each cell against its n = 0 baseline cell (same other keys; protocol §4.3)."""
    done = df[df["status"] == "TERMINATED"] if "status" in df else df
    done = done[done[metric].notna()] if metric in done else done
    keys = cell_keys(done, list(by))
    if done.empty:
        return pd.DataFrame(columns=[*keys, *SUMMARY_COLUMNS])
    grouped = done.groupby(keys, dropna=False, sort=True)[metric]
    out = grouped.agg(mean="mean", se=_stderr, count="count").reset_index()
    samples = {_hashable(k): v.to_numpy(dtype=float) for k, v in grouped}
    cells = out[keys].itertuples(index=False, name=None)
    out["p_vs_baseline"] = [_p_value(samples, key, keys) for key in cells]
    return out


def _stderr(values: pd.Series) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else math.nan


def _hashable(key) -> tuple:
    """Return a dict key for a group; NaN (a missing config value) compares equal to itself here."""
    key = key if isinstance(key, tuple) else (key,)
    return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in key)


def _p_value(samples: dict, key: tuple, keys: list[str]) -> float:
    from spurious.metrics import welch_greater

    if "n_spurious" not in keys or key[keys.index("n_spurious")] == 0:
        return math.nan
    baseline = samples.get(_hashable(_baseline_key(key, keys)), np.array([]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on near-identical seeds; p stands
        return welch_greater(samples[_hashable(key)], baseline)


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
    summary["cell"] = [_cell(m, s, p, digits, mark_p)
                       for m, s, p in zip(summary["mean"], summary["se"], summary["p_vs_baseline"])]
    rows = [k for k in cell_keys(summary, ["pattern"]) if k != "n_spurious"]
    table = summary.pivot_table(index=rows, columns="n_spurious", values="cell", aggfunc="first")
    table.columns = [f"n={c}" for c in table.columns]
    return table


def _cell(mean: float, se: float, p: float, digits: int, mark_p: float | None) -> str:
    text = f"{mean:.{digits}f} ± {se:.{digits}f}" if not np.isnan(se) else f"{mean:.{digits}f}"
    return text + ("*" if mark_p is not None and p < mark_p else "")
