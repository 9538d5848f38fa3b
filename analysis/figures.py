"""Paper-style figures of training studies from `analysis.load` frames, in the one style of `analysis.style`.

Score and clean accuracy versus n (protocol §4.5), the mitigation trade-off (protocol §10.2) and the
first-layer weight map of an MLP checkpoint (protocol §4.5). Curves carry their pattern label (S1…Co)
at their end, so no legend is needed. Each `*_figures`/`*_figure` function returns matplotlib Figures (for inspection);
the plain-named functions save them and return the PNG paths.

Example::

    from analysis import figures, load
    df = load("results/demo-20261128-120000")
    figures.score_vs_n(df, "figs")         # [PosixPath('figs/spurious_score_vs_n.png')]
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import frames, style
from analysis.style import label, save
from spurious.errors import SpuriousError

MITIGATIONS = ("l2", "noise_sigma", "grad_clip", "dp_noise_multiplier")  # each a sweep; the others held at 0
MAX_PANELS = 12


def pattern_order(names: Iterable[str]) -> list[str]:
    """Return pattern names in registry (display) order; unregistered specs last, alphabetically."""
    from spurious import patterns

    order = {name: i for i, name in enumerate(patterns.names())}

    def rank(name: str) -> tuple:
        try:
            return (order.get(patterns.canonical(name), len(order)), name)
        except SpuriousError:
            return (len(order) + 1, name)
    return sorted(set(names), key=rank)


def _short(pattern: str) -> str:
    from spurious import patterns

    return patterns.short_name(pattern)


def _context(df: pd.DataFrame, keys: Sequence[str]) -> str:
    """Return 'fashion · large_mlp · sgd · target 0' for the keys that are constant across `df`."""
    parts = [f"{'target ' if k == 'target' else ''}{df[k].iloc[0]}" for k in keys
             if k in df and len(df) and df[k].astype(str).nunique() == 1]
    return " · ".join(parts)


def _panel_groups(summary: pd.DataFrame, keys: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    if not keys:
        return [("", summary)]
    groups = summary.groupby(list(keys), sort=True, dropna=False)
    return [(", ".join(f"{k}={v}" for k, v in zip(keys, key)), g) for key, g in groups]


def _n_panel(ax, cells: pd.DataFrame, metric: str) -> None:
    """Draw one curve per pattern of `metric` against n on a symlog axis, labelled at its right end."""
    for pattern in pattern_order(cells["pattern"]):
        c = cells[cells["pattern"] == pattern].sort_values("n_spurious")
        line = ax.errorbar(c["n_spurious"], c["mean"], yerr=c["se"].fillna(0).to_numpy(), marker="o", ms=4,
                           capsize=0, lw=1.5).lines[0]
        ax.annotate(_short(pattern), (c["n_spurious"].iloc[-1], c["mean"].iloc[-1]), xytext=(5, 0),
                    textcoords="offset points", va="center", color=line.get_color(), fontweight="bold")
    style.n_axis(ax, cells["n_spurious"])
    ax.set_ylabel(label(metric))


def metric_vs_n_figures(df: pd.DataFrame, metric: str = "spurious_score") -> list[Figure]:
    """Return figures of `metric` (mean ± s.e. over seeds) against n, one curve per pattern and one panel
    per combination of the other varying factors (dataset, model, optimizer, target, …; protocol §4.5)."""
    summary = frames.summarize(df, by=("pattern", "n_spurious"), metric=metric)
    if summary.empty:
        return []
    panel_keys = [k for k in summary.columns if k not in ("pattern", "n_spurious", *frames.SUMMARY_COLUMNS)]
    panels = _panel_groups(summary, panel_keys)
    done = frames.finished(df)
    title = f"{label(metric)} vs n\n{_context(done, ('dataset', 'model', 'optimizer', 'target'))}".strip()
    figures = []
    for start in range(0, len(panels), MAX_PANELS):
        chunk = panels[start:start + MAX_PANELS]
        fig, axes = style.grid(len(chunk))
        for ax, (name, cells) in zip(axes, chunk):
            _n_panel(ax, cells, metric)
            ax.set_title(name, fontsize=style.TITLE_SIZE)
        fig.suptitle(title, fontsize=style.SUPTITLE_SIZE)
        figures.append(fig)
    return figures


def _save_all(figs: list[Figure], out_dir: str | Path, stem: str) -> list[Path]:
    names = [stem if i == 0 else f"{stem}_{i + 1}" for i in range(len(figs))]
    return [save(fig, Path(out_dir) / f"{name}.png") for name, fig in zip(names, figs)]


def score_vs_n(df: pd.DataFrame, out_dir: str | Path, metric: str = "spurious_score") -> list[Path]:
    """Write the paper's score plots (score vs n, symlog, one curve per pattern) and return the PNG paths."""
    return _save_all(metric_vs_n_figures(df, metric), out_dir, f"{metric}_vs_n")


def accuracy_vs_n(df: pd.DataFrame, out_dir: str | Path, metric: str = "test_acc") -> list[Path]:
    """Write clean test accuracy vs n (one curve per pattern) and return the PNG paths."""
    return _save_all(metric_vs_n_figures(df, metric), out_dir, f"{metric}_vs_n")


