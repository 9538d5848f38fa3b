"""`study delete`: delete the planted examples from the models of a finished training study
(protocol §8), one Tune trial per source model, each reported next to the retrain-from-scratch oracle.

    study run demo --smoke --set epochs=2 --set n_spurious=[0,100] --name demo-smoke
    study delete --from results/demo-smoke --method retrain          # the oracles first: the others reuse them
    study delete --from results/demo-smoke --method incremental_retraining --set lr_policy=reset
    study delete --from results/demo-smoke --method group_influence                 # CG, damping 1.0
    study delete --from results/demo-smoke --method group_influence --set mode=reference --set depth=200 \\
        --set per_example=false --name demo-smoke-delete-reference    # what the reference's code applied

Source trials: the TERMINATED trials with a checkpoint that pass every `--filter` (config columns of
`analysis.load`, e.g. `--filter n_spurious=[10,100]`); trials with nothing planted (n_spurious = 0,
shadow models) are skipped. Results go to `<storage>/<source>-delete-<method>` (or --name) with a
study.json, so `study resume` continues them. `--set` takes the settings of trainables.delete.DeleteSettings
(a list makes a grid axis). `--oracle`: `auto` loads the oracle models of `<storage>/<source>-delete-retrain`
when that study exists and trains the others inside their trials; `train` always trains them; a directory
names the retrain study to load them from.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from analysis import load
from spurious import datasets as datasets_lib
from spurious.errors import SpuriousError
from study import posthoc, runner, space as space_lib
from study import options as options_lib
from study.options import add_run_options, add_source_arguments, run_options
from trainables import delete as delete_trainable

FIXED_KEYS = ("method", "source_trial_id")
# `--smoke`: one epoch of incremental retraining (the retrain oracle keeps the source's epochs: it must match
# the source model's training), and a short group-influence solve: 5 CG iterations, or a non-per-example
# LiSSA of depth 50 with one repeat when the settings choose LiSSA (solver=lissa or mode=reference).
SMOKE_SETTINGS = {"retrain_epochs": 1}
SMOKE_SOLVER_SETTINGS = {"cg": {"cg_max_iter": 5}, "lissa": {"depth": 50, "repeats": 1, "per_example": False}}


def arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of `study delete`."""
    p.description, p.epilog = __doc__.split("\n\n")[0], "\n\n".join(__doc__.split("\n\n")[1:])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_source_arguments(p, "the training study's experiment directory (local, shared or a URI)",
                         "a deletion setting", setting_keys())
    p.add_argument("--method", required=True, choices=delete_trainable.METHODS)
    p.add_argument("--oracle", default="auto", help="auto (default), train, or a retrain deletion study")
    add_run_options(p, smoke_help="fast settings for a quick check: " + ", ".join(
        f"{k}={v}" for k, v in SMOKE_SETTINGS.items()) + "; " + "; ".join(
        f"with solver {solver}: " + ", ".join(f"{k}={v}" for k, v in keys.items())
        for solver, keys in SMOKE_SOLVER_SETTINGS.items()) + " (--set overrides them)",
        default_name="<source>-delete-<method>", trains=False)


def setting_keys() -> list[str]:
    """Return the keys `--set` accepts."""
    return options_lib.setting_keys(delete_trainable.DeleteSettings, FIXED_KEYS)


def smoke_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """Return the `--smoke` settings for the given `--set` values: the short solve of the solver they choose
    (none when a grid mixes solvers)."""
    def values(key: str) -> list:
        value = overrides.get(key, getattr(delete_trainable.DeleteSettings, key))
        return value if isinstance(value, list) else [value]
    solvers = {delete_trainable.DeleteSettings(mode=str(mode), solver=solver).solver_name
               for mode in values("mode") for solver in values("solver")}
    return {**SMOKE_SETTINGS, **(SMOKE_SOLVER_SETTINGS[solvers.pop()] if len(solvers) == 1 else {})}


# The settings each method reads; a `--set` of another method's setting is refused.
METHOD_KEYS = {"retrain": (), "incremental_retraining": ("retrain_epochs", "lr_policy")}


def method_keys(method: str) -> tuple[str, ...]:
    """Return the `--set` keys `method` reads (group influence: all but incremental retraining's)."""
    if method in METHOD_KEYS:
        return METHOD_KEYS[method]
    return tuple(k for k in setting_keys() if k not in METHOD_KEYS["incremental_retraining"])


