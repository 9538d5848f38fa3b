"""`study detect`: can the planted examples be found? Score the training images of a finished training study's
models for suspicion, without the pattern or the planted indices, one Tune trial per source model, method and
direction (protocol §12).

    study run detect-demo --name detect                  # R3 and S3 at n ∈ {0, 3, 10, 100}, 2 seeds, checkpoints kept
    study detect --from results/detect --method all --yes  # 14 models × 10 (method, direction): 140 trials
    study detect --from results/detect --method tracin --method spectral --filter n_spurious=[0,100]
    study detect --from results/detect --method influence --set influence_candidates=200 --name detect-influence
    study report results/detect-detect

Methods (spurious/detection.py; `all` = every one): loss (final training loss), loss_trajectory (mean loss over
the kept checkpoints), tracin (TracIn self-influence over the kept checkpoints, Pruthi et al. 2020), spectral
(spectral signatures, Tran et al. 2018), activation_clustering (Chen et al. 2018), influence (self-influence
with the inverse-HVP solver on a candidate subset). The four loss and gradient methods run in both directions,
as separate trials: high flags the hardest images, low the easiest (`--set direction=high` or `low` for one;
protocol §12.2). loss_trajectory and tracin read every checkpoint the
training study kept: launch it with `--checkpoint-every 1 --keep-checkpoints 0` for every epoch (`detect-demo`
keeps every second epoch; most studies keep only the latest 2).

Source models: the TERMINATED trials (and bundle members) with a checkpoint that pass every `--filter`; models
with planted examples are scored against their planted indices, n = 0 models are the controls (nothing
planted: their top scores are the false-positive reference); shadow models of membership studies are
skipped. Results go to `<storage>/<source>-detect` (every method) or `<source>-detect-<method>-…` (or --name)
with a study.json, so `study resume` continues them. `--set` takes the settings of
trainables.detect.DetectSettings (a list makes a grid axis).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from spurious import datasets as datasets_lib, detection
from spurious.errors import SpuriousError
from study import posthoc, runner, space as space_lib
from study import options as options_lib
from study.options import add_run_options, add_source_arguments, run_options
from trainables import detect as detect_trainable

FIXED_KEYS = ("method", "source_trial_id")
# `--smoke`: a short influence solve on few candidates, and fewer k-means restarts. (The Hessian sample stays at
# its default: on a few hundred images the sampled Hessian's negative curvature can exceed the damping, which
# CG refuses, see spurious/influence.py.)
SMOKE_SETTINGS = {"influence_candidates": 8, "cg_max_iter": 10, "kmeans_restarts": 2}
DIRECTION_WORDS = {"high": "hardest (direction high)", "low": "easiest (direction low)"}


def arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of `study detect`."""
    p.description, p.epilog = __doc__.split("\n\n")[0], "\n\n".join(__doc__.split("\n\n")[1:])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_source_arguments(p, "the training study's experiment directory (local, shared or a URI)",
                         "a detection setting", setting_keys())
    p.add_argument("--method", action="append", required=True, metavar="METHOD",
                   help=f"a detection method ({', '.join(detection.METHODS)}, or all); repeatable")
    add_run_options(p, smoke_help="fast settings for a quick check: " + ", ".join(
        f"{k}={v}" for k, v in SMOKE_SETTINGS.items()) + " (for the methods that read them; --set overrides them)",
        default_name="<source>-detect, or <source>-detect-<method>-… for some methods", trains=False)


def setting_keys() -> list[str]:
    """Return the keys `--set` accepts."""
    return options_lib.setting_keys(detect_trainable.DetectSettings, FIXED_KEYS)


def parse_methods(items: Sequence[str]) -> list[str]:
    """Return the methods of `--method` (in the order of detection.METHODS, `all` = every one); one-line
    SpuriousError for an unknown one."""
    chosen = set()
    for item in items:
        for name in (m.strip() for m in item.split(",")):
            if name == "all":
                chosen.update(detection.METHODS)
            elif name in detection.METHODS:
                chosen.add(name)
            else:
                raise SpuriousError(f"--method {name!r} is not a detection method; allowed: "
                                    f"{', '.join(detection.METHODS)}, all")
    return [m for m in detection.METHODS if m in chosen]


