"""Tables and the figure of detection studies (`study detect`): can a practitioner holding a trained model and
its training set find the few planted examples without knowing the pattern (Yang, Chou & Chaudhuri 2022)?

    from analysis import load, detection
    df = load("results/demo-detect-loss")
    print(detection.detection_text(df))                  # both tables, compact, within 100 columns
    detection.detection_table(df)                         # per method × pattern × n: AUROC, AP, precision …
    detection.control_table(df)                           # the n = 0 models: what a clean model flags
    detection.detection_figure(df).savefig("auroc.png")   # AUROC against n, one panel per pattern

`load` gives one row per detect trial (one source model scored by one method): its `method`, `scope`, the
source model's config, and its metrics of the ranking of the candidate training images by the method's
suspicion score (auroc, average_precision, precision/recall at k = n planted and at k = 1 % of the
candidates, the ranks of the planted images; NaN where undefined, e.g. every planted metric at n = 0).
"""
from __future__ import annotations

import math
import textwrap
from typing import Sequence

import pandas as pd

from analysis import frames, stats, style
from spurious import patterns
from spurious.errors import SpuriousError
from spurious.patterns import short_name

KIND = "detect"
# The display order of the methods; others follow alphabetically.
METHODS = ("loss", "loss_trajectory", "tracin", "spectral", "activation_clustering", "influence")
# Columns that make separate cells when they vary among a table's trials: the source config (seeds are
# replicates, never cells) and the detect settings.
FACTORS = (*(c for c in frames.CONFIG_COLUMNS if c not in ("pattern", "n_spurious", *frames.REPLICATE_KEYS)),
           "subset", "scope")
# Metrics summarised as mean ± s.e. over replicates, and their short labels in the compact table.
MEAN_SE = {"auroc": "AUROC", "average_precision": "AP", "precision_at_n": "P@n", "recall_at_n": "R@n",
           "precision_at_1pct": "P@1%"}


def _detect_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Return the finished detect rows of `df` (every finished row of a frame without kinds) that know their
    n_spurious, as an integer; a directed method's `method` reads with its direction, e.g. "loss (low)"
    (protocol §12.2: the end of its statistic that was flagged)."""
    done = frames.finished(df)
    done = done[done["kind"] == KIND] if "kind" in done else done
    done = done.assign(**{c: None for c in ("method", "pattern", "n_spurious") if c not in done})
    done = done[pd.to_numeric(done["n_spurious"], errors="coerce").notna()]
    if "direction" in done:
        done = done.assign(method=[method_label(m, d) for m, d in zip(done["method"], done["direction"])])
    return done.assign(pattern=done["pattern"].map(_canonical)).astype({"n_spurious": int})


def method_label(method, direction) -> str:
    """Return a method's display name: `loss (high)` for a directed method, the method itself otherwise."""
    return f"{method} ({direction})" if isinstance(direction, str) and direction else str(method)


def _canonical(pattern):
    """Return a pattern's canonical name (`s3` and `v8` -> `corner_square_5`); other values as they are."""
    try:
        return patterns.canonical(pattern) if isinstance(pattern, str) else pattern
    except SpuriousError:
        return pattern


def _varied(df: pd.DataFrame) -> list[str]:
    """Return the FACTORS that take more than one value among `df`'s rows."""
    return [c for c in FACTORS if c in df and df[c].astype(str).nunique() > 1]


def _method_rank(method) -> tuple[int, str]:
    """Return the sort key of a method (or a directed method's label): its place in METHODS, others after them
    alphabetically; within a method, "high" before "low"."""
    base = str(method).split(" (")[0]
    return (METHODS.index(base) if base in METHODS else len(METHODS), str(method))


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Return `table` with its rows in METHODS order (stable within a method), pattern as the paper's label."""
    order = sorted(range(len(table)), key=lambda i: _method_rank(table["method"].iloc[i]))
    table = table.iloc[order].reset_index(drop=True)
    return table.assign(pattern=table["pattern"].map(lambda p: short_name(p) if isinstance(p, str) else p))


