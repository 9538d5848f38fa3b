"""`study mia`: membership-inference attacks on the target models of a `mia-train` study, or on the
deleted models of a `study delete` experiment of one (protocol §9), one Tune trial per target and attack.

    study run mia-train --smoke --name mia-smoke
    study mia --from results/mia-smoke --attack loss --attack lira
    study run mia-online --smoke --name online-smoke
    study mia --from results/online-smoke --attack lira_online --attack rmia_online
    study delete --from results/mia-smoke --method retrain
    study mia --from results/mia-smoke-delete-retrain --attack lira

Targets: the TERMINATED `split=mia_target` trials with a checkpoint that pass every `--filter`. Offline
shadows: the `split=mia_shadow` trials with the target's dataset, model, data seed (hence the same
membership split) and training recipe (DP-SGD settings included: a DP target is attacked with shadows of the
same σ), one per subset, subset 0 first. Online shadows: the `split=mia_online` trials with, in addition, the
target's pattern, count and class. Attacks: `loss` (loss threshold),
`shadow` (the reference's logistic regression on shadow 0), `lira` and `rmia` (offline, over the offline
shadows), `lira_online` and `rmia_online` (over the online shadows); the default is every attack the
study's shadows allow. Every threshold is calibrated on a shadow model, never on the target's labels;
accuracies at the target-optimal threshold are reported as `*_oracle` (protocol §9.6).

From a deletion experiment: each deletion trial's original, deleted and oracle models are attacked with
the shadows of the deletion's source study; the planted examples are the forget set. The oracle is the
retrain model the deletion loaded (or the deleted model itself for `--method retrain`); a deletion that
trained its oracle inside the trial has none to attack (a note says so).

Results go to `<storage>/<source>-mia-<attacks>` (or --name) with a study.json, so `study resume`
continues them.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Sequence

import numpy as np
import pandas as pd

from spurious import datasets as datasets_lib, mia
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from study import posthoc, runner, space as space_lib
from study import options as options_lib
from study.options import add_run_options, add_source_arguments, run_options
from trainables import mia as mia_trainable

# A shadow mimics its target: same data (hence membership split) and the same training recipe, DP-SGD's
# settings included (a DP target is attacked with shadows trained with the same σ, C, δ and sampling); an
# online shadow also holds the target's planted examples.
DP_KEYS = ("dp_noise_multiplier", "dp_max_grad_norm", "dp_delta", "dp_sampling")
MATCH_KEYS = ("dataset", "model", "data_seed", "optimizer", "lr", "momentum", "l2", "grad_clip", "noise_sigma",
              "augmentation", "epochs", "batch_size", *DP_KEYS)
ONLINE_KEYS = MATCH_KEYS + ("pattern", "n_spurious", "target", "targets")
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
FIXED_KEYS = ("attack", "target_trial_id")
# `--smoke`: the first two matched offline shadows only (online attacks keep all their online shadows).
SMOKE_SETTINGS = {"shadows": 2}


def arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of `study mia`."""
    p.description, p.epilog = __doc__.split("\n\n")[0], "\n\n".join(__doc__.split("\n\n")[1:])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_source_arguments(p, "a mia-train (or mia-online) study's experiment directory, or a `study delete` "
                            "experiment of one (local, shared or a URI)", "an attack setting", setting_keys(),
                         "target trials")
    p.add_argument("--attack", action="append", choices=mia.ATTACKS,
                   help="attack to run (repeatable; default: every attack the study's shadow models allow)")
    add_run_options(p, smoke_help="fast settings for a quick check: " + ", ".join(
        f"{k}={v}" for k, v in SMOKE_SETTINGS.items()) + " (--set overrides them)",
        default_name="<source>-mia-<attacks>", trains=False)


def setting_keys() -> list[str]:
    """Return the keys `--set` accepts."""
    return options_lib.setting_keys(mia_trainable.MiaSettings, FIXED_KEYS)


