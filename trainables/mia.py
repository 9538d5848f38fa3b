"""`mia_attack`: a membership-inference attack on one target model of a `mia-train` study, or on the models
of one deletion trial, as a Ray Tune trainable (protocol §9; the reference's test-set bug is fixed, see
protocol §11.5 and spurious/mia.py).

One trial per (target, attack). The evaluation examples are the target's membership pool: its training
quarter (members, the planted spurious examples among them, patterned as trained) then its test quarter
(non-members). Reference models come from the same study (`study mia` matches them):

- offline shadows (`split=mia_shadow`, clean, the target's dataset, data seed and training recipe): subset
  0 trains on the shadow quarter, subset k ≥ 1 on a random half of the shadow pool (protocol §9.1); none
  has seen the target's pool, so all are OUT there. Used by `loss`, `shadow`, `lira` and `rmia`.
- online shadows (`split=mia_online`, also the target's pattern, count and class): random halves of the
  target's own pool, so every evaluation example is IN for about half of them. Used by `lira_online` and
  `rmia_online`.

Every decision threshold is calibrated on a shadow model, never on the target's labels (protocol §9.6): the
first reference model (lowest subset) plays the target, on its own pool, attacked with the other reference
models, and the threshold that maximises its attack accuracy is applied to the target. The `shadow` attack's
logistic regression is trained on shadow 0's own quarters and decides at log-odds > 0. Accuracies at the
target-label-optimal threshold are reported too, named `*_oracle`.

With online shadows the trial also measures per-example vulnerability (protocol §9.7): each online shadow in
turn is the target, attacked with the others; an example's TPR at a fixed FPR is the fraction of the models
that hold it which flag it. The planted examples' values, and the mean over the other examples, are
reported; the per-example arrays are in the checkpoint.

A target trained with DP-SGD (protocol §10.5) is attacked with shadows trained the same way (`study mia`
matches them), and its row carries the guarantee its training reported at its last epoch (`privacy`):
`dp_epsilon` at `dp_delta_used`, and the bound for its n planted images together, `dp_group_epsilon` and
`dp_group_delta` (in deletion mode the original model's, prefixed `original_`); a non-DP target has none.

Deletion mode (`study mia --from <delete experiment>`, protocol §9.8): the target is a deletion trial; the original model
(the deletion's source), the deleted model and the retrain oracle are attacked with the same shadows and
threshold, and every metric is reported per role (`original_*`, `deleted_*`, `retrained_*`, the last the
retrain-from-scratch oracle; `*_oracle` keeps meaning "at the target-label-optimal threshold"); the planted
examples are the forget set (`spurious_*` = forget set against the non-members).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch

from spurious import checkpoint, config as config_lib, metrics as metrics_lib, mia, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError, check
from spurious.planted import PlantedData, membership_pool, training_rows
from trainables.common import dataset_for, report, use_trial_threads
from trainables.sources import planted_data, read_checkpoint, read_source, source_columns

SCORES_FORMAT = "mia-scores-2"
ROLES = ("original", "deleted", "retrained")  # the retrained model is the deletion's retrain-from-scratch oracle
VULNERABILITY_FPRS = {"1pct": 0.01, "0_1pct": 0.001}
# The target's DP guarantee as its training reported it (`train.Engine.privacy`, protocol §10.5).
PRIVACY_KEYS = ("dp_epsilon", "dp_delta_used", "dp_group_epsilon", "dp_group_delta")
POPULATION_STREAM = 0x726D69  # "rmi": the RMIA population draw's own random stream


@dataclass(frozen=True)
class MiaSettings:
    """One attack trial: the attack, the target trial, how many offline and online shadow models to use
    (0 = all), LiRA's variance rule, the FPR rule of TPR at fixed FPR, and RMIA's γ, offline a and
    population size."""

    attack: str = "loss"
    target_trial_id: str = ""
    shadows: int = 0
    online_shadows: int = 0
    lira_variance: str = "auto"
    fpr_rule: str = "lt"
    rmia_gamma: float = 1.0
    rmia_offline_a: float = 0.3
    rmia_population: int = 2000
    eval_batch_size: int = 2000

    def __post_init__(self) -> None:
        config_lib.check_types(self, "membership-inference setting")
        check([(self.attack in mia.ATTACKS, f"attack {self.attack!r} is not one of {', '.join(mia.ATTACKS)}"),
               (self.lira_variance in mia.LIRA_VARIANCES,
                f"lira_variance {self.lira_variance!r} is not one of {', '.join(mia.LIRA_VARIANCES)}"),
               (self.fpr_rule in mia.FPR_RULES,
                f"fpr_rule {self.fpr_rule!r} is not one of {', '.join(mia.FPR_RULES)}"),
               (self.shadows >= 0, f"shadows must be >= 0 (0 = all), got {self.shadows!r}"),
               (self.online_shadows >= 0, f"online_shadows must be >= 0 (0 = all), got {self.online_shadows!r}"),
               (self.rmia_gamma > 0, f"rmia_gamma must be > 0, got {self.rmia_gamma!r}"),
               (0 <= self.rmia_offline_a <= 1, f"rmia_offline_a must be in [0, 1], got {self.rmia_offline_a!r}"),
               (self.rmia_population >= 1, f"rmia_population must be >= 1, got {self.rmia_population!r}"),
               (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size!r}")])


def settings(config: Mapping[str, Any]) -> MiaSettings:
    """Return the validated settings of an attack trial's config (unknown keys raise)."""
    return config_lib.from_values(MiaSettings, dict(config), "membership-inference setting")


