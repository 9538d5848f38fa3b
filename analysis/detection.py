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

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

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
    columns = ["replicates", *(f"{m}_{s}" for m in MEAN_SE for s in ("mean", "se")), "average_precision_chance",
               "auroc_p", "auroc_p_holm", "auroc_mark_suppressed", "worst_planted_rank_median",
               "planted_score_median_mean", "source_spurious_score_mean"]
    if done.empty:
        return pd.DataFrame(columns=keys + columns)
    done = done.assign(**{c: math.nan for c in ("worst_planted_rank", "planted_score_median", "source_spurious_score",
                                             "n_planted", "n_candidates", *MEAN_SE) if c not in done})
    done = done.assign(average_precision_chance=done["n_planted"].astype(float) / done["n_candidates"].astype(float))
    grouped = done.groupby(keys, dropna=False, sort=True)
    out = grouped.size().rename("replicates").reset_index()
    for metric in MEAN_SE:
        stat = stats.mean_se(done, keys, metric)
        out[f"{metric}_mean"], out[f"{metric}_se"] = stat["mean"].to_numpy(), stat["se"].to_numpy()
    for column, how in (("worst_planted_rank", "median"), ("planted_score_median", "mean"),
                        ("source_spurious_score", "mean"), ("average_precision_chance", "mean")):
        name = column if column == "average_precision_chance" else f"{column}_{how}"
        out[name] = grouped[column].agg(lambda v: v.astype(float).agg(how)).to_numpy()
    aurocs = [part["auroc"].astype(float).dropna().to_numpy() for _, part in grouped]
    out["auroc_p"] = [auroc_above_chance_p(v) for v in aurocs]
    out["auroc_p_holm"] = stats.holm(out["auroc_p"].to_numpy())
    out["auroc_mark_suppressed"] = [_suppression(v) for v in aurocs]
    out = _ordered(out[keys + columns])
    return _compact_detection(out, keys) if compact else out


AUROC_TEST = ("one-sided one-sample t-test of the per-replicate AUROCs against 0.5 (chance), Holm-adjusted over "
              "the table's rows")


def auroc_above_chance_p(aurocs: Sequence[float] | np.ndarray) -> float:
    """Return the p-value of AUROC_TEST before adjustment: the one-sided one-sample t-test that the mean of the
    per-replicate AUROCs exceeds 0.5 (NaN with fewer than two values or no variance)."""
    values = np.asarray(aurocs, dtype=float)
    if len(values) < 2 or np.var(values) == 0:
        return math.nan
    return float(scipy_stats.ttest_1samp(values, 0.5, alternative="greater").pvalue)


def _suppression(aurocs: np.ndarray) -> str:
    """Return why a row's AUROC mark is not shown ("" when it is): fewer than stats.MIN_REPLICATES source models
    (each detect trial of a row scores its own model), or no variance over them (protocol §4.3's rule)."""
    if len(aurocs) < stats.MIN_REPLICATES:
        return f"{len(aurocs)} source model{'s' * (len(aurocs) != 1)} < {stats.MIN_REPLICATES}"
    if np.var(aurocs) == 0:
        return "zero variance over replicates"
    return ""


def _mark(p_holm: float, suppressed: str) -> str:
    if suppressed:
        return "†"
    return "*" if isinstance(p_holm, float) and p_holm < 0.05 else ""