def _key(row: pd.Series | Any, keys: Sequence[str]) -> tuple:
    """Return a row's values of `keys` as comparable text: a key the frame lacks (a frame written before the
    key existed) reads as the training default, and numbers compare by value (0 equals 0.0)."""
    return tuple(_text(getattr(row, k, TRAIN_DEFAULTS.get(k))) for k in keys)


def _text(value: Any) -> str:
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return repr(float(value)) if is_number else str(value)


def _subset(row: Any) -> int:
    value = getattr(row, "subset", 0)
    return 0 if pd.isna(value) else int(value)


def match_shadows(targets: pd.DataFrame, shadows: pd.DataFrame, keys: Sequence[str] = MATCH_KEYS
                  ) -> dict[str, list[dict]]:
    """Return, per target trial id, its shadows sorted by subset then training seed, one per subset: the
    shadow trials with the target's `keys` (so the same membership split and training recipe)."""
    by_key: dict[tuple, dict[int, dict]] = {}
    for row in shadows.sort_values("trial_id").itertuples():
        by_subset = by_key.setdefault(_key(row, keys), {})
        by_subset.setdefault(_subset(row), {"trial_id": str(row.trial_id), "subset": _subset(row),
                                            "seed": int(row.seed), "checkpoint": row.checkpoint,
                                            "file": getattr(row, "file", None)})
    return {str(t.trial_id): [s for _, s in sorted(by_key.get(_key(t, keys), {}).items())]
            for t in targets.itertuples()}


def default_name(source: str, attacks: Sequence[str]) -> str:
    """Return the default experiment name `<source>-mia-<attack>[-<attack>…]`."""
    return f"{posthoc.source_name(source)}-mia-{'-'.join(attacks)}"


