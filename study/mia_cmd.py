"""`study mia`: membership-inference attacks on the target models of a `mia-train` study (protocol §9),
one Tune trial per target model and attack.

    study run mia-train --smoke --name mia-smoke
    study mia --from results/mia-smoke --attack loss --attack lira
    study mia --from results/mia-train-20261128-120000 --set shadows=[1,2,4] --attack lira

Targets: the TERMINATED `split=mia_target` trials with a checkpoint that pass every `--filter`. Shadows:
the TERMINATED `split=mia_shadow` trials of the same study with the target's dataset, model, data seed
(hence the same membership split) and training hyperparameters, one per training seed. Attacks: `loss`
(loss threshold), `shadow` (the reference's logistic regression, one shadow model) and `lira` (offline
LiRA over all matched shadows, or the first `--set shadows=K`); the default is all three. Results go to
`<storage>/<source>-mia-<attacks>` (or --name) with a study.json, so `study resume` continues them.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, Sequence

import pandas as pd

from spurious import datasets as datasets_lib, mia
from spurious.errors import SpuriousError
from study import posthoc, runner, space as space_lib
from study.options import add_run_options, expand_path, run_options
from trainables import mia as mia_trainable

# A shadow mimics its target: same data (hence membership split) and the same training recipe.
MATCH_KEYS = ("dataset", "model", "data_seed", "optimizer", "lr", "momentum", "l2", "grad_clip", "noise_sigma",
              "augmentation", "epochs", "batch_size")
FIXED_KEYS = ("attack", "target_trial_id")
# `--smoke`: the first two matched shadows only.
SMOKE_SETTINGS = {"shadows": 2}


def arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of `study mia`."""
    p.description, p.epilog = __doc__.split("\n\n")[0], "\n\n".join(__doc__.split("\n\n")[1:])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--from", dest="source", required=True, metavar="EXPERIMENT_DIR", type=expand_path,
                   help="the mia-train study's experiment directory (local, shared or a URI)")
    p.add_argument("--attack", action="append", choices=mia.ATTACKS,
                   help="attack to run (repeatable; default: all of loss, shadow, lira)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"an attack setting ({', '.join(setting_keys())}); a list makes a grid axis")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep target trials whose config column equals VALUE (or one of a list); repeatable")
    add_run_options(p, smoke_help="fast settings for a quick check: " + ", ".join(
        f"{k}={v}" for k, v in SMOKE_SETTINGS.items()) + " (--set overrides them)")


def setting_keys() -> list[str]:
    """Return the keys `--set` accepts."""
    return [f.name for f in fields(mia_trainable.MiaSettings) if f.name not in FIXED_KEYS]


def _key(row: pd.Series | Any) -> tuple:
    return tuple(str(getattr(row, k)) for k in MATCH_KEYS)


def match_shadows(targets: pd.DataFrame, shadows: pd.DataFrame) -> dict[str, list[dict]]:
    """Return, per target trial id, its shadows sorted by training seed, one per seed: the shadow trials with
    the target's MATCH_KEYS (so the same membership split and training recipe)."""
    by_key: dict[tuple, dict[int, dict]] = {}
    for row in shadows.sort_values("trial_id").itertuples():
        by_seed = by_key.setdefault(_key(row), {})
        by_seed.setdefault(int(row.seed), {"trial_id": str(row.trial_id), "seed": int(row.seed),
                                           "checkpoint": row.checkpoint, "file": getattr(row, "file", None)})
    return {str(t.trial_id): [s for _, s in sorted(by_key.get(_key(t), {}).items())] for t in targets.itertuples()}


def default_name(source: str, attacks: Sequence[str]) -> str:
    """Return the default experiment name `<source>-mia-<attack>[-<attack>…]`."""
    return f"{posthoc.source_name(source)}-mia-{'-'.join(attacks)}"


def plan(source: str, attacks: Sequence[str], overrides: dict, filters: dict,
         options: runner.RunOptions) -> tuple[posthoc.Plan, list[str]]:
    """Return the attack study for `source` (validated, nothing started) and notes on what was skipped."""
    df, notes = posthoc.finished(posthoc.source_trials(source))
    targets = posthoc.apply_filters(df[df["split"] == "mia_target"], filters)
    shadows = match_shadows(targets, df[df["split"] == "mia_shadow"])
    if any(a in mia_trainable.NEEDS_SHADOWS for a in attacks):
        lonely = [t for t, s in shadows.items() if not s]
        if lonely:
            notes.append(f"skipping {len(lonely)} target(s) with no matching shadow model: {', '.join(lonely)}")
        targets = targets[~targets["trial_id"].astype(str).isin(lonely)]
    if targets.empty:
        raise SpuriousError(f"no target model of {source!r} to attack (`study run mia-train` makes them; "
                            f"{'; '.join(notes) or 'none selected'})")
    space, combos = posthoc.settings_grid(overrides)
    for combo in combos:
        for attack in attacks:
            mia_trainable.settings({"attack": attack, "target_trial_id": "x", **combo})
    ids = sorted(targets["trial_id"].astype(str))
    rows = targets.set_index(targets["trial_id"].astype(str))
    table = {t: {"checkpoint": rows.loc[t, "checkpoint"], "file": rows.loc[t, "file"], "shadows": shadows[t]}
             for t in ids}
    counts = sorted({len(shadows[t]) for t in ids})
    notes.append(f"{len(ids)} target(s); shadows per target: {', '.join(map(str, counts))}")
    names = sorted({datasets_lib.DATASETS.canonical(d) for d in targets["dataset"]})
    space = {"attack": space_lib.grid(attacks), **space, "target_trial_id": space_lib.grid(ids)}
    study = posthoc.Plan("mia", posthoc.canonical_source(source), options.name or default_name(source, attacks),
                         space, table, names, len(ids) * len(combos) * len(attacks),
                         {"attacks": list(attacks), "settings": overrides})
    return study, notes


def handle(args: argparse.Namespace) -> int:
    options = run_options(args)
    attacks = list(dict.fromkeys(args.attack or mia.ATTACKS))
    overrides = {**(SMOKE_SETTINGS if args.smoke else {}), **posthoc.parse_pairs(args.set, "--set")}
    unknown = sorted(set(overrides) - set(setting_keys()))
    if unknown:
        raise SpuriousError(f"--set {', '.join(unknown)}: not an attack setting; allowed: "
                            f"{', '.join(setting_keys())}")
    study, notes = plan(args.source, attacks, overrides, posthoc.parse_pairs(args.filter), options)
    return posthoc.launch(study, notes, options, args)