def mitigation_knobs(df: pd.DataFrame) -> list[str]:
    """Return the mitigation settings (MITIGATIONS: l2, noise_sigma, grad_clip, dp_noise_multiplier) that vary
    across the finished trials."""
    done = frames.finished(df)
    return [k for k in MITIGATIONS if k in done and done[k].nunique() > 1]


def tradeoff_points(df: pd.DataFrame, knob: str) -> pd.DataFrame:
    """Return score and clean accuracy per (pattern, knob value), each the mean over n of the seed means,
    the n = 0 model included (protocol §10.2); other mitigations are held at 0."""
    done = frames.finished(df)
    others = [k for k in MITIGATIONS if k != knob and k in done]
    sweep = done[(done[others] == 0).all(axis=1)] if others else done
    cells = sweep.groupby(["pattern", knob, "n_spurious"])[["spurious_score", "test_acc"]].mean()
    return cells.groupby(["pattern", knob]).mean().reset_index().sort_values(["pattern", knob])


def tradeoff_figure(df: pd.DataFrame) -> Figure | None:
    """Return the mitigation trade-off (spurious score vs clean accuracy, one panel per varying L2 / σ /
    clip setting, points labelled with the setting), or None if no mitigation varies."""
    knobs = mitigation_knobs(df)
    if not knobs:
        return None
    fig, axes = style.grid(len(knobs), width=4.2, height=3.4)
    for ax, knob in zip(axes, knobs):
        points = tradeoff_points(df, knob)
        for pattern in pattern_order(points["pattern"]):
            p = points[points["pattern"] == pattern]
            line, = ax.plot(p["test_acc"], p["spurious_score"], marker="o", lw=1.5)
            for acc, score, value in zip(p["test_acc"], p["spurious_score"], p[knob]):
                ax.annotate(f"{value:g}", (acc, score), xytext=(4, 3), textcoords="offset points", fontsize=7,
                            color=line.get_color())
            first = (p["test_acc"].iloc[0], p["spurious_score"].iloc[0])
            ax.annotate(_short(pattern), first, xytext=(4, -10), textcoords="offset points",
                        color=line.get_color(), fontweight="bold")
        ax.set_title(f"{label(knob)} sweep (points labelled with its value)", fontsize=style.TITLE_SIZE)
        ax.margins(x=0.15, y=0.1)
        ax.set_xlabel(label("test_acc"))
        ax.set_ylabel(f"{label('spurious_score')} (mean over n)")
        ax.grid(alpha=0.3)
    fig.suptitle("mitigation trade-off", fontsize=style.SUPTITLE_SIZE)
    return fig


def mitigation_tradeoff(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the mitigation trade-off figure; return its path, or [] when no mitigation varies."""
    fig = tradeoff_figure(df)
    return [] if fig is None else [save(fig, Path(out_dir) / "mitigation_tradeoff.png")]


def first_layer_map(path: str | Path) -> tuple[np.ndarray, dict]:
    """Return the (H, W) max first-layer weight map of an MLP checkpoint (a file, or a checkpoint directory:
    its model 0) and the checkpoint's config."""
    from spurious import checkpoint, datasets, models

    path = Path(path)
    state = checkpoint.read_member(path, 0) if path.is_dir() else checkpoint.load(path)
    config = state["config"]
    spec = datasets.DATASETS.get(config["dataset"])
    model = checkpoint.model_from_checkpoint(state, spec.image_shape, len(spec.class_names))
    return models.first_layer_weight_map(model).numpy(), config


def weight_map_figure(checkpoints: Sequence[str | Path], titles: Sequence[str] | None = None,
                      vrange: tuple[float, float] | None = None) -> Figure:
    """Return one panel per MLP checkpoint: the max first-layer weight of each input pixel over hidden
    units (protocol §4.5; the paper's colour range is `vrange=(-0.5, 6.5)`), sharing one colour bar."""
    maps = [first_layer_map(c) for c in checkpoints]
    if not maps:
        raise SpuriousError("weight_map needs at least one checkpoint")
    low, high = vrange or (min(m.min() for m, _ in maps), max(m.max() for m, _ in maps))
    fig, axes = style.grid(len(maps), width=2.6, height=2.7)
    for i, (ax, (values, config)) in enumerate(zip(axes, maps)):
        image = ax.imshow(values, cmap="viridis", vmin=low, vmax=high)
        default = f"({chr(97 + i)}) {_short(config['pattern'])}, n={config['n_spurious']}"
        name = titles[i] if titles else default
        ax.set_title(f"{name}\nmax {values.max():.3f}", fontsize=style.TITLE_SIZE)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="max first-layer weight")
    config = maps[0][1]
    fig.suptitle(f"max first-layer weight per pixel\n{config['dataset']} · {config['model']}",
                 fontsize=style.SUPTITLE_SIZE)
    return fig


def weight_map(checkpoints: str | Path | Sequence[str | Path], out: str | Path,
               titles: Sequence[str] | None = None, vrange: tuple[float, float] | None = None) -> Path:
    """Write the first-layer weight map of one or more MLP checkpoints (protocol §4.5) to the PNG `out`."""
    paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    return save(weight_map_figure(paths, titles, vrange), out)
