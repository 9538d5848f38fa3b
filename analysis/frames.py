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

import pandas as pd

from analysis import stats
from spurious import checkpoint
from spurious.config import field_names
from spurious.errors import SpuriousError
from spurious.metrics import INDICATORS_KEY, PRIVACY_KEYS, TEST_KEYS, TRAIN_KEYS, VAL_KEYS, unpack_indicators

# Every training-config key: a trainable records them all, canonical, in each report (spurious.config).
TRAIN_FIELDS = tuple(field_names())
CONFIG_COLUMNS = ("dataset", "model", "pattern", "n_spurious", "target", "targets", "data_seed", "seed", "split",
                  "val_size", "optimizer", "lr", "momentum", "l2", "grad_clip", "noise_sigma", "dp_noise_multiplier",
                  "dp_max_grad_norm", "dp_delta", "dp_sampling", "augmentation", "epochs", "batch_size", "tau")
# The per-epoch metrics every training trial reports: the one key list of spurious.metrics.
METRICS = (*TRAIN_KEYS, *TEST_KEYS)
# Reported values kept in the frames but not summarised (`load_epochs` also has `epoch_lr`, the epoch's
# scheduled rate; `lr` is the configured base rate).
EXTRAS = ("epoch_time_s", "n_planted", "pattern_l2", *VAL_KEYS, *PRIVACY_KEYS)
# The columns `summarize` adds to the cell keys (protocol §4.3): p_<test> and p_<test>_holm per stats.TESTS.
SUMMARY_COLUMNS = ("mean", "se", "count", "p_welch_replicates", "p_welch_replicates_holm", "mark_suppressed",
                   "p_welch_per_example", "p_welch_per_example_holm", "n_test_images", "mark_suppressed_per_example")
# Keys that identify a cell of a study; seeds are replicates, not cells.
REPLICATE_KEYS = ("data_seed", "seed")
# Post-hoc kinds: their params.json holds the post-hoc settings and their one report the source model's config;
# the column naming the source trial fills the config of trials that errored before reporting.
SOURCE_ID_COLUMNS = {"delete": "source_trial_id", "mia": "target_trial_id", "detect": "source_trial_id"}
TUNING_PHASES = ("baseline", "search", "confirm")  # the Tune experiments inside a tune-mitigation directory
# Tune's bookkeeping in result.json, left out of the rows (the columns below carry what is kept of it).
TUNE_KEYS = ("config", "done", "timestamp", "date", "pid", "node_ip", "checkpoint_dir_name", "should_checkpoint",
             "training_iteration", "time_this_iter_s", "time_since_restore", "iterations_since_restore",
             "experiment_tag", "members", "epoch")
