"""`mia_attack`: a membership-inference attack on one target model of a `mia-train` study, as a Ray Tune
trainable (protocol §9; the reference's test-set bug is fixed, see protocol §11.5 and spurious/mia.py).

One trial per (target model, attack). The trial reads the target checkpoint and, for the `shadow` and
`lira` attacks, the shadow checkpoints of the same study that share the target's membership split (same
dataset and data seed, the same training hyperparameters, distinct training seeds), all through Ray's
storage. Members are the target's training quarter (the planted spurious examples among them, as trained),
non-members its test quarter. It reports AUC, TPR at 1 % and 0.1 % FPR and attack accuracy over all
examples, the same over the spurious members, and the rate at which the other (non-spurious) members are
flagged, so spurious and other members can be compared (protocol §9.4). The checkpoint holds the per-example
scores (`member`, `nonmember`, `spurious` mask, `threshold`) for ROC curves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from spurious import checkpoint, config as config_lib, mia, train
from spurious.errors import SpuriousError, check
from spurious.planted import PlantedData
from trainables.common import report, use_trial_threads
from trainables.sources import planted_data, read_source, source_columns

SCORES_FORMAT = "mia-scores-1"
NEEDS_SHADOWS = ("shadow", "lira")


@dataclass(frozen=True)
class MiaSettings:
    """One attack trial: the attack, the target trial, how many shadows to use (0 = all), LiRA's variance."""

    attack: str = "loss"
    target_trial_id: str = ""
    shadows: int = 0
    lira_variance: str = "auto"
    eval_batch_size: int = 2000

    def __post_init__(self) -> None:
        config_lib.check_types(self, "membership-inference setting")
        check([(self.attack in mia.ATTACKS, f"attack {self.attack!r} is not one of {', '.join(mia.ATTACKS)}"),
               (self.lira_variance in mia.LIRA_VARIANCES,
                f"lira_variance {self.lira_variance!r} is not one of {', '.join(mia.LIRA_VARIANCES)}"),
               (self.shadows >= 0, f"shadows must be >= 0 (0 = all), got {self.shadows!r}"),
               (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size!r}")])


def settings(config: Mapping[str, Any]) -> MiaSettings:
    """Return the validated settings of an attack trial's config (unknown keys raise)."""
    return config_lib.from_values(MiaSettings, dict(config), "membership-inference setting")


def _model(state: dict, data: PlantedData, device: torch.device) -> torch.nn.Module:
    return checkpoint.model_from_checkpoint(state, data.input_shape, data.num_classes).to(device)


def _shadow_logits(s: MiaSettings, shadows: list[dict], target: PlantedData, datasets, device):
    """Return (shadow 0 on its own quarters, every used shadow on the target's quarters)."""
    used = shadows[:s.shadows] if s.shadows else shadows
    if not used:
        raise SpuriousError(f"the {s.attack} attack needs shadow models, and target {s.target_trial_id} has none")
    own, on_target = None, []
    for k, entry in enumerate(used):
        state = read_source(entry)
        if state["config"].get("split") != "mia_shadow":
            raise SpuriousError(f"checkpoint {entry['checkpoint']!r} is not a shadow model (split "
                                f"{state['config'].get('split')!r})")
        cfg, data = planted_data(state, datasets)
        model = _model(state, data, device)
        if k == 0:
            own = mia.split_logits(model, data.x_train, data.y_train, data.x_test, data.y_test, s.eval_batch_size)
        on_target.append(mia.split_logits(model, target.x_train, target.y_train, target.x_test, target.y_test,
                                          s.eval_batch_size))
    return own, on_target, len(used)


def _scores(s: MiaSettings, target_logits: mia.SplitLogits, entry: dict, data: PlantedData, datasets, device):
    if s.attack not in NEEDS_SHADOWS:
        return mia.loss_attack(target_logits), 0
    own, on_target, used = _shadow_logits(s, list(entry.get("shadows", [])), data, datasets, device)
    if s.attack == "shadow":
        return mia.shadow_attack(target_logits, own), 1
    return mia.lira_offline(target_logits, on_target, variance=s.lira_variance), used


def other_members(scores: mia.AttackScores, mask: np.ndarray, threshold: float) -> dict[str, float]:
    """Return the attack's success on the members that are not spurious: the fraction flagged at
    `threshold` and their AUC against the non-members (the comparison group of protocol §9.4)."""
    others = scores.member[~mask]
    if not len(others):
        return {"other_attack_acc": float("nan"), "other_auc": float("nan")}
    labels = np.r_[np.ones(len(others), bool), np.zeros(len(scores.nonmember), bool)]
    return {"other_attack_acc": float((others >= threshold).mean()),
            "other_auc": mia.roc_auc(np.r_[others, scores.nonmember], labels)}


def mia_attack(config: Mapping[str, Any], datasets: Mapping[str, Any], targets: Mapping[str, dict]) -> None:
    """Attack the target `config['target_trial_id']` with `config['attack']`; report metrics and scores.

    `targets` maps a target trial id to {"checkpoint": directory (path or URI), "file": file in it,
    "shadows": [{"trial_id", "seed", "checkpoint", "file"}, ...]}; it and `datasets` come through
    `tune.with_parameters`.
    """
    s = settings(config)
    use_trial_threads()
    if s.target_trial_id not in targets:
        raise SpuriousError(f"target trial {s.target_trial_id!r} is not among this study's targets")
    entry = targets[s.target_trial_id]
    state = read_source(entry)
    cfg, data = planted_data(state, datasets)
    if cfg.split != "mia_target":
        raise SpuriousError(f"trial {s.target_trial_id} is not a target model (split {cfg.split!r})")
    device = train.resolve_device(cfg.device)
    target_logits = mia.split_logits(_model(state, data, device), data.x_train, data.y_train, data.x_test,
                                     data.y_test, s.eval_batch_size)
    scores, used = _scores(s, target_logits, entry, data, datasets, device)
    mask = mia.spurious_mask(len(data.y_train), data.spurious_idx)
    row = mia.evaluate_attack(scores.member, scores.nonmember, mask, scores.threshold)
    row.update(other_members(scores, mask, row["attack_threshold"]))
    saved = {"format": SCORES_FORMAT, "member": torch.from_numpy(scores.member),
             "nonmember": torch.from_numpy(scores.nonmember), "spurious": torch.from_numpy(mask),
             "threshold": row["attack_threshold"]}
    row.pop("n_spurious")  # the attacked count; the source's n_spurious (the same for a target) is below
    report({**row, "attack": s.attack, "target_trial_id": s.target_trial_id, "shadows_used": used,
            "n_spurious_members": int(mask.sum()), **source_columns(cfg)}, saved)