def detection_table(df: pd.DataFrame, compact: bool = False) -> pd.DataFrame:
    """Return one row per method × varied factor (model, optimizer, l2, scope …: `FACTORS` that vary among the
    trials) × pattern (the paper's label) × n_spurious of the finished detect trials with n_spurious > 0.

    Columns: the keys; replicates (finished trials in the row); for each of auroc, average_precision,
    precision_at_n, recall_at_n, precision_at_1pct: `<metric>_mean` and `<metric>_se`, the mean over the
    row's trials and its standard error (sample s.d. over √count, NaN below two; `stats.mean_se`: NaN values,
    e.g. a method that could not score, are left out of both); worst_planted_rank_median (the median over the
    trials of how many images one must inspect from the top to find every planted one);
    planted_score_median_mean (the mean over the trials of each trial's median score of its planted images);
    source_spurious_score_mean (the mean final spurious score of the source models). `compact`: the keys as
    the index and text cells, rounded, for printing (`detection_text`).
    """
    done = _detect_rows(df)
    done = done[done["n_spurious"] > 0]
    keys = ["method", *_varied(done), "pattern", "n_spurious"]
    columns = ["replicates", *(f"{m}_{s}" for m in MEAN_SE for s in ("mean", "se")), "worst_planted_rank_median",
               "planted_score_median_mean", "source_spurious_score_mean"]
    if done.empty:
        return pd.DataFrame(columns=keys + columns)
    done = done.assign(**{c: math.nan for c in ("worst_planted_rank", "planted_score_median", "source_spurious_score",
                                             *MEAN_SE) if c not in done})
    grouped = done.groupby(keys, dropna=False, sort=True)
    out = grouped.size().rename("replicates").reset_index()
    for metric in MEAN_SE:
        stat = stats.mean_se(done, keys, metric)
        out[f"{metric}_mean"], out[f"{metric}_se"] = stat["mean"].to_numpy(), stat["se"].to_numpy()
    for column, how in (("worst_planted_rank", "median"), ("planted_score_median", "mean"),
                        ("source_spurious_score", "mean")):
        out[f"{column}_{how}"] = grouped[column].agg(lambda v: v.astype(float).agg(how)).to_numpy()
    out = _ordered(out[keys + columns])
    return _compact_detection(out, keys) if compact else out