SIGNIFICANT_MARK, SUPPRESSED_MARK = "*", "†"  # in tables: Holm-adjusted p < α; mark suppressed (protocol §4.3)
ROW_KEYS = ("experiment", "kind", "phase", "source_experiment", "trial_id", "training_id", "status", "error",
            "epochs_done", "time_total_s", "hostname", "node_id", "checkpoint", "checkpoint_file", "trial_dir")


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
    the epochs after its checkpoint), or every row of a trainable that reports no epochs (delete, mia,
    detect)."""
    by_epoch = {r["epoch"]: r for r in rows if "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)] if by_epoch else rows


def is_final(report: dict, config: dict) -> bool:
    """Return whether `report` is a trial's final one: it reports the configured last epoch (`epochs`), or it
    is a report of a trainable that reports once, when done, and counts no epochs (delete, mia, detect)."""
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
    """Return the rows of a trial directory: one for a trial of one model, one per cell of a trial of several
    cells (a bundle, `--bundle K`, or one model scored as several cells: protocol §7.3), each with its id, flat
    config, counted reports, error and checkpoint file (its model's)."""
    params, results = _read_params(trial_dir), _read_results(trial_dir)
    params = params["run"] if set(params) == {"run"} else params  # grid studies wrap each trial's entry
    trial_id = next((r["trial_id"] for r in reversed(results) if r.get("trial_id")), None) or _dir_trial_id(trial_dir)
    latest = _latest_checkpoint(trial_dir)
    if "bundle" not in params:
        reports = _reports(results)
        return [{"trial_id": trial_id, "config": _recorded(_config(params, kind), reports), "reports": reports,
                 "error": _error_line(trial_dir), "checkpoint": latest,
                 "checkpoint_file": _model_file(latest, 0)}]
    units, models = [], params.get("models") or list(range(len(params["bundle"])))
    for k, member in enumerate(params["bundle"]):
        reports = [r["members"][str(k)] for r in results if str(k) in r.get("members", {})]
        member_error = next((m["error"] for m in reversed(reports) if "error" in m), None)
        rows = [{**r, **r["members"][str(k)]} for r in results if "epoch" in r.get("members", {}).get(str(k), {})]
        units.append({"trial_id": f"{trial_id}-m{k}", "config": _recorded(_config(member, kind), _reports(rows)),
                      "reports": _reports(rows),
                      "error": member_error or _error_line(trial_dir), "checkpoint": latest,
                      "checkpoint_file": _model_file(latest, int(models[k])),
                      "training_id": f"{trial_id}-t{int(models[k])}"})
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
    return {**where, "trial_id": unit["trial_id"], "training_id": unit.get("training_id", unit["trial_id"]),
            "status": state,
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
    bundle member, per deletion, per attack, per detection, per tuning setting (tune-mitigation: the baseline
    and each search trial, `phase`).

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
    epoch, or is the one report of a trainable that counts no epochs (delete, mia, detect); else ERROR with an
    error line; else RUNNING when it has reported (interrupted, or stopped early by a scheduler: Tune's own status is
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
    return _targets_column(_integer_columns(pd.concat(parts, ignore_index=True)))


def _targets_column(df: pd.DataFrame) -> pd.DataFrame:
    """Return `df` with `targets` (the two classes of a two-class planting) as hashable tuples, () for none."""
    if "targets" in df:
        df["targets"] = [tuple(v) if isinstance(v, (list, tuple)) else () for v in df["targets"]]
    return df


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
    looked_up = config.reindex(_source_ids(df, id_column, set(config.index))).reset_index(drop=True)
    for column in looked_up:
        own = df[column] if column in df else pd.Series([None] * len(df))
        df[column] = [b if _missing(a) else a for a, b in zip(own, looked_up[column])]
    return df


def _source_ids(df: pd.DataFrame, id_column: str, known: set) -> list:
    """Return each row's source trial id as `load` names it: the id, or `<id>-m<k>` for a bundle member named by
    its Tune trial id and `source_member` k (detect)."""
    members = df["source_member"] if "source_member" in df else pd.Series(math.nan, index=df.index)
    return [i if i in known or pd.isna(k) else f"{i}-m{int(k)}" for i, k in zip(df[id_column], members)]


def _missing(value) -> bool:
    """Return whether a config value is missing (None or NaN); a list value (`targets`) never is."""
    return not isinstance(value, (list, tuple)) and bool(pd.isna(value))


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


FINISHED_STATUSES = ("TERMINATED", "ERROR")


def unfinished_trials(df: pd.DataFrame, planned: int) -> int:
    """Return how many of the `planned` Tune trials of a study's frame `df` did not finish (an interrupted run):
    planned minus the trials, bundle members counted once (trial ids `ID-mK` are members of trial ID), whose
    status is TERMINATED or ERROR. Trials that never reported are absent from `df` and count as unfinished."""
    if df.empty:
        return planned
    trial = df["trial_id"].astype(str).str.replace(r"-m\d+$", "", regex=True)
    return max(0, planned - trial[df["status"].isin(FINISHED_STATUSES)].nunique())


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
    """Return one row per cell of `metric`'s finished values: the cell keys, then SUMMARY_COLUMNS (protocol §4.3).

    mean, se, count: over the cell's replicates (final-epoch values). For cells with n > 0, against the n = 0
    cell with every other key equal:
    p_welch_replicates: one-sided Welch t-test over the per-replicate values (`stats.welch_greater_p`);
    p_welch_per_example: the reference's test (protocol §4.4, `stats.welch_per_example_p`) between the
    per-test-image indicators r(x) of the cell's lowest-data_seed model and of the n = 0 model with the same
    data_seed (else the lowest); only for `spurious_score`, NaN without recorded indicators; n_test_images: the
    length of those vectors; p_*_holm: each adjusted by Holm over the non-NaN cells of this summary
    (`stats.holm`); mark_suppressed / mark_suppressed_per_example: why that test's mark may not be shown, ""
    when it may (`stats.mark_suppression`, `stats.per_example_suppression`). NaN p-values for n = 0 cells,
    and for every cell when `by` has no n_spurious.
    """
    done = finished(df)
    done = done[done[metric].notna()] if metric in done else done.iloc[0:0]  # e.g. post-hoc rows only
    keys = cell_keys(done, list(by))
    if done.empty:
        return pd.DataFrame(columns=[*keys, *SUMMARY_COLUMNS])
    out = stats.mean_se(done, keys, metric)
    groups = {_hashable(k): g for k, g in done.groupby(keys, dropna=False, sort=True)}
    pairs = [(groups[_hashable(k)], _baseline(groups, k, keys)) for k in out[keys].itertuples(index=False, name=None)]
    replicate = [_replicate_test(cell, base, metric) for cell, base in pairs]
    out["p_welch_replicates"], out["mark_suppressed"] = [p for p, _ in replicate], [r for _, r in replicate]
    per_example = [_per_example_test(cell, base) if metric == "spurious_score" else (math.nan, math.nan, "")
                   for cell, base in pairs]
    out["p_welch_per_example"] = [p for p, _, _ in per_example]
    out["n_test_images"] = [n for _, n, _ in per_example]
    out["mark_suppressed_per_example"] = [r for _, _, r in per_example]
    for test in stats.TESTS:
        out[f"p_{test}_holm"] = stats.holm(out[f"p_{test}"].to_numpy(dtype=float))
    return out[[*keys, *SUMMARY_COLUMNS]]


def _hashable(key) -> tuple:
    """Return a dict key for a group; NaN (a missing config value) compares equal to itself here."""
    key = key if isinstance(key, tuple) else (key,)
    return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in key)


def _baseline(groups: dict, key: tuple, keys: list[str]) -> pd.DataFrame | None:
    """Return the rows of a cell's n = 0 cell (every other key equal); None for n = 0 cells and without n."""
    if "n_spurious" not in keys or key[keys.index("n_spurious")] == 0:
        return None
    base = tuple(0 if k == "n_spurious" else v for k, v in zip(keys, key))
    return groups.get(_hashable(base), pd.DataFrame(columns=[]))


def _replicate_test(cell: pd.DataFrame, base: pd.DataFrame | None, metric: str) -> tuple[float, str]:
    """Return (p_welch_replicates, mark_suppressed) of a cell against its n = 0 rows (protocol §4.3)."""
    if base is None:
        return math.nan, ""
    if base.empty:
        return math.nan, "no n = 0 cell"
    sample, baseline = cell[metric].to_numpy(dtype=float), base[metric].to_numpy(dtype=float)
    models = [rows["training_id"].tolist() if "training_id" in rows else None for rows in (cell, base)]
    return stats.welch_greater_p(sample, baseline), stats.mark_suppression(sample, baseline, *models)


def _lowest_seed(rows: pd.DataFrame, data_seed=None) -> pd.Series | None:
    """Return the row with recorded indicators and `data_seed` (any, when None) of lowest data_seed, seed."""
    rows = rows[rows[INDICATORS_KEY].map(lambda v: isinstance(v, str))] if INDICATORS_KEY in rows else rows.iloc[0:0]
    if data_seed is not None and "data_seed" in rows:
        rows = rows[rows["data_seed"] == data_seed]
    order = [k for k in REPLICATE_KEYS if k in rows]
    return None if rows.empty else (rows.sort_values(order) if order else rows).iloc[0]


def _per_example_test(cell: pd.DataFrame, base: pd.DataFrame | None) -> tuple[float, float, str]:
    """Return (p_welch_per_example, n_test_images, mark_suppressed_per_example) of a cell (protocol §4.4)."""
    planted = None if base is None else _lowest_seed(cell)
    if planted is None or base.empty:
        return math.nan, math.nan, ""
    clean = _lowest_seed(base, planted.get("data_seed")) if "data_seed" in planted else None
    clean = clean if clean is not None else _lowest_seed(base)
    if clean is None:
        return math.nan, math.nan, ""
    a, b = unpack_indicators(planted[INDICATORS_KEY]), unpack_indicators(clean[INDICATORS_KEY])
    if len(a) != len(b):
        return math.nan, math.nan, f"indicator vectors differ in length ({len(a)} vs {len(b)})"
    return stats.welch_per_example_p(a, b), float(len(a)), stats.per_example_suppression(a, b)


def score_table(df: pd.DataFrame, metric: str = "spurious_score", mark_p: float | None = 0.05) -> str:
    """Return a plain-text table of `metric` (mean ± s.e. over seeds): rows pattern (and other varying
    factors), columns n_spurious; with `mark_p`, the replicate test's marks and their legend (`mark_legend`)."""
    summary = summarize(df, metric=metric)
    if summary.empty:
        return f"(no finished trials to summarise {metric})"
    legend = "\n" + mark_legend(summary, mark_p) if mark_p is not None else ""
    return f"{metric} (mean ± s.e. over seeds)\n" + pivot_cells(summary, mark_p=mark_p).to_string() + legend


def _mark(p: float, reason: str, n: int, mark_p: float | None) -> str:
    """Return a cell's mark: '†' when its test's mark is suppressed, '*' when Holm-adjusted p < mark_p."""
    if mark_p is None or n == 0:
        return ""
    return SUPPRESSED_MARK if reason else SIGNIFICANT_MARK if p < mark_p else ""


def pivot_cells(summary: pd.DataFrame, digits: int = 3, mark_p: float | None = None,
                test: str = stats.REPLICATE_TEST) -> pd.DataFrame:
    """Return a `summarize` frame as text cells 'mean ± se': rows pattern (and other varying factors),
    columns n=…; with `mark_p`, cells whose Holm-adjusted p-value of `test` (a key of stats.TESTS) is below
    it get '*' and cells whose mark of that test is suppressed get '†' (`mark_legend` says which test and why)."""
    summary = summary.copy()
    reason = _reason_column(test)
    ns = summary["n_spurious"] if "n_spurious" in summary else pd.Series(0, index=summary.index)
    summary["cell"] = [stats.cell(m, s, digits) + _mark(p, r, n, mark_p) for m, s, p, r, n in
                       zip(summary["mean"], summary["se"], summary[f"p_{test}_holm"], summary[reason], ns)]
    rows = [k for k in cell_keys(summary, ["pattern"]) if k != "n_spurious"]
    table = summary.pivot_table(index=rows, columns="n_spurious", values="cell", aggfunc="first")
    table.columns = [f"n={c}" for c in table.columns]
    return table


def _reason_column(test: str) -> str:
    return "mark_suppressed" if test == stats.REPLICATE_TEST else f"mark_suppressed_{test.removeprefix('welch_')}"


def mark_legend(summary: pd.DataFrame, mark_p: float = 0.05, test: str = stats.REPLICATE_TEST) -> str:
    """Return the note under a `pivot_cells` table: which test its '*' marks (Holm-adjusted over how many
    cells) and, per reason, which cells' marks are suppressed ('†'; protocol §4.3)."""
    family = int(summary[f"p_{test}"].notna().sum())
    over = f"the {family} cells of this table" if family else "the cells of this table (none could be tested)"
    lines = [f"{SIGNIFICANT_MARK} p < {mark_p}: {test_label(summary, test)}, Holm-adjusted over {over}."]
    if test == stats.PER_EXAMPLE_TEST:
        lines.append("The cells show the mean ± s.e. over replicates; the mark tests the lowest-seed model of the "
                     "cell alone, against one n = 0 model, treating its test images as the sample.")
    reason = _reason_column(test)
    planted = summary[summary.get("n_spurious", 1) != 0]
    keyed = planted[planted[reason] != ""]
    for why, rows in keyed.groupby(reason, sort=True):
        keys = rows.drop(columns=[c for c in SUMMARY_COLUMNS if c in rows])
        cells = (f"all {len(rows)} cells with n > 0" if len(rows) == len(planted) > 1 else
                 ", ".join(_cell_name(r) for r in keys.itertuples(index=False)))
        lines.append(f"{SUPPRESSED_MARK} mark suppressed ({why}): {cells}.")
    return "\n".join(lines)


def test_label(summary: pd.DataFrame, test: str) -> str:
    """Return the plain-words name of `test` in a summary (`stats.describe_test`), with its number of
    per-test-image indicators when every cell tested has the same."""
    images = summary["n_test_images"].dropna() if "n_test_images" in summary else pd.Series(dtype=float)
    return stats.describe_test(test, int(images.iloc[0]) if images.nunique() == 1 else None)


def _cell_name(row) -> str:
    return " ".join(f"{k}={v}" for k, v in row._asdict().items())


def smallest_significant_n(summary: pd.DataFrame, test: str = stats.REPLICATE_TEST,
                           alpha: float = 0.05) -> pd.DataFrame:
    """Return per pattern (and other varying factors) the smallest n > 0 whose Holm-adjusted p of `test` is
    below `alpha` and whose mark is not suppressed: the paper's headline quantity (protocol §4.3).

    Columns: the row keys, test, smallest_significant_n (Int64, <NA> when no n qualifies), p_holm (at that n),
    n_tested (the cells with n > 0 and a p-value), n_suppressed (those whose mark is suppressed),
    suppressed_because (their reasons, "; "-joined) and test_name (`test_label`)."""
    rows = [k for k in summary.columns if k not in SUMMARY_COLUMNS and k != "n_spurious"]
    columns = [*rows, "test", "smallest_significant_n", "p_holm", "n_tested", "n_suppressed", "suppressed_because"]
    if summary.empty or "n_spurious" not in summary:
        return pd.DataFrame(columns=[*columns, "test_name"])
    planted = summary[summary["n_spurious"] != 0]
    out = []
    for key, cells in planted.groupby(rows, dropna=False, sort=True):
        p, reasons = cells[f"p_{test}_holm"], cells[_reason_column(test)]
        hits = cells[(p < alpha) & (reasons == "")].sort_values("n_spurious")
        first = hits.iloc[0] if len(hits) else None
        suppressed = reasons[p.notna() & (reasons != "")]
        out.append([*(key if isinstance(key, tuple) else (key,)), test,
                    pd.NA if first is None else int(first["n_spurious"]),
                    math.nan if first is None else float(first[f"p_{test}_holm"]), int(p.notna().sum()),
                    len(suppressed), "; ".join(dict.fromkeys(suppressed))])
    result = pd.DataFrame(out, columns=columns)
    result["smallest_significant_n"] = result["smallest_significant_n"].astype("Int64")
    result["test_name"] = test_label(summary, test)
    return result