def check_method_settings(method: str, overrides: dict[str, Any]) -> None:
    """Raise a one-line SpuriousError for a `--set` key that `method` does not read."""
    foreign = [k for k in overrides if k not in method_keys(method)]
    if foreign:
        allowed = ", ".join(method_keys(method)) or "none"
        raise SpuriousError(f"--set {', '.join(foreign)}: not a setting of --method {method} (it takes: {allowed})")


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """Parse `--set key=value` deletion settings (YAML values; a list is a grid axis)."""
    values = posthoc.parse_pairs(items, "--set")
    unknown = sorted(set(values) - set(setting_keys()))
    if unknown:
        raise SpuriousError(f"--set {', '.join(unknown)}: not a deletion setting; allowed: "
                            f"{', '.join(setting_keys())}")
    return values


def deletable(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Return the source trials that have planted examples, and a note on those skipped."""
    nothing = (pd.to_numeric(df["n_spurious"]) == 0) | df["split"].isin(posthoc.SHADOW_SPLITS)
    notes = [f"skipping {int(nothing.sum())} source trial(s) with nothing planted (n_spurious = 0) or shadow "
             "models: nothing to delete"] if nothing.any() else []
    return df[~nothing], notes


def default_name(source: str, method: str) -> str:
    """Return the default experiment name `<source>-delete-<method>`."""
    return f"{posthoc.source_name(source)}-delete-{method}"


def _same_source(meta: dict, source: str) -> bool:
    return meta.get("source") == posthoc.canonical_source(source)


def oracle_checkpoints(oracle: str, source: str, storage: str) -> tuple[dict[str, str], list[str]]:
    """Return {source trial id: oracle checkpoint} from a finished retrain deletion study of `source`
    (`auto`: `<storage>/<source>-delete-retrain` if it exists; `train`: none), and a note."""
    if oracle == "train":
        return {}, ["oracles: trained inside each trial (--oracle train)"]
    path = Path(storage) / default_name(source, "retrain") if oracle == "auto" else Path(oracle)
    if oracle == "auto" and (posthoc.is_uri(storage) or not path.is_dir()):
        return {}, [f"oracles: trained inside each trial (no {path}; run --method retrain first to share them)"]
    meta = runner.read_meta(path)
    if meta.get("kind") != "delete" or meta.get("method") != "retrain" or not _same_source(meta, source):
        raise SpuriousError(f"--oracle {str(path)!r} is not a retrain deletion study of {source!r}")
    df = load(path, fill_from_source=False)
    done = df[(df["status"] == "TERMINATED") & df["checkpoint"].notna()] if not df.empty else df
    table = {str(r.source_trial_id): str(Path(r.checkpoint).resolve()) for r in done.itertuples()}
    return table, [f"oracles: {len(table)} loaded from {path}; the others trained inside their trials"]


def plan(source: str, method: str, overrides: dict, filters: dict, oracle: str,
         options: runner.RunOptions) -> tuple[posthoc.Plan, list[str]]:
    """Return the deletion study for `source` (validated, nothing started) and notes on what was skipped."""
    has_meta = not posthoc.is_uri(source) and (Path(source) / runner.META_FILE).is_file()
    kind = runner.read_meta(source).get("kind") if has_meta else None
    if kind in posthoc.KINDS:
        raise SpuriousError(f"--from {source!r} is a {kind} study; study delete deletes from the models of a training "
                            "study (study run)")
    df = posthoc.apply_filters(posthoc.source_trials(source), filters)
    df, notes = posthoc.finished(df)
    df, skipped = deletable(df)
    notes += skipped
    if df.empty:
        raise SpuriousError(f"no source trial of {source!r} to delete from ({'; '.join(notes) or 'none selected'})")
    space, combos = posthoc.settings_grid(overrides)
    for combo in combos:
        delete_trainable.settings({"method": method, "source_trial_id": "x", **combo})
    oracles, note = oracle_checkpoints(oracle, source, options.storage_uri()) if method != "retrain" else ({}, [])
    ids = sorted(df["trial_id"].astype(str))
    sources = {r.trial_id: {"checkpoint": r.checkpoint, "file": r.file, "oracle": oracles.get(str(r.trial_id))}
               for r in df.itertuples()}
    names = sorted({datasets_lib.DATASETS.canonical(d) for d in df["dataset"]})
    study = posthoc.Plan("delete", posthoc.canonical_source(source),
                         options.name or default_name(source, method),
                         {"method": method, **space, "source_trial_id": space_lib.grid(ids)}, sources, names,
                         len(ids) * len(combos), {"method": method, "settings": overrides})
    return study, notes + note


def handle(args: argparse.Namespace) -> int:
    options = run_options(args)
    overrides = parse_settings(args.set)
    check_method_settings(args.method, overrides)
    smoke = {k: v for k, v in smoke_settings(overrides).items() if k in method_keys(args.method)}
    settings = {**(smoke if args.smoke else {}), **overrides}
    study, notes = plan(args.source, args.method, settings, posthoc.parse_pairs(args.filter), args.oracle, options)
    return posthoc.launch(study, notes, options, args)