def method_keys(methods: Sequence[str]) -> tuple[str, ...]:
    """Return the `--set` keys the chosen methods read."""
    keys = list(detect_trainable.COMMON_KEYS)
    for method in methods:
        keys += [k for k in detect_trainable.METHOD_KEYS[method] if k not in keys]
    return tuple(keys)


def parse_settings(items: Sequence[str], methods: Sequence[str]) -> dict[str, Any]:
    """Parse `--set key=value` detection settings (YAML values; a list is a grid axis); refuse a key that is not
    a setting, or that none of `methods` reads."""
    values = posthoc.parse_pairs(items, "--set")
    unknown = sorted(set(values) - set(setting_keys()))
    if unknown:
        raise SpuriousError(f"--set {', '.join(unknown)}: not a detection setting; allowed: "
                            f"{', '.join(setting_keys())}")
    foreign = [k for k in values if k not in method_keys(methods)]
    if foreign:
        raise SpuriousError(f"--set {', '.join(foreign)}: not read by --method {', '.join(methods)} (they read: "
                            f"{', '.join(method_keys(methods))})")
    return values


def default_name(source: str, methods: Sequence[str]) -> str:
    """Return `<source>-detect` for every method, else `<source>-detect-<method>-…`."""
    base = f"{posthoc.source_name(source)}-detect"
    return base if list(methods) == list(detection.METHODS) else f"{base}-{'-'.join(methods)}"


def checkpoint_dirs(latest: str, file: str | None) -> list[str]:
    """Return every checkpoint directory of the trial whose latest checkpoint is `latest` (a local path or a
    URI) that holds `file`, sorted by name (Tune numbers them in order)."""
    if posthoc.is_uri(latest):
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(latest.rsplit("/", 1)[0])
        base = latest.rsplit("/", 1)[0]
        names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
                       if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
        return [f"{base}/{n}" for n in names] or [latest]
    found = sorted(d for d in Path(latest).parent.glob("checkpoint_*")
                   if d.is_dir() and (file is None or (d / file).exists()))
    return [str(d) for d in found] or [latest]


