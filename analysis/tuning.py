"""Results of a mitigation-tuning study (protocol §10.3): its search trials from `analysis.load`, the Pareto
set, the recommended setting and the trade-off figure."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import style
from analysis.frames import load

SETTING_KEYS = ("l2", "noise_sigma", "lr")
VALUE_KEYS = ("spurious_score", "spurious_score_se", "test_acc", "test_acc_se")
SEARCH_COLUMNS = ("trial_id", *SETTING_KEYS, *VALUE_KEYS, "epochs_done", "status")


def search_trials(df: pd.DataFrame) -> pd.DataFrame:
    """Return the search trials of a tune-mitigation `load` frame, one row per setting: trial_id, setting
    (l2, noise_sigma, lr), seed-averaged final metrics ± s.e. over seeds (NaN until reported), epochs_done,
    status (a setting a scheduler stopped early is RUNNING: it never reported its last epoch)."""
    search = df[df["phase"] == "search"] if "phase" in df else df.iloc[0:0]
    return search.reindex(columns=list(SEARCH_COLUMNS)).reset_index(drop=True)


def pareto_front(df: pd.DataFrame, minimize: str = "spurious_score", maximize: str = "test_acc") -> pd.DataFrame:
    """Return the rows no other row dominates (≤ on `minimize`, ≥ on `maximize`, strictly better on one)."""
    a, b = df[minimize].to_numpy(float), df[maximize].to_numpy(float)
    keep = [not np.any((a <= a[i]) & (b >= b[i]) & ((a < a[i]) | (b > b[i]))) for i in range(len(df))]
    return df[np.array(keep, dtype=bool)].sort_values(minimize)


def recommend(df: pd.DataFrame, baseline_acc: float, max_acc_drop: float) -> dict | None:
    """Return the lowest-score finished setting with accuracy ≥ baseline − D (ties: higher accuracy)."""
    feasible = df[df["test_acc"] >= baseline_acc - max_acc_drop]
    if feasible.empty:
        return None
    best = feasible.sort_values(["spurious_score", "test_acc"], ascending=[True, False]).iloc[0]
    return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in best.items()}


def write_summary(root: str | Path, baseline: dict, max_acc_drop: float, objective: str) -> dict:
    """Write tuning.json, pareto.csv and tradeoff.png into the experiment directory; return the summary."""
    root = Path(root)
    df = search_trials(load(root))
    finished = df[df["status"] == "TERMINATED"]
    front = pareto_front(finished) if len(finished) else finished
    front.to_csv(root / "pareto.csv", index=False)
    summary = {"objective": objective, "max_acc_drop": max_acc_drop, "baseline": baseline,
               "trials": int(len(df)), "finished": int(len(finished)),
               "pareto": front.to_dict(orient="records"),
               "recommended": recommend(finished, baseline["test_acc"], max_acc_drop)}
    (root / "tuning.json").write_text(json.dumps(summary, indent=2, default=float))
    style.save(tradeoff_figure(finished, front, baseline), root / "tradeoff.png")
    return summary


def tradeoff_figure(df: pd.DataFrame, front: pd.DataFrame, baseline: dict):
    """Return the scatter of spurious score vs clean accuracy per setting (colour = log10 l2, size = σ), with
    the Pareto front and the unmitigated baseline."""
    fig, (ax,) = style.grid(1, width=6.1, height=3.9)
    if len(df):
        points = ax.scatter(df["test_acc"], df["spurious_score"], c=np.log10(df["l2"].clip(lower=1e-12)),
                            s=30 + 120 * df["noise_sigma"], cmap="viridis", alpha=0.8, edgecolors="k")
        fig.colorbar(points, ax=ax, label="log10 L2 weight (marker size: noise σ)")
        ax.plot(front["test_acc"], front["spurious_score"], "r--", lw=1, label="Pareto front")
    ax.scatter([baseline["test_acc"]], [baseline["spurious_score"]], marker="*", s=250, c="red",
               edgecolors="k", label="unmitigated baseline", zorder=5)
    ax.set_xlabel(f"{style.label('test_acc')} (mean over seeds)")
    ax.set_ylabel(f"{style.label('spurious_score')} (mean over seeds)")
    ax.set_title("Mitigation trade-off", fontsize=style.TITLE_SIZE)
    ax.legend(loc="best", fontsize=style.LEGEND_SIZE)
    ax.grid(alpha=0.3)
    return fig


def _fmt(row: dict) -> str:
    return (f"l2={row['l2']:.3g}  σ={row['noise_sigma']:.3g}  lr={row['lr']:.3g}  "
            f"score={row['spurious_score']:.3f} ± {row['spurious_score_se']:.3f}  "
            f"acc={row['test_acc']:.4f} ± {row['test_acc_se']:.4f}")


def format_summary(summary: dict) -> str:
    """Return the Pareto table, the baseline and the recommendation as text."""
    b = summary["baseline"]
    lines = [f"unmitigated baseline (l2=0, σ=0): score={b['spurious_score']:.3f} ± {b['spurious_score_se']:.3f}  "
             f"acc={b['test_acc']:.4f} ± {b['test_acc_se']:.4f}",
             f"Pareto set ({len(summary['pareto'])} of {summary['finished']} finished settings):"]
    lines += [f"  {_fmt(row)}" for row in summary["pareto"]]
    rec = summary["recommended"]
    rule = f"lowest score with accuracy >= baseline - {summary['max_acc_drop']}"
    lines.append(f"recommended ({rule}): {_fmt(rec) if rec else 'none of the settings qualifies'}")
    return "\n".join(lines)


def write_report(root: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write a tuning study's report (summary.md, trials.csv, pareto.csv, tradeoff.png, index.html); return it."""
    import html
    import shutil

    root = Path(root)
    summary = json.loads((root / "tuning.json").read_text()) if (root / "tuning.json").exists() else None
    if summary is None:
        from spurious.errors import SpuriousError

        raise SpuriousError(f"{str(root)!r} has no tuning.json yet: finish it with `study resume {root}`")
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    search_trials(load(root)).to_csv(out / "trials.csv", index=False)
    for name in ("pareto.csv", "tradeoff.png"):
        if (root / name).exists():
            shutil.copy(root / name, out / name)
    text = format_summary(summary)
    (out / "summary.md").write_text(f"# Mitigation tuning: {root.name}\n\nObjective: {summary['objective']}\n\n"
                                    f"```\n{text}\n```\n")
    (out / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(root.name)}</title></head><body>"
        f"<h1>Mitigation tuning: {html.escape(root.name)}</h1><pre>{html.escape(text)}</pre>"
        f"<img src='tradeoff.png' alt='trade-off'><p><a href='trials.csv'>trials.csv</a> · "
        f"<a href='pareto.csv'>pareto.csv</a></p></body></html>")
    return out