def _compact_detection(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Return the printable form of a `detection_table`: keys as the index, AUROC and AP as 'mean ± se' and
    P@n, P@1% as means, to two decimals (so a row of the six methods' names fits 100 columns)."""
    out = table[list(keys)].rename(columns={"n_spurious": "n"})
    out["reps"] = table["replicates"]
    out["AUROC"] = [stats.cell(m, s, 2) + _mark(p, why) for m, s, p, why in
                    zip(table["auroc_mean"], table["auroc_se"], table["auroc_p_holm"], table["auroc_mark_suppressed"])]
    out["AP"] = [_significant(m) for m in table["average_precision_mean"]]
    out["AP/ch."] = [_number(m / c, 1) if c else "-" for m, c in
                     zip(table["average_precision_mean"], table["average_precision_chance"])]
    for metric in ("precision_at_n", "precision_at_1pct"):
        out[MEAN_SE[metric]] = [_number(v, 2) for v in table[f"{metric}_mean"]]
    out["worst"] = ["-" if pd.isna(v) else f"{v:g}" for v in table["worst_planted_rank_median"]]
    out["spur."] = [_number(v, 2) for v in table["source_spurious_score_mean"]]
    return out.set_index([k if k != "n_spurious" else "n" for k in keys])


def _number(value, digits: int) -> str:
    return "-" if pd.isna(value) else f"{value:.{digits}f}"


def _g3(value: float) -> str:
    """Return `value` to three significant digits (scores of different methods differ in scale by orders of
    magnitude)."""
    return "-" if pd.isna(value) else f"{value:.3g}"


def _significant(mean: float) -> str:
    """Return `mean` to two significant digits (AP near its chance level n/N is small)."""
    return "-" if pd.isna(mean) else f"{mean:.2g}"


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
    (the paper's label; an n = 0 model counts for each pattern of its `control_patterns`), next to the models
    with planted examples of the same method, factors and pattern: does a model with planted images have
    more extreme top scores than a clean one? (The same statistics of the same method on models of the same
    recipe, so the two sides share a scale; raw scores of different methods do not.)

    Columns: the keys; controls (finished n = 0 trials); score_top1_mean / _se and score_at_1pct_mean / _se
    (mean ± s.e. over the controls of the highest score and of the k_1pct-th highest score: the false-positive
    reference); planted_trials (finished trials with n > 0, every n pooled) and planted_top1_mean /
    planted_at_1pct_mean (the same two statistics, mean over those trials). `compact`: the keys as the index
    and text cells, rounded, for printing (`detection_text`).
    """
    done = _detect_rows(df)
    controls, planted = _controls(done), done[done["n_spurious"] > 0]
    keys = ["method", *_varied(pd.concat([controls, planted])), "pattern"]
    columns = ["controls", "score_top1_mean", "score_top1_se", "score_at_1pct_mean", "score_at_1pct_se",
               "planted_trials", "planted_top1_mean", "planted_at_1pct_mean"]
    if controls.empty:
        return pd.DataFrame(columns=keys + columns)
    controls = controls.assign(**{c: math.nan for c in ("score_top1", "score_at_1pct") if c not in controls})
    out = controls.groupby(keys, dropna=False, sort=True).size().rename("controls").reset_index()
    for metric in ("score_top1", "score_at_1pct"):
        stat = stats.mean_se(controls, keys, metric)
        out[f"{metric}_mean"], out[f"{metric}_se"] = stat["mean"].to_numpy(), stat["se"].to_numpy()
    planted = planted.assign(**{c: planted.get(c, math.nan) for c in ("score_top1", "score_at_1pct")})
    side = (planted.groupby(keys, dropna=False, sort=True)
            .agg(planted_trials=("score_top1", "size"), planted_top1_mean=("score_top1", "mean"),
                 planted_at_1pct_mean=("score_at_1pct", "mean")).reset_index()
            if not planted.empty else pd.DataFrame(columns=[*keys, *columns[5:]]))
    out = out.merge(side, on=keys, how="left")
    out["planted_trials"] = out["planted_trials"].fillna(0)
    out = _ordered(out[keys + columns].astype({"planted_trials": int}))
    return _compact_controls(out, keys) if compact else out


def _compact_controls(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Return the printable form of a `control_table`: keys as the index, short headers, two decimals."""
    out = table[list(keys)].copy()
    out["controls"] = table["controls"]
    out["top-1"] = [_g3(m) for m in table["score_top1_mean"]]
    out["top 1%"] = [_g3(m) for m in table["score_at_1pct_mean"]]
    out["trials"] = table["planted_trials"]
    out["their top-1"] = [_g3(v) for v in table["planted_top1_mean"]]
    out["their top 1%"] = [_g3(v) for v in table["planted_at_1pct_mean"]]
    return out.set_index(list(keys))


def detection_text(df: pd.DataFrame, width: int = 100) -> str:
    """Return both tables in their compact form, each under a caption that says what its cells are, for the
    end of a run (`study/posthoc.finish`) and the report; lines within `width` columns where the keys allow."""
    planted, controls = detection_table(df, compact=True), control_table(df, compact=True)
    return "\n\n".join([
        _captioned(planted, PLANTED_CAPTION, "(no finished detection trials with planted examples)", width),
        _captioned(controls, CONTROL_CAPTION, "(no finished n = 0 control trials)", width)])


PLANTED_CAPTION = (
    "Finding the planted images (n > 0), over the replicates (source models, reps) of each row: AUROC of the "
    "planted images among the candidates, mean ± s.e. (* p < 0.05: " + AUROC_TEST + "; † mark not shown: fewer "
    "than 3 source models); AP: mean average precision, and AP/ch.: its ratio to chance, n / candidates; the "
    "means over the row of the precision among the n highest scores (P@n = R@n, recall at n) and among the top "
    "1 % (P@1%); worst: median number of images to inspect from the top to find every planted one; spur.: "
    "mean spurious score of the source models. (high)/(low): the end of the method's statistic flagged; for "
    "loss, loss_trajectory and tracin the two rank the same values from either end, so AUROC(low) = 1 − "
    "AUROC(high) and only AP, P@n, P@1% and ranks add information. influence solves only the "
    "influence_candidates (50) at its end of the gradient norm and ranks the rest by the gradient norm, so over "
    "all candidates its metrics are mostly the gradient norm's (protocol §12.2).")
CONTROL_CAPTION = (
    "Clean models (n = 0 controls), the false-positive reference: mean over the controls (s.e. in the report's "
    "detection_controls.csv) of the highest "
    "score (top-1) and of the score at the top 1 %; beside them the same two statistics, mean over the models "
    "with planted images of the same method and pattern (trials, every n: their top-1, their top 1%): do "
    "planted models show more extreme top scores than clean ones?")


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
        fig.suptitle("mean ± s.e. over source models (seeds); a method's direction low dashed", fontsize=style.TITLE_SIZE)
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