def models_of(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Return one row per distinct source model (a trained model scored as several cells, e.g. an n = 0
    model shared by patterns, is one model) and, per kept row's trial id, the comma-separated patterns of
    the n = 0 cells it is the baseline of."""
    key = df["training_id"] if "training_id" in df else df["trial_id"]
    df = df.assign(_model=key.astype(str)).sort_values(["_model", "trial_id"])
    first = df.drop_duplicates("_model")
    controls = {}
    for model, group in df.groupby("_model", sort=False):
        zero = group[pd.to_numeric(group["n_spurious"]) == 0]
        if not zero.empty:
            rep = first[first["_model"] == model]["trial_id"].iloc[0]
            controls[str(rep)] = ",".join(sorted(set(map(str, zero["pattern"]))))
    return first.drop(columns="_model"), controls


def plan(source: str, methods: Sequence[str], overrides: dict, filters: dict,
         options: runner.RunOptions) -> tuple[posthoc.Plan, list[str]]:
    """Return the detection study for `source` (validated, nothing started) and notes on what was skipped."""
    has_meta = not posthoc.is_uri(source) and (Path(source) / runner.META_FILE).is_file()
    kind = runner.read_meta(source).get("kind") if has_meta else None
    if kind not in (None, "train"):
        raise SpuriousError(f"--from {source!r} is a {kind} study; study detect scores the models of a training "
                            "study (study run)")
    df = posthoc.apply_filters(posthoc.source_trials(source), filters)
    df, notes = posthoc.finished(df)
    shadows = df["split"].isin(posthoc.SHADOW_SPLITS) if "split" in df else pd.Series(False, index=df.index)
    if shadows.any():
        notes.append(f"skipping {int(shadows.sum())} shadow model(s) of a membership study")
    df = df[~shadows]
    if df.empty:
        raise SpuriousError(f"no source trial of {source!r} to score ({'; '.join(notes) or 'none selected'})")
    if not (pd.to_numeric(df["n_spurious"]) > 0).any():
        raise SpuriousError(f"no source trial of {source!r} has planted examples (every selected model has "
                            "n_spurious = 0): nothing to detect; select models with n_spurious > 0")
    overrides = dict(overrides)
    directions = overrides.pop("direction", list(detection.DIRECTIONS[::-1]))  # default: high and low
    directions = [directions] if not isinstance(directions, list) else directions
    detectors = [{"method": m, **({"direction": d} if m in detection.DIRECTED else {})}
                 for m in methods for d in (directions if m in detection.DIRECTED else [None])]
    space, combos = posthoc.settings_grid(overrides)
    for combo in combos:
        for detector in detectors:
            detect_trainable.settings({**detector, "source_trial_id": "x", **combo})
    models, controls = models_of(df)
    sources = {}
    for r in models.itertuples():
        dirs = checkpoint_dirs(r.checkpoint, r.file)
        sources[str(r.trial_id)] = {
            "checkpoint": r.checkpoint, "file": r.file, "checkpoints": dirs,
            "spurious_score": float(getattr(r, "spurious_score", float("nan"))),
            "control_patterns": controls.get(str(r.trial_id), ""),
            "training_id": str(getattr(r, "training_id", r.trial_id)),
            "member": int(str(r.file).rsplit("_", 1)[-1].split(".")[0]) if str(r.file).startswith("member_") else 0}
    if any(m in detect_trainable.TRAJECTORY_METHODS for m in methods):
        kept = sorted({len(e["checkpoints"]) for e in sources.values()})
        span = f"{kept[0]}" if len(kept) == 1 else f"{kept[0]}–{kept[-1]}"
        notes.append(f"{', '.join(m for m in methods if m in detect_trainable.TRAJECTORY_METHODS)}: the source models "
                     f"kept {span} checkpoint(s) each" + (
                         "; with one, they see only the final model (train with --checkpoint-every 1 "
                         "--keep-checkpoints 0 to keep every epoch)" if kept[0] == 1 else ""))
    ids = sorted(sources)
    n_planted = sum(1 for r in models.itertuples() if float(r.n_spurious) > 0)
    notes.append(f"source models: {n_planted} with planted examples, {len(ids) - n_planted} n = 0 control(s)")
    directed = [m for m in methods if m in detection.DIRECTED]
    if directed:
        ends = " and, separately, the ".join(DIRECTION_WORDS[d] for d in directions)
        notes.append(f"{', '.join(directed)}: flagging the {ends} "
                     f"images ({len(directions)} trial(s) per model; --set direction=high or low for one)")
    names = sorted({datasets_lib.DATASETS.canonical(d) for d in models["dataset"]})
    study = posthoc.Plan("detect", posthoc.canonical_source(source), options.name or default_name(source, methods),
                         {"detector": space_lib.grid(detectors), **space, "source_trial_id": space_lib.grid(ids)},
                         sources, names, len(ids) * len(detectors) * len(combos),
                         {"methods": list(methods), "directions": directions, "settings": overrides})
    return study, notes


def handle(args: argparse.Namespace) -> int:
    options = run_options(args)
    methods = parse_methods(args.method)
    overrides = parse_settings(args.set, methods)
    smoke = {k: v for k, v in SMOKE_SETTINGS.items() if k in method_keys(methods)}
    settings = {**(smoke if args.smoke else {}), **overrides}
    study, notes = plan(args.source, methods, settings, posthoc.parse_pairs(args.filter), options)
    return posthoc.launch(study, notes, options, args)