def _deletion_targets(source: str, filters: dict, notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Return (the deletion trials as targets, the deletion's source trials, {trial id: original/oracle
    entries}) of a `study delete` experiment of a membership study."""
    meta = runner.read_meta(source) if not posthoc.is_uri(source) else {}
    deletions, more = posthoc.finished(posthoc.source_trials(source))
    notes += more
    deletions = posthoc.apply_filters(deletions[deletions["split"] == "mia_target"], filters)
    trials = posthoc.source_trials(meta["source"])
    originals = trials.set_index(trials["trial_id"].astype(str))
    extra, missing = {}, []
    for row in deletions.itertuples():
        sid = str(row.source_trial_id)
        if sid not in originals.index:
            raise SpuriousError(f"deletion trial {row.trial_id} names source trial {sid}, which {meta['source']!r} "
                                "does not hold")
        oracle = getattr(row, "oracle_checkpoint", None)
        oracle = oracle if isinstance(oracle, str) and oracle else None
        if row.method != "retrain" and oracle is None:
            missing.append(str(row.trial_id))
        extra[str(row.trial_id)] = {"original": {"checkpoint": originals.loc[sid, "checkpoint"],
                                                 "file": originals.loc[sid, "file"]}, "oracle": oracle}
    if missing:
        notes.append(f"{len(missing)} deletion trial(s) trained their oracle inside the trial, so no oracle model "
                     f"is attacked for them (run `study delete --method retrain` first): {', '.join(missing)}")
    return deletions, trials, extra


def plan(source: str, attacks: Sequence[str] | None, overrides: dict, filters: dict,
         options: runner.RunOptions) -> tuple[posthoc.Plan, list[str]]:
    """Return the attack study for `source` (validated, nothing started) and notes on what was skipped.
    `attacks` None: every attack the matched shadows allow."""
    meta = runner.read_meta(source) if not posthoc.is_uri(source) else {}
    notes: list[str] = []
    if meta.get("kind") == "delete":
        targets, trials, extra = _deletion_targets(source, filters, notes)
    else:
        if meta and meta.get("kind") not in (None, "train"):
            raise SpuriousError(f"--from {source!r} is a {meta.get('kind')} study; study mia attacks a membership "
                                "training study (mia-train, mia-online) or a deletion study of one")
        trials, notes = posthoc.finished(posthoc.source_trials(source))
        targets, extra = posthoc.apply_filters(trials[trials["split"] == "mia_target"], filters), {}
    done, _ = posthoc.finished(trials)
    offline = match_shadows(targets, done[done["split"] == "mia_shadow"])
    online = match_shadows(targets, done[done["split"] == "mia_online"], ONLINE_KEYS)
    if attacks is None:
        has_online = any(online.values())
        attacks = [a for a in mia.ATTACKS if mia_trainable.needs(a) == "offline" or has_online]
    space, combos = posthoc.settings_grid(overrides)
    for kind, table in (("offline", offline), ("online", online)):
        used = [a for a in attacks if mia_trainable.needs(a) == kind]
        if not used:
            continue
        need = max(mia_trainable.min_references(a) for a in used)
        key = "online_shadows" if kind == "online" else "shadows"
        for combo in combos:
            limit = int(combo.get(key, 0) or 0)
            if 0 < limit < need:
                raise SpuriousError(f"--set {key}={limit}: the {', '.join(used)} attack(s) need at least {need} {kind} "
                                    f"shadow models (one to calibrate the threshold on, attacked with the others); "
                                    f"allowed: 0 (all) or >= {need}")
        lonely = [t for t, s in table.items() if len(s) < need]
        if lonely:
            notes.append(f"skipping {len(lonely)} target(s) with fewer than {need} matching {kind} shadow model(s): "
                         f"{', '.join(lonely)}")
        targets = targets[~targets["trial_id"].astype(str).isin(lonely)]
    if targets.empty:
        raise SpuriousError(f"no target model of {source!r} to attack: it needs finished membership target models "
                            f"(split mia_target; `study run mia-train` makes them) with their shadow models"
                            f"{' (' + '; '.join(notes) + ')' if notes else ''}")
    for combo in combos:
        for attack in attacks:
            mia_trainable.settings({"attack": attack, "target_trial_id": "x", **combo})
    ids = sorted(targets["trial_id"].astype(str))
    rows = targets.set_index(targets["trial_id"].astype(str))
    table = {t: {"checkpoint": rows.loc[t, "checkpoint"], "file": rows.loc[t, "file"], "shadows": offline[t],
                 "online": online[t], **extra.get(t, {})} for t in ids}
    counts = sorted({len(offline[t]) for t in ids})
    online_counts = sorted({len(online[t]) for t in ids})
    notes.append(f"{len(ids)} target(s); offline shadows per target: {', '.join(map(str, counts))}; online "
                 f"shadows per target: {', '.join(map(str, online_counts))}")
    names = sorted({datasets_lib.DATASETS.canonical(d) for d in targets["dataset"]})
    space = {"attack": space_lib.grid(list(attacks)), **space, "target_trial_id": space_lib.grid(ids)}
    study = posthoc.Plan("mia", posthoc.canonical_source(source), options.name or default_name(source, attacks),
                         space, table, names, len(ids) * len(combos) * len(attacks),
                         {"attacks": list(attacks), "settings": overrides,
                          "deletion": meta.get("kind") == "delete"})
    return study, notes


def handle(args: argparse.Namespace) -> int:
    options = run_options(args)
    attacks = list(dict.fromkeys(args.attack)) if args.attack else None
    overrides = {**(SMOKE_SETTINGS if args.smoke else {}), **posthoc.parse_pairs(args.set, "--set")}
    unknown = sorted(set(overrides) - set(setting_keys()))
    if unknown:
        raise SpuriousError(f"--set {', '.join(unknown)}: not an attack setting; allowed: "
                            f"{', '.join(setting_keys())}")
    study, notes = plan(args.source, attacks, overrides, posthoc.parse_pairs(args.filter), options)
    return posthoc.launch(study, notes, options, args)