def needs(attack: str) -> str:
    """Return which reference models `attack` needs: "offline" (mia_shadow) or "online" (mia_online)."""
    return "online" if attack in mia.ONLINE_ATTACKS else "offline"


def min_references(attack: str) -> int:
    """Return how many reference models `attack` needs: one for `loss` and `shadow` (the model their threshold
    is calibrated or learnt on), two for the others (one to calibrate on, attacked with the rest)."""
    return 1 if attack in ("loss", "shadow") else 2


# ------------------------------------------------------------------------------------------ pools and models

@dataclass(frozen=True)
class Pool:
    """Evaluation examples: images (N, C, H, W), labels (N,), and how many of the first rows are the first
    quarter (the members of a target or of shadow 0)."""

    x: torch.Tensor
    y: torch.Tensor
    first: int


@dataclass(frozen=True)
class Reference:
    """A reference (shadow) model: its config and its model."""

    cfg: TrainConfig
    model: torch.nn.Module


def _target_pool(data: PlantedData) -> Pool:
    return Pool(torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test]), len(data.y_train))


def _shadow_pool(cfg: TrainConfig, datasets: Mapping[str, Any], device) -> Pool:
    """Return the shadow pool of `cfg`'s membership split (clean images), shadow-train quarter first."""
    data = dataset_for(datasets, cfg.dataset)
    x_all, y_all = torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test])
    idx, first = membership_pool("mia_shadow", len(y_all), cfg.data_seed)
    rows = torch.from_numpy(idx)
    return Pool(x_all[rows].to(device), y_all[rows].to(device), first)


def membership(cfg: TrainConfig, pool: Pool) -> np.ndarray:
    """Return which rows of `pool` (the pool of `cfg`'s own split) model `cfg` trained on (bool (N,))."""
    rows = training_rows(cfg.split, cfg.subset, len(pool.y), cfg.data_seed)
    mask = np.zeros(len(pool.y), bool)
    if rows is None:
        mask[:pool.first] = True
    else:
        mask[rows] = True
    return mask


def privacy(state: Mapping[str, Any]) -> dict[str, float]:
    """Return the privacy guarantee a training checkpoint's model was trained under, as its last epoch reported
    it (the checkpoint's history): `dp_epsilon` at `dp_delta_used` and the planted group's bound
    `dp_group_epsilon`, `dp_group_delta`; {} for a model trained without DP-SGD."""
    history = state.get("history") or [{}]
    return {k: float(history[-1][k]) for k in PRIVACY_KEYS if k in history[-1]}


def _load(entry: Mapping[str, Any], data: PlantedData, device) -> tuple[dict, torch.nn.Module]:
    state = read_source(entry)
    model = checkpoint.model_from_checkpoint(state, data.input_shape, data.num_classes).to(device).eval()
    return state, model


def _references(s: MiaSettings, entries: list[dict], split: str, data: PlantedData, device) -> list[Reference]:
    limit = s.online_shadows if split == "mia_online" else s.shadows
    used = entries[:limit] if limit else entries
    out = []
    for entry in used:
        state, model = _load(entry, data, device)
        cfg = config_lib.from_dict(state["config"])
        if cfg.split != split:
            raise SpuriousError(f"checkpoint {entry['checkpoint']!r} is not a {split} model (split {cfg.split!r})")
        out.append(Reference(cfg, model))
    return out


