"""The one figure style of analysis/: matplotlib Figures without pyplot (no global state, no display), a
wrapping grid of panels, axis labels, the n axis and PNG output with Agg.

    from analysis import style
    fig, axes = style.grid(3)                # 3 panels, up to COLUMNS a row
    style.n_axis(axes[0], [0, 10, 100])      # symlog x axis with a tick at each count
    style.save(fig, "figs/example.png")
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

LABELS = {"spurious_score": "spurious score", "spurious_score_nontarget": "spurious score (label ≠ c)",
          "test_acc": "clean test accuracy", "patterned_acc": "patterned test accuracy (label ≠ c)",
          "l2": "L2", "noise_sigma": "σ", "grad_clip": "clip", "dp_noise_multiplier": "DP noise multiplier",
          "n_spurious": "n (planted training examples)",
          "auroc": "AUROC (planted vs other candidate images)",
          "average_precision": "average precision (planted images)"}
COLUMNS = 4
DPI = 110
TITLE_SIZE = 9
SUPTITLE_SIZE = 10
LEGEND_SIZE = 8


def label(key: str) -> str:
    """Return the axis label of a metric or config key."""
    return LABELS.get(key, key.replace("_", " "))


def grid(count: int, width: float = 3.6, height: float = 3.0) -> tuple[Figure, list]:
    """Return a Figure of `count` panels (at least one), up to COLUMNS a row, each `width` × `height` inches,
    with constrained layout, and its axes in reading order."""
    count = max(count, 1)
    cols = min(count, COLUMNS)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols + 0.4, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        fig.delaxes(ax)
    return fig, axes[:count]


def n_axis(ax, counts: Sequence[float]) -> None:
    """Make `ax`'s x axis the n axis: symlog (the counts span decades and include 0), a tick at each count,
    labelled; curves end with room for a label to their right."""
    ns = sorted(set(counts))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ns, [str(int(n)) for n in ns])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(-0.3 if ns[0] == 0 else ns[0] * 0.7, max(ns[-1], 1) * 2.5)
    ax.set_xlabel(label("n_spurious"))
    ax.grid(alpha=0.3)


def save(fig: Figure, path: str | Path) -> Path:
    """Render `fig` with Agg into the PNG `path` (folders made as needed) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path
