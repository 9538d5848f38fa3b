"""`delete`: delete a source trial's planted examples from its trained model, as a Ray Tune trainable
(protocol §8), and report the result next to the retrain-from-scratch oracle.

One trial per source trial. It reads the source checkpoint through Ray's storage (a local or shared path,
or a URI), rebuilds the planted data from the checkpoint's config with the same `plant` call, and runs one
method:

- `group_influence` (protocol §8.2, §8.3): θ ← θ + g/(m − n) on the full planted training set (m examples,
  n planted). In mode `corrected` (default) g estimates (H + λI)⁻¹ Σ_z ∇ℓ(z), λ = `damping` (default the
  reference's effective damping d·s: 1.0 on Fashion-MNIST), by conjugate gradients on all m examples
  (solver `cg`, default: to a relative residual `cg_tol`, at most `cg_max_iter` products) or by LiSSA
  divided by its scale (solver `lissa`; the reference's depth, scale and repeats by default). In mode
  `reference` g is what the reference applied (protocol §11.3): one run of its un-divided recursion, with
  its extra Hessian-vector term, divided by r, about (s/r)·(H + d·s·I)⁻¹ Σ∇ℓ(z) with d = `damping` (default
  0.01). Every trial reports `ihvp_residual`, ‖(H_B + λI)h − v‖/‖v‖ on a fixed batch B of `residual_batch`
  training examples for the summed solve h (for mode reference: the first run / s against λ = d·s, the
  system its recursion is meant to solve), CG's own `cg_iterations`, `cg_residual` and `cg_converged`, the
  resolved settings as `gi_*`, and `update_norm`. A diverging LiSSA (non-finite, over `max_norm_ratio`·‖v‖,
  or with steps that grow geometrically), negative curvature met by CG, or non-finite updated parameters
  fail the trial with a one-line TrainingError that names the setting to change.
- `incremental_retraining` (protocol §8.4): train on without the planted examples from the checkpoint, for
  `retrain_epochs` (default: the source's epoch count, the reference's 70 → 140), learning rate `inherit`
  (the checkpoint's decayed rate, as the reference) or `reset`.
- `retrain`: the oracle itself, trained from scratch without the planted examples with the same seeds.

The oracle. Every result is reported next to it. A `retrain` trial is its own oracle. Other methods load
the oracle from a `retrain` deletion study of the same source when the driver found one (`--oracle`,
by default the sibling `<source>-delete-retrain`), checking that its config and deleted examples match;
otherwise they train it inside the trial (doubling the trial's cost). Running `study delete --method
retrain` first therefore trains each oracle once for all methods.

Each trial reports the spurious score, its non-target variant and clean accuracy before, after and for
the oracle, the parameter distance to the oracle before and after, the method's and the oracle's wall
time, `source_trial_id` and the source model's config; its checkpoint is the deleted model in the
training checkpoint format (plus a `deletion` record), readable by `checkpoint.model_from_checkpoint`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector

from spurious import checkpoint, config as config_lib, deletion, influence, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError, check
from spurious.planted import PlantedData
from spurious.train import TrainingError
from trainables.common import report, use_trial_threads
from trainables.sources import (planted_data, read_checkpoint, read_source,
                                source_columns)

METHODS = ("group_influence", "incremental_retraining", "retrain")
LISSA_KEYS = ("depth", "scale", "repeats", "lissa_batch_size")  # settings only solver=lissa uses
CG_KEYS = ("cg_tol", "cg_max_iter")  # settings only solver=cg uses
# DeleteSettings field -> influence.group_estimate keyword, where the names differ.
ESTIMATE_NAMES = {"lissa_batch_size": "batch_size", "cg_tol": "tol", "cg_max_iter": "max_iter"}


@dataclass(frozen=True)
class DeleteSettings:
    """One deletion trial: the method, the source trial, and the method's settings (None = default).

    Group influence (protocol §8.2): `mode` corrected or reference; `solver` cg or lissa (None: cg in
    mode corrected, lissa in mode reference, which runs only LiSSA); `damping` (λ of (H + λI) in mode
    corrected, the reference's d in mode reference); CG's `cg_tol` and `cg_max_iter`; LiSSA's `depth`,
    `scale`, `repeats`, `lissa_batch_size` and `lissa_seed`; `per_example`, `max_norm_ratio`, and
    `residual_batch`, the size of the fixed evaluation batch of the reported residual.
    """

    method: str = "retrain"
    source_trial_id: str = ""
    mode: str = "corrected"
    solver: str | None = None
    damping: float | None = None
    cg_tol: float | None = None
    cg_max_iter: int | None = None
    depth: int | None = None
    scale: float | None = None
    repeats: int | None = None
    per_example: bool = True
    lissa_batch_size: int | None = None
    lissa_seed: int = 0
    max_norm_ratio: float = influence.DEFAULT_MAX_NORM_RATIO
    residual_batch: int = influence.DEFAULT_RESIDUAL_BATCH
    retrain_epochs: int | None = None
    lr_policy: str = "inherit"

    def __post_init__(self) -> None:
        config_lib.check_types(self, "deletion setting")
        check([
            (self.method in METHODS, f"method {self.method!r} is not one of {', '.join(METHODS)}"),
            (self.lr_policy in deletion.LR_POLICIES,
             f"lr_policy {self.lr_policy!r} is not one of {', '.join(deletion.LR_POLICIES)}"),
            (self.retrain_epochs is None or self.retrain_epochs >= 1,
             f"retrain_epochs must be >= 1, got {self.retrain_epochs!r}"),
            *self._influence_rules(),
        ])

    def _influence_rules(self) -> list[tuple[bool, str]]:
        """Return the (holds, message) rules of the group-influence settings."""
        solver, unused = self.solver_name, CG_KEYS if self.solver_name == "lissa" else LISSA_KEYS
        given = [k for k in unused if getattr(self, k) is not None]
        return [
            (self.mode in influence.MODES, f"mode {self.mode!r} is not one of {', '.join(influence.MODES)}"),
            (solver in influence.SOLVERS, f"solver {self.solver!r} is not one of {', '.join(influence.SOLVERS)}"),
            (self.mode == "corrected" or solver == "lissa",
             f"mode 'reference' runs the reference's LiSSA: solver must be lissa, got {self.solver!r}"),
            (not given, f"{', '.join(given)}: only for solver={'lissa' if solver == 'cg' else 'cg'}, and this "
                        f"trial's solver is {solver}; set that solver, or leave {' and '.join(given)} out"),
            (self.damping is None or 0 <= self.damping < float("inf"),
             f"damping must be finite and >= 0, got {self.damping!r}"),
            (self.cg_tol is None or 0 < self.cg_tol < 1, f"cg_tol must be > 0 and < 1, got {self.cg_tol!r}"),
            (self.cg_max_iter is None or self.cg_max_iter >= 1, f"cg_max_iter must be >= 1, got {self.cg_max_iter!r}"),
            (self.depth is None or self.depth >= 1, f"depth must be >= 1, got {self.depth!r}"),
            (self.repeats is None or self.repeats >= 1, f"repeats must be >= 1, got {self.repeats!r}"),
            (self.scale is None or 0 < self.scale < float("inf"), f"scale must be finite and > 0, got {self.scale!r}"),
            (self.lissa_batch_size is None or self.lissa_batch_size >= 1,
             f"lissa_batch_size must be >= 1, got {self.lissa_batch_size!r}"),
            (self.max_norm_ratio > 0, f"max_norm_ratio must be > 0, got {self.max_norm_ratio!r}"),
            (self.residual_batch >= 1, f"residual_batch must be >= 1, got {self.residual_batch!r}"),
        ]

    @property
    def solver_name(self) -> str:
        """Return the solver: `solver`, or the mode's default (cg for corrected, lissa for reference)."""
        return self.solver or ("lissa" if self.mode == "reference" else "cg")

    def influence(self, dataset: str, n: int) -> dict[str, Any]:
        """Return the keywords of `influence.group_estimate` for (dataset, n): the settings given, and the
        defaults of `influence.defaults_for` (protocol §8.2) for the rest; only the solver's own keys."""
        values = {**influence.defaults_for(dataset, n, self.mode), "solver": self.solver_name, "batch_size": 1}
        keys = ("damping", *(LISSA_KEYS if self.solver_name == "lissa" else CG_KEYS))
        values.update({ESTIMATE_NAMES.get(k, k): getattr(self, k) for k in keys if getattr(self, k) is not None})
        drop = ("tol", "max_iter") if self.solver_name == "lissa" else ("depth", "scale", "repeats", "batch_size")
        return {k: v for k, v in values.items() if k not in drop}


def settings(config: Mapping[str, Any]) -> DeleteSettings:
    """Return the validated settings of a deletion trial's config (unknown keys raise)."""
    return config_lib.from_values(DeleteSettings, dict(config), "deletion setting")


def _group_influence(s: DeleteSettings, state: dict, cfg: TrainConfig, data: PlantedData, before):
    chosen = s.influence(cfg.dataset, len(data.spurious_idx))
    idx = torch.as_tensor(data.spurious_idx, device=data.x_train.device)
    generator = torch.Generator(device=data.x_train.device).manual_seed(s.lissa_seed)
    after, stats = influence.group_influence(
        before, data.x_train[idx], data.y_train[idx], data.x_train, data.y_train, per_example=s.per_example,
        generator=generator, max_norm_ratio=s.max_norm_ratio, residual_batch=s.residual_batch,
        chunk=cfg.eval_batch_size, **chosen)
    if not bool(torch.isfinite(parameters_to_vector(after.parameters())).all()):
        raise TrainingError("the group-influence update made the parameters non-finite; raise the damping "
                            "(or, with solver=lissa, the scale)")
    new_state = {**state, "model": {k: v.detach().cpu() for k, v in after.state_dict().items()},
                 "spurious_idx": torch.zeros(0, dtype=torch.int64)}
    extra = {f"gi_{k}": v for k, v in chosen.items()}
    extra.update(stats, update_norm=deletion.parameter_distance(before, after))
    return after, new_state, extra


def _incremental(s: DeleteSettings, state: dict, cfg: TrainConfig, data: PlantedData, before):
    epochs = s.retrain_epochs or cfg.epochs
    result = deletion.incremental_retrain(state, data, epochs, s.lr_policy)
    return result.model, result.state, {"retrain_epochs": epochs, "lr_policy": s.lr_policy,
                                        "train_acc_after": result.final.get("train_acc", float("nan"))}


def _retrain(s: DeleteSettings, state: dict, cfg: TrainConfig, data: PlantedData, before):
    result = deletion.retrain_oracle(cfg, data)
    return result.model, result.state, {"train_acc_after": result.final.get("train_acc", float("nan"))}


METHOD_FUNCTIONS = {"group_influence": _group_influence, "incremental_retraining": _incremental,
                    "retrain": _retrain}


def load_oracle(path: str, state: dict, data: PlantedData) -> tuple[torch.nn.Module, float]:
    """Return the oracle model of a `retrain` deletion checkpoint and its training time, after checking that
    it was trained with the source's config without the source's planted examples."""
    oracle = read_checkpoint(path)
    record = oracle.get("deletion") or {}
    deleted = np.sort(np.asarray(record.get("deleted_idx", []), np.int64))
    if record.get("method") != "retrain":
        raise SpuriousError(f"oracle checkpoint {path!r} is not from a retrain deletion study")
    if oracle.get("config") != state["config"] or not np.array_equal(deleted, np.sort(data.spurious_idx)):
        raise SpuriousError(f"oracle checkpoint {path!r} was trained with another config or deleted other "
                            "examples than this source trial; pass --oracle train")
    model = checkpoint.model_from_checkpoint(oracle, data.input_shape, data.num_classes)
    return model.to(data.x_train.device), float(record.get("wall_time_s", float("nan")))


def _oracle(s: DeleteSettings, oracle_path: str | None, state: dict, cfg: TrainConfig, data: PlantedData,
            after: torch.nn.Module, method_time: float) -> tuple[torch.nn.Module, dict]:
    if s.method == "retrain":
        return after, {"oracle_from": "self", "oracle_time_s": method_time}
    if oracle_path:
        model, seconds = load_oracle(oracle_path, state, data)
        return model, {"oracle_from": "loaded", "oracle_time_s": seconds, "oracle_checkpoint": oracle_path}
    start = time.perf_counter()
    model = deletion.retrain_oracle(cfg, data).model
    return model, {"oracle_from": "trained", "oracle_time_s": time.perf_counter() - start}


def delete(config: Mapping[str, Any], datasets: Mapping[str, Any], sources: Mapping[str, dict]) -> None:
    """Run one deletion on the source trial `config['source_trial_id']` and report it with its checkpoint.

    `sources` maps a source trial id to {"checkpoint": checkpoint directory (path or URI), "file": the
    checkpoint file in it (default: model 0), "oracle": a retrain study's checkpoint directory or None};
    it and `datasets` come through `tune.with_parameters`.
    """
    s = settings(config)
    use_trial_threads()
    if s.source_trial_id not in sources:
        raise SpuriousError(f"source trial {s.source_trial_id!r} is not among this study's sources")
    source = sources[s.source_trial_id]
    state = read_source(source)
    cfg, data = planted_data(state, datasets)
    if len(data.spurious_idx) == 0:
        raise SpuriousError(f"source trial {s.source_trial_id} has no planted examples: nothing to delete")
    data = data.to(train.resolve_device(cfg.device))
    before = checkpoint.model_from_checkpoint(state, data.input_shape, data.num_classes).to(data.x_train.device)
    start = time.perf_counter()
    after, new_state, extra = METHOD_FUNCTIONS[s.method](s, state, cfg, data, before)
    method_time = time.perf_counter() - start
    oracle, oracle_info = _oracle(s, source.get("oracle"), state, cfg, data, after, method_time)
    row = deletion.deletion_report(before, after, oracle, data, method_time, cfg.tau, cfg.eval_batch_size)
    record = {"method": s.method, "source_trial_id": s.source_trial_id, "settings": asdict(s),
              "deleted_idx": torch.as_tensor(np.asarray(data.spurious_idx, np.int64)), "wall_time_s": method_time}
    report({**row, **extra, **oracle_info, "method": s.method, "source_trial_id": s.source_trial_id,
            "source_epoch": int(state.get("epoch", 0)), "n_deleted": len(data.spurious_idx),
            **source_columns(cfg)}, {**new_state, "deletion": record})