def _compact_detection(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Return the printable form of a `detection_table`: keys as the index, AUROC and AP as 'mean ± se' and
    P@n, P@1% as means, to two decimals (so a row of the six methods' names fits 100 columns)."""
    out = table[list(keys)].rename(columns={"n_spurious": "n"})
    out["reps"] = table["replicates"]
    for metric in ("auroc", "average_precision"):
        out[MEAN_SE[metric]] = [stats.cell(m, s, 2) for m, s in zip(table[f"{metric}_mean"], table[f"{metric}_se"])]
    for metric in ("precision_at_n", "precision_at_1pct"):
        out[MEAN_SE[metric]] = [_number(v, 2) for v in table[f"{metric}_mean"]]
    out["worst rank"] = ["-" if pd.isna(v) else f"{v:g}" for v in table["worst_planted_rank_median"]]
    out["spur."] = [_number(v, 2) for v in table["source_spurious_score_mean"]]
    return out.set_index([k if k != "n_spurious" else "n" for k in keys])


def _number(value, digits: int) -> str:
    return "-" if pd.isna(value) else f"{value:.{digits}f}"


def _controls(done: pd.DataFrame) -> pd.DataFrame:
    """Return the n = 0 rows, one per pattern each is the baseline for (`control_patterns`, else `pattern`),
    patterns by their canonical names."""
    controls = done[done["n_spurious"] == 0]
    listed = controls["control_patterns"] if "control_patterns" in controls else pd.Series(None, controls.index)
    shared = [[_canonical(p.strip()) for p in v.split(",") if p.strip()] if isinstance(v, str) and v.strip() else [p]
              for v, p in zip(listed, controls["pattern"])]
    return controls.assign(pattern=shared).explode("pattern")


def control_table(df: pd.DataFrame, compact: bool = False) -> pd.DataFrame:
    """Return the n = 0 controls (models trained without planted examples) per method × varied factor × pattern
    (the paper's label; an n = 0 model counts for each pattern of its `control_patterns`), next to the planted
    trials of the same method, factors and pattern: do planted images score above a clean model's most
    suspicious images?

    Columns: the keys; controls (finished n = 0 trials); score_top1_mean / _se and score_at_1pct_mean / _se
    (mean ± s.e. over the controls of the highest score and of the k_1pct-th highest score: the false-positive
    reference); planted_trials (finished trials with n > 0, every n pooled); planted_score_median_median (the
    median over those trials of each trial's median planted-image score); share_planted_median_above_top1 (the
    share of those trials whose median planted-image score exceeds score_top1_mean). `compact`: the keys as the
    index and text cells, rounded, for printing (`detection_text`).
    """
    done = _detect_rows(df)
    controls, planted = _controls(done), done[done["n_spurious"] > 0]
    keys = ["method", *_varied(pd.concat([controls, planted])), "pattern"]
    columns = ["controls", "score_top1_mean", "score_top1_se", "score_at_1pct_mean", "score_at_1pct_se",
               "planted_trials", "planted_score_median_median", "share_planted_median_above_top1"]
    if controls.empty:
        return pd.DataFrame(columns=keys + columns)
    controls = controls.assign(**{c: math.nan for c in ("score_top1", "score_at_1pct") if c not in controls})
    out = controls.groupby(keys, dropna=False, sort=True).size().rename("controls").reset_index()
    for metric in ("score_top1", "score_at_1pct"):
        stat = stats.mean_se(controls, keys, metric)
        out[f"{metric}_mean"], out[f"{metric}_se"] = stat["mean"].to_numpy(), stat["se"].to_numpy()
    planted = planted.assign(planted_score_median=planted.get("planted_score_median", math.nan))
    out = out.merge(planted[keys + ["planted_score_median"]], on=keys, how="left")
    out["above"] = out["planted_score_median"].astype(float) > out["score_top1_mean"]
    known = out["planted_score_median"].notna()
    out = out.assign(above=out["above"].astype(float).where(known), scored=known)
    grouped = out.groupby(keys + columns[:5], dropna=False, sort=True)
    out = grouped.agg(planted_trials=("scored", "sum"), planted_score_median_median=("planted_score_median", "median"),
                      share_planted_median_above_top1=("above", "mean")).reset_index()
    out = _ordered(out[keys + columns].astype({"planted_trials": int}))
    return _compact_controls(out, keys) if compact else out


def _compact_controls(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Return the printable form of a `control_table`: keys as the index, short headers, two decimals."""
    out = table[list(keys)].copy()
    out["controls"] = table["controls"]
    out["top-1"] = [stats.cell(m, s, 2) for m, s in zip(table["score_top1_mean"], table["score_top1_se"])]
    out["top 1%"] = [stats.cell(m, s, 2) for m, s in zip(table["score_at_1pct_mean"], table["score_at_1pct_se"])]
    out["trials"] = table["planted_trials"]
    out["planted"] = [_number(v, 2) for v in table["planted_score_median_median"]]
    out["above"] = [_number(v, 2) for v in table["share_planted_median_above_top1"]]
    return out.set_index(list(keys))


def detection_text(df: pd.DataFrame, width: int = 100) -> str:
    """Return both tables in their compact form, each under a caption that says what its cells are, for the
    end of a run (`study/posthoc.finish`) and the report; lines within `width` columns where the keys allow."""
    planted, controls = detection_table(df, compact=True), control_table(df, compact=True)
    return "\n\n".join([
        _captioned(planted, PLANTED_CAPTION, "(no finished detection trials with planted examples)", width),
        _captioned(controls, CONTROL_CAPTION, "(no finished n = 0 control trials)", width)])


PLANTED_CAPTION = ("Finding the planted images (n > 0), over the replicates (source models, reps) of each row: AUROC "
                   "and AP (average precision) of the planted images among the candidates, mean ± s.e.; mean "
                   "precision among the n highest scores (P@n) and among the top 1 % of candidates (P@1%); worst "
                   "rank: median number of images to inspect from the top to find every planted one; spur.: mean "
                   "spurious score of the source models.")
CONTROL_CAPTION = ("Clean models (n = 0 controls), the false-positive reference: mean ± s.e. over the controls of the "
                   "highest score (top-1) and of the score at the top 1 %. Next to them, the trials with n > 0 of the "
                   "same method and pattern (every n): their count (trials), the median of their median "
                   "planted-image score (planted) and the share of them whose median planted-image score exceeds "
                   "the mean clean top-1 score (above).")


def _captioned(table: pd.DataFrame, caption: str, empty: str, width: int) -> str:
    """Return `caption` wrapped to `width` above `table`'s text, or `empty` for an empty table."""
    return empty if table.empty else textwrap.fill(caption, width) + "\n" + table.to_string(line_width=width)


def detection_figure(df: pd.DataFrame, metric: str = "auroc"):
    """Return `metric` (AUROC by default) against n (n > 0, symlog axis), one panel per pattern (and varied
    factor), one curve per method with mean ± s.e. over replicates as error bars, a dashed chance line at 0.5
    and y from 0 to 1 (the `detection_table` summary)."""
    done = _detect_rows(df)
    done = done[done["n_spurious"] > 0]
    keys = ["method", *_varied(done), "pattern", "n_spurious"]
    summary = stats.mean_se(done, keys, metric) if metric in done and not done.empty else pd.DataFrame(
        columns=[*keys, "mean", "se", "count"])
    panels = _panels(summary, keys[1:-1])
    fig, axes = style.grid(len(panels), width=4.2, height=3.4)
    for ax, (title, part) in zip(axes, panels):
        colours = {}
        for method in sorted(set(part["method"]), key=_method_rank):
            line = part[part["method"] == method].sort_values("n_spurious")
            base = str(method).split(" (")[0]  # a method's two directions: one colour, low dashed
            colour = colours.setdefault(base, f"C{len(colours)}")
            ax.errorbar(line["n_spurious"], line["mean"], yerr=line["se"].astype(float).fillna(0).to_numpy(),
                        marker="o", capsize=3, label=method, color=colour,
                        ls="--" if str(method).endswith("(low)") else "-")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
        style.n_axis(ax, part["n_spurious"])
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=style.TITLE_SIZE)
    axes[0].set_ylabel(style.label(metric))
    if panels:
        axes[0].legend(fontsize=style.LEGEND_SIZE)
    return fig


def _panels(summary: pd.DataFrame, keys: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    """Return (title, rows) per panel: one per combination of `keys` (the varied factors and pattern), titled
    by the pattern's paper label and key=value for the factors."""
    if summary.empty:
        return []
    out = []
    for values, part in summary.groupby(list(keys), sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        out.append((" · ".join(short_name(v) if k == "pattern" and isinstance(v, str) else f"{k}={v}"
                               for k, v in zip(keys, values)), part))
    return out