class Logits:
    """Model logits (N, C) on a pool and the per-example statistics the attacks use, each computed once per
    (model, pool): `phi` (LiRA's logit-scaled confidence) and `prob` (RMIA's true-label probability)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.cache = batch_size, {}

    def __call__(self, model: torch.nn.Module, pool: Pool) -> np.ndarray:
        key = (id(model), id(pool))
        if key not in self.cache:
            self.cache[key] = metrics_lib.logits(model, pool.x, self.batch_size).cpu().double().numpy()
        return self.cache[key]

    def statistic(self, name: str, model: torch.nn.Module, pool: Pool) -> np.ndarray:
        """Return `phi` or `prob` (N,) of `model` on `pool`."""
        key = (name, id(model), id(pool))
        if key not in self.cache:
            function = mia.scaled_confidence if name == "phi" else mia.true_label_probability
            self.cache[key] = function(self(model, pool), pool.y.cpu().numpy())
        return self.cache[key]


# ------------------------------------------------------------------------------------------ scoring

def population(members: np.ndarray, size: int, seed: int, protect: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Return (the RMIA population rows, the member rows left out with them), both sorted: `size` of the
    non-member rows (at most half of them) drawn from `default_rng([seed, POPULATION_STREAM])`, and as many
    member rows, never one marked in `protect` (the planted examples), drawn from the same generator. Both are
    left out of the evaluation, so members and non-members stay equally many and chance accuracy stays 0.5
    (protocol §9.3). `members` is a bool mask over the pool."""
    rng = np.random.default_rng([seed, POPULATION_STREAM])
    nonmembers = np.flatnonzero(~members)
    z = np.sort(rng.permutation(nonmembers)[:min(size, len(nonmembers) // 2)])
    keep = members if protect is None else members & ~protect
    dropped = np.sort(rng.permutation(np.flatnonzero(keep))[:len(z)])
    return z, dropped


def attack_scores(s: MiaSettings, logits: Logits, pool: Pool, target: torch.nn.Module, refs: list[torch.nn.Module],
                  refs_in: np.ndarray, z_rows: np.ndarray) -> np.ndarray:
    """Return membership scores (N,) of model `target` on `pool` for the threshold attacks (`loss`, `lira`,
    `lira_online`, `rmia`, `rmia_online`). `refs` are the reference models and `refs_in` (K, N) their
    membership in the pool; `z_rows` the RMIA population rows. Rows with no usable reference observation
    score NaN."""
    attack = s.attack
    if attack == "loss":
        return mia.loss_scores(logits(target, pool), pool.y.cpu().numpy())
    if not refs:
        raise SpuriousError(f"the {attack} attack needs at least one reference model")
    name = "phi" if attack.startswith("lira") else "prob"
    value = logits.statistic(name, target, pool)
    values = np.stack([logits.statistic(name, r, pool) for r in refs])
    if attack == "lira":
        return mia.lira_offline_scores(value, values, ~refs_in, s.lira_variance)
    if attack == "lira_online":
        return mia.lira_online_scores(value, values, refs_in, s.lira_variance)
    if attack == "rmia_online":
        return np.asarray(mia.rmia_scores(value, values, value[z_rows], values[:, z_rows], in_mask_x=refs_in,
                                          in_mask_z=refs_in[:, z_rows], gamma=s.rmia_gamma), np.float64)
    out = ~refs_in  # offline RMIA: Pr_OUT(x), the mean over the references that did not train on x
    seen = out.any(0)
    p_out = ((values * out).sum(0) / np.maximum(out.sum(0), 1))[None, :]
    z_rows = z_rows[seen[z_rows]]
    scores = np.full(len(value), np.nan)
    scores[seen] = mia.rmia_scores(value[seen], p_out[:, seen], value[z_rows], p_out[:, z_rows],
                                   gamma=s.rmia_gamma, offline_a=s.rmia_offline_a)
    return scores


def _calibration(s: MiaSettings, refs: list[Reference], pool: Pool, logits: Logits) -> float:
    """Return the threshold calibrated on the first reference model: its scores on its own pool, attacked
    with the other references, and the accuracy-maximising threshold on its known membership."""
    pseudo, others = refs[0], refs[1:]
    if s.attack != "loss" and not others:
        raise SpuriousError(f"the {s.attack} attack needs at least 2 reference models (one to calibrate the "
                            f"threshold on, attacked with the others); this target has {len(refs)}")
    members = membership(pseudo.cfg, pool)
    others_in = np.stack([membership(r.cfg, pool) for r in others]) if others else np.zeros((0, len(pool.y)), bool)
    z, dropped = population(members, s.rmia_population, pseudo.cfg.data_seed)
    scores = attack_scores(s, logits, pool, pseudo.model, [r.model for r in others], others_in, z)
    keep = np.isfinite(scores)
    if s.attack.startswith("rmia"):
        keep[z] = keep[dropped] = False
    if not (keep & members).any() or not (keep & ~members).any():
        raise SpuriousError(f"cannot calibrate the {s.attack} threshold: too few reference models "
                            f"({len(refs)}) to score the calibration model's members and non-members")
    return mia.calibrate_threshold(scores[keep & members], scores[keep & ~members])


def _vulnerability(s: MiaSettings, refs: list[Reference], pool: Pool, logits: Logits,
                   planted: np.ndarray) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Return per-example vulnerability over the online references (each the target in turn, attacked with
    the others): mean TPR of the planted examples and of the other examples at each FPR of
    VULNERABILITY_FPRS, and the per-example arrays."""
    ins = np.stack([membership(r.cfg, pool) for r in refs])
    scores = np.full(ins.shape, np.nan)
    for j, ref in enumerate(refs):
        others = [k for k in range(len(refs)) if k != j]
        z, _ = population(ins[j], s.rmia_population, ref.cfg.data_seed + j)
        row = attack_scores(s, logits, pool, ref.model, [refs[k].model for k in others], ins[others], z)
        if s.attack.startswith("rmia"):
            row[z] = np.nan
        scores[j] = row
    out, arrays = {}, {"vulnerability_n_in": torch.from_numpy(ins.sum(0))}
    for name, fpr in VULNERABILITY_FPRS.items():
        tpr, _ = mia.per_example_tpr(scores, ins, fpr, s.fpr_rule)
        arrays[f"vulnerability_tpr_at_{name}_fpr"] = torch.from_numpy(np.asarray(tpr, np.float64))
        out[f"planted_tpr_at_{name}_fpr"] = float(np.nanmean(tpr[planted])) if planted.any() else float("nan")
        out[f"other_examples_tpr_at_{name}_fpr"] = float(np.nanmean(tpr[~planted]))
    out["vulnerability_models"] = len(refs)
    return out, arrays


def _shadow_scores(s: MiaSettings, refs: list[Reference], shadow_pool: Pool, target: np.ndarray,
                   labels: np.ndarray, logits: Logits) -> tuple[np.ndarray, float]:
    """Return the reference's shadow attack (protocol §9.3) trained on the subset-0 shadow's own quarters."""
    own = refs[0]
    if own.cfg.subset != 0:
        raise SpuriousError("the shadow attack needs the subset-0 shadow model (trained on the shadow quarter)")
    shadow_logits = logits(own.model, shadow_pool)
    y, first = shadow_pool.y.cpu().numpy(), shadow_pool.first
    shadow = mia.SplitLogits(shadow_logits[:first], y[:first], shadow_logits[first:], y[first:])
    result = mia.shadow_attack(mia.SplitLogits(target, labels, target[:0], labels[:0]), shadow)
    return np.asarray(result.member, np.float64), float(result.threshold)


def score_model(s: MiaSettings, model: torch.nn.Module, pool: Pool, refs: list[Reference],
                refs_pool_in: np.ndarray, shadow_pool: Optional[Pool], logits: Logits,
                z: np.ndarray, dropped: np.ndarray) -> tuple[np.ndarray, Optional[float]]:
    """Return one model's scores on `pool` (NaN where unusable: for RMIA the population `z` and the members
    `dropped` with it), and the attack's own threshold when it has one (the shadow attack's)."""
    if s.attack == "shadow":
        return _shadow_scores(s, refs, shadow_pool, logits(model, pool), pool.y.cpu().numpy(), logits)
    scores = attack_scores(s, logits, pool, model, [r.model for r in refs], refs_pool_in, z)
    if s.attack.startswith("rmia"):
        scores = scores.copy()
        scores[z] = scores[dropped] = np.nan
    return scores, None


def evaluate(s: MiaSettings, scores: np.ndarray, first: int, planted: np.ndarray,
             threshold: float) -> dict[str, float]:
    """Return the attack's metrics on a pool's scores: members are rows < `first`, the planted ones marked
    in `planted` (N,); rows with NaN scores (no reference observation, or the RMIA population) are left out
    and counted in `n_dropped`."""
    keep = np.isfinite(scores)
    members, nonmembers = scores[:first][keep[:first]], scores[first:][keep[first:]]
    row = mia.evaluate_attack(members, nonmembers, planted[:first][keep[:first]], threshold, fpr_rule=s.fpr_rule)
    row["n_dropped"] = int((~keep).sum())
    return row


def _delete_roles(entry: Mapping[str, Any], state: dict, original: dict, data: PlantedData,
                  device) -> dict[str, torch.nn.Module]:
    """Return {role: model} of a deletion trial: the source (`original`), the `deleted` model and the
    retrain-from-scratch oracle (`retrained`), when the deletion has one."""
    record = state.get("deletion") or {}
    deleted = np.sort(np.asarray(record.get("deleted_idx", []), np.int64))
    if not np.array_equal(deleted, np.sort(np.asarray(data.spurious_idx, np.int64))):
        raise SpuriousError(f"deletion checkpoint {entry['checkpoint']!r} deleted {len(deleted)} examples, not the "
                            f"source's {len(data.spurious_idx)} planted ones")

    def model_of(st):
        return checkpoint.model_from_checkpoint(st, data.input_shape, data.num_classes).to(device).eval()
    roles = {"original": model_of(original), "deleted": model_of(state)}
    if record.get("method") == "retrain":
        roles["retrained"] = roles["deleted"]
    elif entry.get("oracle"):
        roles["retrained"] = model_of(read_checkpoint(entry["oracle"]))
    return roles


def mia_attack(config: Mapping[str, Any], datasets: Mapping[str, Any], targets: Mapping[str, dict]) -> None:
    """Attack the target `config['target_trial_id']` with `config['attack']`; report metrics and scores.

    `targets` maps a target trial id to {"checkpoint": directory (path or URI), "file": file in it,
    "shadows": [{"trial_id", "subset", "seed", "checkpoint", "file"}, ...] (offline, subset 0 first),
    "online": [...] (online shadows), and in deletion mode "original": the source entry and "oracle": a
    retrain checkpoint or None}; it and `datasets` come through `tune.with_parameters`.
    """
    s = settings(config)
    use_trial_threads()
    if s.target_trial_id not in targets:
        raise SpuriousError(f"target trial {s.target_trial_id!r} is not among this study's targets")
    entry = targets[s.target_trial_id]
    deletion_mode = "original" in entry
    state = read_source(entry)
    original = read_source(entry["original"]) if deletion_mode else state
    cfg, data = planted_data(original, datasets)
    if cfg.split != "mia_target":
        raise SpuriousError(f"trial {s.target_trial_id} is not a target model (split {cfg.split!r})")
    device = train.resolve_device(cfg.device)
    data = data.to(device)
    pool = _target_pool(data)
    planted = np.zeros(len(pool.y), bool)
    planted[np.asarray(data.spurious_idx, np.int64)] = True
    logits = Logits(s.eval_batch_size)
    kind = needs(s.attack)
    refs = _references(s, list(entry.get("online" if kind == "online" else "shadows", [])),
                       "mia_online" if kind == "online" else "mia_shadow", data, device)
    if not refs:
        raise SpuriousError(f"the {s.attack} attack needs {kind} shadow models, and target {s.target_trial_id} "
                            "has none")
    refs_in = (np.stack([membership(r.cfg, pool) for r in refs]) if kind == "online"
               else np.zeros((len(refs), len(pool.y)), bool))
    calibration_pool = pool if kind == "online" else _shadow_pool(cfg, datasets, device)
    threshold = None if s.attack == "shadow" else _calibration(s, refs, calibration_pool, logits)
    members = np.arange(len(pool.y)) < pool.first
    z, dropped = population(members, s.rmia_population, cfg.data_seed, protect=planted)
    models = _delete_roles(entry, state, original, data, device) if deletion_mode else {
        "target": checkpoint.model_from_checkpoint(state, data.input_shape, data.num_classes).to(device).eval()}
    row, saved = {}, {"format": SCORES_FORMAT, "first": pool.first, "planted": torch.from_numpy(planted)}
    for role, model in models.items():
        scores, own = score_model(s, model, pool, refs, refs_in, calibration_pool, logits, z, dropped)
        used = own if threshold is None else threshold
        metrics = evaluate(s, scores, pool.first, planted, used)
        prefix = "" if role == "target" else f"{role}_"
        row.update({f"{prefix}{k}": v for k, v in metrics.items()})
        saved[f"{prefix}scores"] = torch.from_numpy(scores)
        saved[f"{prefix}threshold"] = used
    if kind == "online" and not deletion_mode:
        vulnerability, arrays = _vulnerability(s, refs, pool, logits, planted)
        row.update(vulnerability)
        saved.update(arrays)
    if deletion_mode:
        row["deletion_method"] = str((state.get("deletion") or {}).get("method", ""))
    row.update({f"{'original_' if deletion_mode else ''}{k}": v for k, v in privacy(original).items()})
    row.update(attack=s.attack, target_trial_id=s.target_trial_id, shadows_used=len(refs),
               n_spurious_members=int(planted.sum()), roles=",".join(models), **source_columns(cfg))
    report(row, saved)
