"""Bundled training: K small models of one architecture trained in lock-step in one process (issues 8, 15).

The reference grids are thousands of 70-epoch trainings of tiny models; one model per process pays
Python, dispatch and (on a GPU) kernel launches per model and step. A bundle stacks the K members'
parameters (`torch.func` `stack_module_state`) into (K, ...) tensors and runs the forward and backward
passes of several members at once, so each operation does the work of many models:

- CPU (default: passes of CPU_CHUNK = 8 members): for Flatten/Linear/ReLU models (`spurious.stacked_mlp`)
  each layer is one `torch.baddbmm` over (members, B, D) activations and (members, D_out, D_in) weights,
  with a hand-written backward (`torch.bmm`); with SGD momentum and no clipping the weight gradients are
  added straight into the momentum buffers (`baddbmm_`, buf = momentum·buf + g). Evaluation runs the
  members of a pass together too. On 2 cores this trained LargeMLP on Fashion-MNIST at 1.9-2.2x the
  engine's models per hour for K = 8 and 32, at 55-60 % of the matmul limit (`bench.bundle_throughput`,
  `bench.matmul_limit`); one member per pass had run at 0.9x. Other bundlable models run one member per
  pass on the CPU by default.
- GPU (default: one pass of all K members): `functional_call` under `vmap`, so every kernel does K
  models' work.
- `vmap_chunk=1`: each member runs its own plain model, pass by pass, the very kernels `Engine` runs.

The optimisers update the stacked tensors with `torch._foreach_*` ops (`_StackedSGD`, `_StackedAdam`).
Each member keeps its own planted data (data_seed, pattern, n_spurious, target), seed, lr, l2,
grad_clip, noise_sigma and tau; the members must agree on the keys of `compatible_key` (architecture,
epochs, batch size, optimiser type, momentum, augmentation, dataset, split and DP-SGD's noise multiplier). Example::

    from spurious import bundle, datasets
    from spurious.config import TrainConfig
    cfgs = [TrainConfig(n_spurious=100, data_seed=s, epochs=3) for s in range(8)]
    engine = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, datasets.load("fashion")))
    results = engine.fit(lambda rows, snapshot: print([r["spurious_score"] for r in rows]))

Equivalence with separate runs: per member, the model init (`torch.manual_seed(seed)` then
`models.build`), the shuffling, noise and aug01 draws (a generator seeded with `seed`, drawn in
`Engine`'s order), the loss, the SGD/Adam arithmetic, the `train.lr_at` schedule, divergence handling
and the checkpoint format are those of `train.Engine`. With one member per pass (`vmap_chunk=1`) the
results are bit-identical to Engine's. Batched matmuls and vmap change float rounding only: the matmuls
block differently for some shapes (on the 2-core Xeon measured, batch 128 matched Engine bit for bit,
96 and 64 did not), and fused SGD computes momentum·buf + g inside the matmul and adds L2 after it.
tests/test_bundle.py bounds it on small data (observed over 21 steps: metrics within 5e-7, parameters
within 3e-8 for SGD, 7e-6 for Adam). Training amplifies such differences over many steps: after 3 epochs on full
Fashion-MNIST (1,407 steps) metrics differed by up to 2e-3 and parameters by up to 4e-2, batched and
vmapped passes alike, so bundled and separate runs agree statistically, not bit for bit.
Only models without dropout, BatchNorm or buffers can be bundled (dropout under vmap cannot draw the
masks separate runs draw); in the registry those are the MLPs, where the reference grids are.

DP-SGD members (`spurious.dp`) are trained batched on the batched-matmul path only (Flatten/Linear/ReLU
models, `batched` on: the CPU default; `dp_batched`): each member draws its own ⌊N/B⌋ Poisson batches from
its own generator at the start of the epoch, then per step its input noise and its DP noise (one draw per
parameter, in parameter order), exactly as `train.Engine._private_epoch` does. The members' batches differ
in size, so a step pads them to the largest with a row mask (padding has zero loss weight, hence zero δ,
zero norm and no clipped contribution; an empty batch adds noise only); the per-example norms are ghost
norms taken for all members at once (`stacked_mlp.StackedMLP.ghost_clipped_sum`: (K, B, in) inputs and
(K, B, out) output gradients give (K, B) norms and (K, out, in) clipped sums by `torch.bmm`), each member's
noise is added and divided by its qN, and the stacked optimiser steps as for any bundle. A DP bundle equals
K separate DP Engines of the same seeds up to float rounding (tests/test_dp.py), and its members share the
training pool as other bundles do. The vmap path (batched=False, the GPU default) refuses DP members, and
`lockstep` steps such runs as separate Engines (`train.Lockstep`, one copy of the data each). Speed: a DP
epoch of 8 LargeMLPs on full Fashion-MNIST (batch 256, σ = 1, C = 1) took 11.8 s batched and 11.4-12.5 s as 8
Engines on one thread of the 2-core Xeon (a busy machine; two threads stalled on the other load and were not
measurable): the ghost-norm matmuls and the noise draws (335k normals per member and step) are the work, which
batching does not shrink (padding to the largest of 8 batches adds ~9 % rows), so a DP bundle saves memory and trials,
not time.

Memory model: members share one clean training tensor (`PlantedRows.base_x`; the dataset's own tensor
for the full split, one per data seed for membership splits) and each stores only its planted rows,
so a bundle holds one (N, C, H, W) pool plus the planted rows of all members (60k Fashion: 188 MB + 3 KB
per planted image), a (K, N) int64 row table, and the deduplicated test sets (31 MB per distinct
patterned test set: one per pattern for patch patterns, one per data seed for noise patterns).
Parameters and optimiser state are K x 2 (SGD with momentum; K x 1 without) or K x 3 (Adam) x the model
size (LargeMLP: 1.34 MB); a pass adds its members' gradients (none for fused SGD) and activations
(members x batch x widths floats; evaluation: members x eval_batch_size x width, 16 MB for 8 LargeMLPs
at 2,000 images).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from spurious import checkpoint, datasets, dp, metrics, models, stacked_mlp, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from spurious.planted import PlantedData, PlantedRows, plant_config, plant_config_rows, split_arrays

# The config keys every member of a bundle shares; all other keys may differ per member. DP-SGD's σ is among
# them, so a DP run never shares a bundle with a non-DP one; DP bundles train batched only on the batched-matmul
# path (module docstring), and `lockstep` steps other DP runs as separate Engines.
BUNDLE_KEYS = ("dataset", "split", "model", "augmentation", "epochs", "batch_size", "optimizer", "momentum",
               "eval_batch_size", "device", "val_size", "dp_noise_multiplier")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
# Members per batched-matmul pass on the CPU by default: 4 to 16 trained LargeMLP equally fast on 2 cores,
# 24 and 32 evaluated about 40 % slower (issue 15; `spurious.bench.bundle_throughput` with vmap_chunk set).
CPU_CHUNK = 8

BundleSnapshot = Callable[[], list]
BundleCallback = Callable[[list, BundleSnapshot], Any]


def compatible_key(cfg: TrainConfig) -> tuple[tuple[str, Any], ...]:
    """Return the (key, value) pairs that must agree for configs to share a bundle; group configs by it."""
    values = {**cfg.to_dict(), "dataset": datasets.DATASETS.canonical(cfg.dataset),
              "model": models.parse_model_name(cfg.model).arch, "augmentation": train.augmentation_of(cfg),
              "momentum": cfg.momentum if cfg.optimizer == "sgd" else None}
    return tuple((key, values[key]) for key in BUNDLE_KEYS)


def check_compatible(cfgs: Sequence[TrainConfig]) -> None:
    """Raise a SpuriousError naming the first key on which a config disagrees with the first one."""
    if not cfgs:
        raise SpuriousError("a bundle needs at least one config")
    first = dict(compatible_key(cfgs[0]))
    for i, cfg in enumerate(cfgs[1:], 1):
        for key, value in compatible_key(cfg):
            if value != first[key]:
                raise SpuriousError(f"cannot bundle: member {i} has {key}={value!r} but member 0 has "
                                    f"{key}={first[key]!r}; bundled members must agree on {', '.join(BUNDLE_KEYS)}")


# ------------------------------------------------------------------------------------------ member data


def plant_members(cfgs: Sequence[TrainConfig], dataset: datasets.Dataset) -> list[PlantedRows]:
    """Return each config's planted data as `planted.plant_rows` makes it, without K image copies: members
    of one split share its arrays, and equal patterned test sets are kept once."""
    splits: dict[tuple[str, int], tuple] = {}
    interner, out = _Interner(), []
    for cfg in cfgs:
        train.validate_names(cfg)
        key = (cfg.split, 0 if cfg.split == "full" else cfg.data_seed, cfg.split == "mia_shadow" and cfg.subset > 0)
        if key not in splits:
            splits[key] = split_arrays(dataset, cfg.split, cfg.data_seed, cfg.subset)
        rows = plant_config_rows(dataset, cfg, splits[key])
        shared = {key: interner.intern(getattr(rows, key)) for key in ("x_test_patterned", "x_val_patterned")
                  if getattr(rows, key) is not None}
        out.append(replace(rows, **shared))
    return out


class _Interner:
    """Maps equal tensors to one shared instance (identity first, then a cheap fingerprint, then equality)."""

    def __init__(self) -> None:
        self.by_print: dict[tuple, list[torch.Tensor]] = {}

    def intern(self, t: torch.Tensor) -> torch.Tensor:
        """Return an already seen tensor equal to `t`, or `t` itself (remembered)."""
        flat = t.reshape(-1)
        key = (tuple(t.shape), t.dtype, float(flat.sum(dtype=torch.float64)),
               float(flat[::4099].sum(dtype=torch.float64)))
        same = self.by_print.setdefault(key, [])
        for seen in same:
            if seen is t or torch.equal(seen, t):
                return seen
        same.append(t)
        return t


class _TrainPool:
    """All members' training images in one pool: the distinct base tensors, then every planted row.

    `table[k, i]` is the pool row of member k's training example i (its base rows less its validation rows,
    in order), so a batch of every member is one gather, `x[table.gather(1, perms)[:, a:b]]`.
    """

    def __init__(self, members: Sequence[PlantedRows], device: torch.device) -> None:
        bases: list[list] = []  # [x, y, dirty rows (set), owned]
        which = [self._assign(bases, m) for m in members]
        offsets = np.cumsum([0] + [len(b[1]) for b in bases])
        n_rows = np.cumsum([offsets[-1]] + [len(m.planted_idx) for m in members])
        tables = []
        for k, m in enumerate(members):
            table = torch.arange(len(m.base_y), dtype=torch.long) + int(offsets[which[k]])
            table[torch.from_numpy(m.planted_idx)] = torch.arange(int(n_rows[k]), int(n_rows[k + 1]))
            tables.append(table[torch.from_numpy(m.train_rows)] if m.selects_rows else table)
        self.x = torch.cat([b[0] for b in bases] + [m.planted_x for m in members]).to(device)
        self.y = torch.cat([b[1] for b in bases] + [m.base_y[torch.from_numpy(m.planted_idx)] for m in members])
        self.y, self.table = self.y.to(device), torch.stack(tables).to(device)

    @staticmethod
    def _assign(bases: list[list], m: PlantedRows) -> int:
        """Return the index of a base `m` can share (filling rows it knows clean), adding one if none fits."""
        planted = set(m.planted_idx.tolist())
        for i, (x, y, dirty, owned) in enumerate(bases):
            if x is m.base_x and not dirty and not len(m.base_dirty):
                return i
            if x.shape == m.base_x.shape and torch.equal(y, m.base_y):
                differ = set((x != m.base_x).flatten(1).any(1).nonzero().flatten().tolist())
                if differ <= dirty | planted | set(m.base_dirty.tolist()):
                    _fill_clean_rows(bases[i], m, planted)
                    return i
        bases.append([m.base_x, m.base_y, set(m.base_dirty.tolist()), False])
        return len(bases) - 1


def _fill_clean_rows(base: list, m: PlantedRows, planted: set) -> None:
    """Copy into the base the rows it holds dirty but member `m` holds clean (cloning the base once)."""
    fill = sorted(base[2] - planted - set(m.base_dirty.tolist()))
    if fill:
        if not base[3]:
            base[0], base[3] = base[0].clone(), True
        rows = torch.tensor(fill, dtype=torch.long)
        base[0][rows] = m.base_x[rows]
        base[2] = base[2] - set(fill)


# ------------------------------------------------------------------------------------------ optimisers


def _per_member(values: Sequence[float], device: torch.device) -> float | torch.Tensor:
    """Return the common value as a float when all members agree (torch's exact scalar path), else (K,)."""
    if all(v == values[0] for v in values):
        return float(values[0])
    return torch.tensor(values, dtype=torch.float32, device=device)


def _bcast(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """Return a (K,) per-member tensor viewed as (K, 1, ..., 1) to broadcast over `like`; floats as-is."""
    return value if isinstance(value, float) else value.view(-1, *([1] * (like.dim() - 1)))


def _add_scaled(params: list, d: list, coef: float | torch.Tensor, sign: float) -> None:
    """p += sign * coef * d for each tensor, with torch.optim's formulas for scalar and tensor coefficients."""
    if isinstance(coef, float):
        torch._foreach_add_(params, d, alpha=sign * coef)
    else:
        for p, x in zip(params, d):
            p.addcmul_(x, _bcast(coef, p), value=sign)


def _decayed(grads: list, params: list, l2: float | torch.Tensor) -> list:
    """Return the gradients with coupled L2 weight decay, as torch.optim adds it (protocol §6.1)."""
    if isinstance(l2, float):
        return grads if l2 == 0 else torch._foreach_add(grads, params, alpha=l2)
    return [g.addcmul(p, _bcast(l2, p)) for g, p in zip(grads, params)]


def _clip(grads: list, bound: float | torch.Tensor) -> None:
    """Clamp gradients element-wise to ±bound in place (clip_grad_value_; inf = no clipping)."""
    if isinstance(bound, float):
        if bound != float("inf"):
            torch._foreach_clamp_min_(grads, -bound)
            torch._foreach_clamp_max_(grads, bound)
        return
    for g in grads:
        g.clamp_(-_bcast(bound, g), _bcast(bound, g))


class _StackedSGD:
    """torch.optim.SGD (momentum, no dampening, no Nesterov, coupled L2) on stacked (K, ...) tensors."""

    def __init__(self, params: dict[str, torch.Tensor], momentum: float) -> None:
        self.momentum = momentum
        self.buf = {n: torch.zeros_like(p) for n, p in params.items()} if momentum else {}

    def views(self, index: int | slice) -> dict[str, list[torch.Tensor]]:
        """Return the optimiser state of the members `index` as views of the stacked buffers."""
        return {"buf": [b[index] for b in self.buf.values()]}

    def step(self, params: list, grads: list, state: dict, lr: float | torch.Tensor, l2: float | torch.Tensor,
             _steps: int) -> None:
        """Apply one update; a zero buffer times momentum plus d equals torch's first-step clone of d."""
        d = _decayed(grads, params, l2)
        if self.momentum:
            torch._foreach_mul_(state["buf"], self.momentum)
            torch._foreach_add_(state["buf"], d)
            d = state["buf"]
        _add_scaled(params, d, lr, -1.0)

    def step_accumulated(self, params: list, state: dict, lr: float | torch.Tensor,
                         l2: float | torch.Tensor) -> None:
        """Finish an update whose gradients were already added into the buffers (buf = momentum·buf + g): add
        the coupled L2 term to the buffers, then step; torch's arithmetic up to the order of the additions."""
        if not isinstance(l2, float) or l2 != 0:
            _add_scaled(state["buf"], params, l2, 1.0)
        _add_scaled(params, state["buf"], lr, -1.0)

    def member_state(self, k: int, names: list[str], steps: int) -> dict[int, dict]:
        """Return member k's torch.optim.SGD `state` (empty before the first step or without momentum)."""
        if not steps or not self.momentum:
            return {}
        return {i: {"momentum_buffer": self.buf[n][k].clone()} for i, n in enumerate(names)}

    def load_member(self, k: int, names: list[str], state: dict) -> None:
        """Load member k's buffers from a torch.optim.SGD `state` (missing entries: zero), in place."""
        for i, n in enumerate(names):
            if self.momentum:
                buf = state.get(i, {}).get("momentum_buffer")
                self.buf[n][k] = 0 if buf is None else buf


class _StackedAdam:
    """torch.optim.Adam (betas 0.9/0.999, eps 1e-8, coupled L2, no AMSGrad) on stacked (K, ...) tensors."""

    def __init__(self, params: dict[str, torch.Tensor], _momentum: float) -> None:
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}

    def views(self, index: int | slice) -> dict[str, list[torch.Tensor]]:
        """Return the moments of the members `index` as views of the stacked moments."""
        return {"exp_avg": [m[index] for m in self.exp_avg.values()],
                "exp_avg_sq": [v[index] for v in self.exp_avg_sq.values()]}

    def step(self, params: list, grads: list, state: dict, lr: float | torch.Tensor, l2: float | torch.Tensor,
             steps: int) -> None:
        """Apply update number `steps` (1-based), in torch's Adam order of operations."""
        (b1, b2), step = ADAM_BETAS, float(steps)
        bias1, bias2_sqrt = 1 - b1 ** step, (1 - b2 ** step) ** 0.5
        d, m, v = _decayed(grads, params, l2), state["exp_avg"], state["exp_avg_sq"]
        torch._foreach_lerp_(m, d, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, d, d, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, ADAM_EPS)
        step_size = lr / bias1
        if isinstance(step_size, float):
            torch._foreach_addcdiv_(params, m, denom, -step_size)
        else:
            for p, mi, di in zip(params, m, denom):
                p.addcmul_(mi / di, _bcast(step_size, p), value=-1)

    def member_state(self, k: int, names: list[str], steps: int) -> dict[int, dict]:
        """Return member k's torch.optim.Adam `state` (empty before the first step)."""
        if not steps:
            return {}
        return {i: {"step": torch.tensor(float(steps)), "exp_avg": self.exp_avg[n][k].clone(),
                    "exp_avg_sq": self.exp_avg_sq[n][k].clone()} for i, n in enumerate(names)}

    def load_member(self, k: int, names: list[str], state: dict) -> None:
        """Load member k's moments from a torch.optim.Adam `state` (missing entries: zero), in place."""
        for i, n in enumerate(names):
            entry = state.get(i, {})
            self.exp_avg[n][k] = entry.get("exp_avg", 0)
            self.exp_avg_sq[n][k] = entry.get("exp_avg_sq", 0)


@dataclass
class _Pass:
    """The members [a, b) of one forward/backward pass: leaf views of their parameters and optimiser state.

    The leaves share storage with the stacked tensors, so in-place updates through them update the bundle.
    A pass that runs one member's plain model, as Engine does, has views without the member axis (`index`
    is an int) and that model as `module`.
    """

    a: int
    b: int
    index: int | slice  # selects the pass's members from a stacked tensor
    params: dict[str, torch.Tensor]
    state: dict[str, list[torch.Tensor]]
    module: Optional[nn.Module] = None  # plain one-member passes: the model, its parameters being `params`

OPTIMIZERS = {"sgd": _StackedSGD, "adam": _StackedAdam}


def _check_bundlable(model: nn.Module, name: str) -> None:
    """Raise a SpuriousError if the model has dropout, BatchNorm or buffers, which bundling cannot match."""
    bad = sorted({type(m).__name__ for m in model.modules()
                  if isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))})
    if bad or any(True for _ in model.buffers()):
        what = ", ".join(bad) if bad else "buffers"
        raise SpuriousError(f"model {name!r} has {what}; bundling supports only models without dropout, "
                            f"BatchNorm or buffers (the MLPs); train it one model per process")


def _loss_and_hits(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return Engine's training loss (mean cross-entropy) and the number of correct predictions."""
    return F.cross_entropy(out, y), (out.argmax(1) == y).sum()


# ------------------------------------------------------------------------------------------ the engine


class BundleEngine:
    """Trains K compatible configs in lock-step, epoch by epoch; per member it reproduces `train.Engine`.

    `vmap_chunk` is how many members share one forward/backward pass: all of them by default on a GPU,
    where one wide pass per step keeps the device busy; CPU_CHUNK on the CPU (passes of 4 to 16 members
    trained at the same speed on 2 cores; 24 and more evaluated slower). `batched` picks how passes run:
    True (the default on the CPU unless vmap_chunk is 1; Flatten/Linear/ReLU models only) runs every
    pass, even of one member, as batched matmuls (`spurious.stacked_mlp`), so a member's arithmetic does
    not depend on its place in the bundle; False (the default on a GPU) runs passes of several members
    under vmap and passes of one member as the plain model, bit-identical to Engine (`vmap_chunk=1`).
    Within an epoch each pass runs its steps back to back; all members finish an epoch before the next
    begins, and evaluation runs a pass's members together.
    DP-SGD configs train only with batched matmuls (module docstring): each member's Poisson batches,
    padded to the step's largest, stacked ghost norms, each member's noise; the vmap path refuses them.
    A member whose training loss becomes non-finite is dropped: its rows become None and `failed`
    holds the message `Engine` would raise; the others go on (all failing raises TrainingError). Setting
    `drop_diverged = False` makes the first diverging member raise that message instead, as Engine does.
    """

    def __init__(self, cfgs: Sequence[TrainConfig], datas: Sequence[PlantedData | PlantedRows],
                 vmap_chunk: Optional[int] = None, batched: Optional[bool] = None) -> None:
        check_compatible(cfgs)
        if len(cfgs) != len(datas):
            raise SpuriousError(f"a bundle needs one data per config, got {len(cfgs)} configs and {len(datas)} datas")
        self.cfgs, self.k = list(cfgs), len(cfgs)
        self.device = train.resolve_device(cfgs[0].device)
        self.members = [PlantedRows.of(d) for d in datas]
        _check_data(self.members)
        self._init_models()
        self.stack = self._stack_of(batched, vmap_chunk)
        if dp.enabled(cfgs[0]) and self.stack is None:
            raise SpuriousError("a bundle trains DP-SGD runs only as batched matmuls (Flatten/Linear/ReLU models, "
                                "batched=True, the CPU default); `bundle.lockstep` steps others as separate Engines")
        self.chunk = max(1, min(self.k, vmap_chunk or self._default_chunk()))
        self._init_data()
        self.optimizer = OPTIMIZERS[cfgs[0].optimizer](self.params, cfgs[0].momentum)
        self.passes = self._make_passes()
        self.gens = [torch.Generator(device=self.device).manual_seed(c.seed) for c in cfgs]
        self.augment = train.augmentation_of(cfgs[0]) == "aug01"
        self.perturbed = self.augment or any(c.noise_sigma > 0 for c in cfgs)
        self.epoch, self.steps = 0, 0
        self.histories: list[list[dict]] = [[] for _ in cfgs]
        self.failed: dict[int, str] = {}

    def _init_models(self) -> None:
        """Build each member exactly as Engine does (seed, then models.build) and stack the parameters."""
        shape, classes = self.members[0].input_shape, self.members[0].num_classes
        built = []
        for cfg in self.cfgs:
            torch.manual_seed(cfg.seed)
            built.append(models.build(cfg.model, shape, classes))
        _check_bundlable(built[0], self.cfgs[0].model)
        self.template = copy.deepcopy(built[0]).to("meta")
        stacked, _ = stack_module_state(built)
        self.params = {n: p.detach().to(self.device).contiguous() for n, p in stacked.items()}
        self.names = list(self.params)

    def _stack_of(self, batched: Optional[bool], vmap_chunk: Optional[int]) -> Optional[stacked_mlp.StackedMLP]:
        """Return the batched-matmul runner when every pass runs that way (by default on the CPU for
        Flatten/Linear/ReLU models, unless vmap_chunk is 1), else None: passes of one member then run the
        plain model and passes of several run under vmap."""
        layers = stacked_mlp.linear_layers(self.template)
        if batched and layers is None:
            raise SpuriousError(f"model {self.cfgs[0].model!r} is not made of Flatten, Linear and ReLU only; "
                                "it cannot run as batched matmuls (batched=False runs it under vmap)")
        wanted = self.device.type == "cpu" and vmap_chunk != 1 if batched is None else batched
        return stacked_mlp.StackedMLP(layers) if wanted and layers is not None else None

    def _default_chunk(self) -> int:
        """Return the members per pass by default: all on a GPU; CPU_CHUNK with batched matmuls; else 1."""
        if self.device.type == "cuda":
            return self.k
        return CPU_CHUNK if self.stack is not None else 1

    def _init_data(self) -> None:
        """Pool the training rows and deduplicate the test sets; keep per-member targets and taus."""
        self.pool = _TrainPool(self.members, self.device)
        interner, self.tests = _Interner(), {}
        self.clean_ids = [self._test_id(interner, (m.x_test, m.y_test)) for m in self.members]
        self.patterned_ids = [self._test_id(interner, (m.x_test_patterned,)) for m in self.members]
        self.y_test = torch.stack([self.tests[i][1] for i in self.clean_ids])
        self.has_val = self.members[0].x_val is not None and len(self.members[0].x_val) > 0
        if self.has_val:
            self.val_ids = [self._test_id(interner, (m.x_val, m.y_val)) for m in self.members]
            self.val_patterned_ids = [self._test_id(interner, (m.x_val_patterned,)) for m in self.members]
            self.y_val = torch.stack([self.tests[i][1] for i in self.val_ids])
        self.targets = torch.tensor([m.target for m in self.members], device=self.device)
        self.taus = torch.tensor([c.tau for c in self.cfgs], dtype=torch.float32, device=self.device)

    def _test_id(self, interner: _Interner, tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
        """Return the key of a (deduplicated) test tensor tuple, moving new ones to the device."""
        shared = tuple(interner.intern(t) for t in tensors)
        key = tuple(id(t) for t in shared)  # the interner keeps the tensors alive, so ids stay unique
        if key not in self.tests:
            self.tests[key] = tuple(t.to(self.device) for t in shared)
        return key

    # ---------------------------------------------------------------- one member's computation

    def _member_loss(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return one member's mean CE loss and number of correct predictions on a batch (Engine's loss)."""
        return _loss_and_hits(functional_call(self.template, params, (x,)), y)

    def _member_logits(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        """Return one member's logits on `x`."""
        return functional_call(self.template, params, (x,))

    def _make_passes(self) -> list[_Pass]:
        """Return the forward/backward passes: `self.chunk` members each, as leaf views of the stacked tensors."""
        passes = []
        for a in range(0, self.k, self.chunk):
            b = min(a + self.chunk, self.k)
            plain = b - a == 1 and self.stack is None
            index = a if plain else slice(a, b)
            leaves = {n: p[index].detach().requires_grad_(self.stack is None) for n, p in self.params.items()}
            passes.append(_Pass(a, b, index, leaves, self.optimizer.views(index),
                                self._module_of(leaves) if plain else None))
        return passes

    def _module_of(self, leaves: dict[str, torch.Tensor]) -> nn.Module:
        """Return a model whose parameters share storage with one member's `leaves`."""
        module = copy.deepcopy(self.template)
        module.load_state_dict(leaves, assign=True)
        return module

    def _train_pass(self, p: _Pass, rows: torch.Tensor, hyper: tuple, step: int) -> tuple:
        """Run optimiser step `step` of one pass on pool `rows`; return its members' losses and hits."""
        x, y = self._batch(p, rows)
        lr, l2, clip = hyper
        if self._fuses_momentum(p, clip):
            with torch.no_grad():
                buffers = dict(zip(self.names, p.state["buf"]))
                loss, right, _ = self.stack.loss_and_grads(p.params, x, y, buffers, self.optimizer.momentum)
                self.optimizer.step_accumulated(list(p.params.values()), p.state, lr, l2)
            return loss, right
        leaves, loss, right, grads = self._gradients(p, x, y)
        with torch.no_grad():
            _clip(grads, clip)
            self.optimizer.step(leaves, grads, p.state, lr, l2, step)
        return loss.detach(), right

    def _fuses_momentum(self, p: _Pass, clip: float | torch.Tensor) -> bool:
        """Return whether a pass adds its gradients straight into SGD's momentum buffers (batched matmuls, SGD
        with momentum, no member clipping: nothing needs the bare gradient)."""
        return (self.stack is not None and isinstance(self.optimizer, _StackedSGD)
                and self.optimizer.momentum != 0 and isinstance(clip, float) and clip == float("inf"))

    def _gradients(self, p: _Pass, x: torch.Tensor, y: torch.Tensor) -> tuple[list, torch.Tensor, torch.Tensor, list]:
        """Return a pass's parameter leaves, members' losses and hits, and gradients (in `names` order)."""
        if self.stack is not None:
            with torch.no_grad():
                loss, right, named = self.stack.loss_and_grads(p.params, x, y)
            return list(p.params.values()), loss, right, [named[n] for n in self.names]
        loss, right = _loss_and_hits(p.module(x), y) if p.module else vmap(self._member_loss)(p.params, x, y)
        leaves = [p.module.get_parameter(n) for n in self.names] if p.module else list(p.params.values())
        return leaves, loss, right, list(torch.autograd.grad(loss.sum(), leaves))

    # ---------------------------------------------------------------- training

    def _batch(self, p: _Pass, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a pass's batch and labels at pool `rows`, augmented and noised per member as Engine does."""
        x = self.pool.x.index_select(0, rows.reshape(-1)).view(*rows.shape, *self.pool.x.shape[1:])
        y = self.pool.y[rows]
        if not self.perturbed:
            return x, y
        if p.module is not None:
            return self._perturb(p.a, x), y
        return torch.stack([self._perturb(k, x[i]) for i, k in enumerate(range(p.a, p.b))]), y

    def _perturb(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Return member k's batch perturbed as `train.perturb` does, drawn from the member's generator."""
        return train.perturb(x, self.gens[k], self.cfgs[k].noise_sigma, self.augment)

    @property
    def lrs(self) -> list[float]:
        """Return every member's learning rate for the current epoch (`train.lr_at`)."""
        return [train.lr_at(c, self.epoch) for c in self.cfgs]

    def _hyper(self, p: _Pass) -> tuple:
        """Return this epoch's lr, l2 and clip bound of a pass's members (floats when they agree)."""
        cfgs, inf = self.cfgs[p.a:p.b], float("inf")
        return (_per_member(self.lrs[p.a:p.b], self.device), _per_member([c.l2 for c in cfgs], self.device),
                _per_member([c.grad_clip or inf for c in cfgs], self.device))

    def train_epoch(self) -> tuple[list[float], list[float]]:
        """Run one epoch for every member; return per-member running loss and accuracy (Engine's).

        Each pass runs all its steps back to back (members are independent within an epoch), so on the
        CPU a member's weights and optimiser state stay in cache from one step to the next.
        """
        if dp.enabled(self.cfgs[0]):
            return self._private_epoch()
        n = self.pool.table.shape[1]
        perms = torch.stack([torch.randperm(n, generator=g, device=self.device) for g in self.gens])
        order = self.pool.table.gather(1, perms)
        sums = [self._train_pass_epoch(p, order[p.index], self._hyper(p)) for p in self.passes]
        self.steps += self._steps_per_epoch()
        loss_sum, correct = (torch.cat([s[i].reshape(-1) for s in sums]) for i in (0, 1))
        return (loss_sum / n).tolist(), (correct.double() / n).tolist()

    def _train_pass_epoch(self, p: _Pass, order: torch.Tensor, hyper: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one pass's steps over the epoch's `order` of pool rows; return summed losses and hits."""
        bs, shape = self.cfgs[0].batch_size, order.shape[:-1]
        loss_sum = torch.zeros(shape, device=self.device)
        correct = torch.zeros(shape, device=self.device, dtype=torch.long)
        for i, start in enumerate(range(0, order.shape[-1], bs)):
            rows = order[..., start:start + bs]
            loss, right = self._train_pass(p, rows, hyper, self.steps + i + 1)
            loss_sum += loss * rows.shape[-1]
            correct += right
        return loss_sum, correct

    def _steps_per_epoch(self) -> int:
        """Return the optimiser steps of one epoch of the bundle's training set (`train.steps_per_epoch`)."""
        n, cfg = self.pool.table.shape[1], self.cfgs[0]
        return train.steps_per_epoch(cfg, n)

    def _private_epoch(self) -> tuple[list[float], list[float]]:
        """Run one DP-SGD epoch of every member, as `train.Engine._private_epoch` runs it: each member's ⌊N/B⌋
        Poisson batches drawn from its own generator at the start of the epoch, then per step its input noise
        and its DP noise; return per-member loss and accuracy over the examples each member saw."""
        n, cfg = self.pool.table.shape[1], self.cfgs[0]
        q, steps = dp.sample_rate(cfg, n), dp.steps_per_epoch(cfg, n)
        batches = [dp.poisson_batches(n, q, steps, g) for g in self.gens]
        sums = [self._private_pass_epoch(p, batches[p.a:p.b], self._hyper(p)[:2], q * n) for p in self.passes]
        self.steps += steps
        loss_sum, correct, seen = (torch.cat([s[i] for s in sums]) for i in range(3))
        seen = seen.clamp(min=1)
        return (loss_sum / seen).tolist(), (correct.double() / seen).tolist()

    def _private_pass_epoch(self, p: _Pass, batches: list[list[torch.Tensor]], hyper: tuple,
                            expected: float) -> tuple[torch.Tensor, ...]:
        """Run one pass's DP-SGD steps on its members' Poisson `batches` (member, step: training-set rows);
        return per member the summed losses, the hits and the examples seen."""
        lr, l2 = hyper
        cfgs, members = self.cfgs[p.a:p.b], range(p.a, p.b)
        clip = _per_member([c.dp_max_grad_norm for c in cfgs], self.device)
        sigma = cfgs[0].dp_noise_multiplier
        scale = sigma * clip  # σC per member: a float when the members agree, as Engine multiplies
        loss_sum = torch.zeros(len(cfgs), device=self.device)
        correct, seen = (torch.zeros(len(cfgs), device=self.device, dtype=torch.long) for _ in range(2))
        leaves = list(p.params.values())
        for i in range(len(batches[0])):
            x, y, mask = self._private_batch(p, [b[i] for b in batches])
            sums, _, losses, logits = self.stack.ghost_clipped_sum(p.params, x, y, mask, _bcast(clip, mask))
            grads = []
            for name in self.names:  # each member's noise in its parameter order, from its own generator
                noise = torch.empty_like(p.params[name])
                for j, k in enumerate(members):  # torch.randn's draws, filled in place (torch.stack stalled on 2
                    noise[j].normal_(generator=self.gens[k])  # busy cores: 110 ms a step for 8 LargeMLPs)
                grads.append((sums[name] + _bcast(scale, noise) * noise) / expected)
            with torch.no_grad():
                self.optimizer.step(leaves, grads, p.state, lr, l2, self.steps + i + 1)
            loss_sum += losses.sum(1)
            correct += ((logits.argmax(2) == y) & mask.bool()).sum(1)
            seen += mask.sum(1).long()
        return loss_sum, correct, seen

    def _private_batch(self, p: _Pass, idx: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Return a pass's DP batch from its members' training-set rows `idx` (one tensor each, sizes differ),
        padded to the largest: inputs (members, B, ...), labels (members, B) and a mask (members, B) of 1 on
        real rows and 0 on padding (pool row 0). Each member's real rows are perturbed as Engine does."""
        width = max(len(i) for i in idx)
        rows = torch.zeros((len(idx), width), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(idx), width), dtype=self.pool.x.dtype, device=self.device)
        for j, (k, i) in enumerate(zip(range(p.a, p.b), idx)):
            rows[j, :len(i)] = self.pool.table[k, i]
            mask[j, :len(i)] = 1
        x = self.pool.x.index_select(0, rows.reshape(-1)).view(*rows.shape, *self.pool.x.shape[1:])
        if self.perturbed:
            for j, (k, i) in enumerate(zip(range(p.a, p.b), idx)):
                x[j, :len(i)] = self._perturb(k, x[j, :len(i)])
        return x, self.pool.y[rows], mask

    @torch.no_grad()
    def _logits(self, ids: list[tuple]) -> torch.Tensor:
        """Return (K, N_test, classes) logits of every member on its test tensor `ids[k]`, in eval batches."""
        out = [None] * self.k
        for key in dict.fromkeys(ids):
            members = [k for k in range(self.k) if ids[k] == key]
            for i in range(0, len(members), self.chunk):
                chunk = members[i:i + self.chunk]
                for k, z in zip(chunk, self._chunk_logits(chunk, self.tests[key][0])):
                    out[k] = z
        return torch.stack(out).float()

    def _chunk_logits(self, chunk: list[int], x: torch.Tensor) -> torch.Tensor:
        """Return (len(chunk), N, classes) logits of the members `chunk` on `x`."""
        bs = self.cfgs[0].eval_batch_size
        if len(chunk) == 1 and self.stack is None:
            params = {n: p[chunk[0]] for n, p in self.params.items()}
            return torch.cat([self._member_logits(params, x[i:i + bs]) for i in range(0, len(x), bs)])[None]
        params = {n: p[chunk] for n, p in self.params.items()}
        if self.stack is not None:
            return torch.cat([self.stack.logits(params, x[i:i + bs]) for i in range(0, len(x), bs)], dim=1)
        fn = vmap(self._member_logits, in_dims=(0, None))
        return torch.cat([fn(params, x[i:i + bs]) for i in range(0, len(x), bs)], dim=1)

    def evaluate(self) -> list[dict[str, float]]:
        """Return every member's clean and patterned test metrics (`metrics.TEST_KEYS`, protocol §4.2), and the
        same on the validation split (`metrics.VAL_KEYS`) when the members have one."""
        clean, patterned = self._logits(self.clean_ids), self._logits(self.patterned_ids)
        rows = metrics.member_metrics(clean, patterned, self.y_test, self.targets, self.taus)
        if self.has_val:
            clean, patterned = self._logits(self.val_ids), self._logits(self.val_patterned_ids)
            vals = metrics.member_metrics(clean, patterned, self.y_val, self.targets, self.taus)
            rows = [{**row, **metrics.val_metrics(val)} for row, val in zip(rows, vals)]
        n = self.pool.table.shape[1]
        return [{**row, **train.privacy(cfg, n, self.epoch, len(m.planted_idx))}
                for row, cfg, m in zip(rows, self.cfgs, self.members)]

    def step(self) -> list[Optional[dict]]:
        """Train and evaluate one epoch; return each member's metrics row (None once a member has failed)."""
        return train.step(self)

    def fit(self, on_epoch: Optional[BundleCallback] = None) -> list[train.TrainResult]:
        """Train to `epochs`, calling `on_epoch(rows, snapshot)` after every epoch; one result per member."""
        train.fit(self, on_epoch)
        states = self.snapshot()
        return [train.TrainResult(self.member_model(k), list(self.histories[k]), states[k]) for k in range(self.k)]

    # The member protocol of train.step and train.fit (Engine implements it with K = 1).
    drop_diverged = True
    train_members = train_epoch
    evaluate_members = evaluate

    def member_model(self, k: int) -> nn.Module:
        """Return member k as a standalone model (a copy of its current parameters) on the bundle's device."""
        model = copy.deepcopy(self.template)
        model.load_state_dict({n: p[k].clone() for n, p in self.params.items()}, assign=True)
        return model

    # ---------------------------------------------------------------- checkpoints

    def snapshot(self) -> list[dict]:
        """Return one checkpoint per member, each in exactly the format of `spurious.train.Engine.snapshot`."""
        return [self._member_snapshot(k) for k in range(self.k)]

    def _member_snapshot(self, k: int) -> dict:
        """Return member k's checkpoint; its optimiser dict is the one torch.optim would hold (SGD or Adam)."""
        cfg = self.cfgs[k]
        model = {n: p[k].detach().clone() for n, p in self.params.items()}
        optimizer = train.with_lr(train.make_optimizer(cfg, list(model.values())).state_dict(),
                                  train.lr_at(cfg, self.epoch))
        optimizer["state"] = self.optimizer.member_state(k, self.names, self.steps)
        return checkpoint.make(cfg.to_dict(), self.epoch, model, optimizer,
                               checkpoint.rng_state(self.gens[k], self.device), self.members[k].planted_idx,
                               self.histories[k])

    def restore(self, states: Sequence[dict]) -> None:
        """Continue from per-member checkpoints (from `snapshot` or from separate `Engine` runs) at one epoch."""
        self._check_states(states)
        for k, state in enumerate(states):
            for n in self.names:
                self.params[n][k] = state["model"][n].to(self.device)
            self.optimizer.load_member(k, self.names, {i: {key: _to(v, self.device) for key, v in s.items()}
                                                       for i, s in state["optimizer"]["state"].items()})
            self.gens[k].set_state(state["rng"]["generator"])
            self.histories[k] = [dict(r) for r in state["history"]]
        checkpoint.restore_global_rng(states[0]["rng"], self.device)
        self.epoch = int(states[0]["epoch"])
        self.steps = self.epoch * self._steps_per_epoch()
        self.failed = {}

    def _check_states(self, states: Sequence[dict]) -> None:
        """Raise a SpuriousError unless there is one same-epoch checkpoint of the right config per member."""
        if len(states) != self.k:
            raise SpuriousError(f"restore needs {self.k} member checkpoints, got {len(states)}")
        for k, state in enumerate(states):
            checkpoint.check(state, f"member {k}: checkpoint")
            mine, theirs = self.cfgs[k].to_dict(), state["config"]
            differ = sorted(key for key in mine if key != "device" and theirs.get(key) != mine[key])
            if differ:
                raise SpuriousError(f"member {k}: checkpoint config differs on {', '.join(differ)}")
        epochs = {int(s["epoch"]) for s in states}
        if len(epochs) != 1:
            raise SpuriousError(f"bundle members must resume from the same epoch, got epochs {sorted(epochs)}")


def _to(value: Any, device: torch.device) -> Any:
    """Return tensors moved to `device`; other values unchanged."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _check_data(members: Sequence[PlantedRows]) -> None:
    """Raise a SpuriousError unless all members' data have the same shapes and sizes."""
    def shape_of(m: PlantedRows) -> dict[str, Any]:
        return {"input shape": m.input_shape, "training-set size": len(m.train_rows), "test-set size": len(m.y_test),
                "number of classes": m.num_classes, "patterned test-set size": len(m.x_test_patterned),
                "validation-set size": 0 if m.x_val is None else len(m.x_val)}

    first = shape_of(members[0])
    for i, m in enumerate(members[1:], 1):
        for key, value in shape_of(m).items():
            if value != first[key]:
                raise SpuriousError(f"cannot bundle: member {i} has {key} {value} but member 0 has {first[key]}")


def train_bundle(cfgs: Sequence[TrainConfig], datas: Sequence[PlantedData | PlantedRows],
                 on_epoch: Optional[BundleCallback] = None, resume: Optional[Sequence[dict]] = None,
                 vmap_chunk: Optional[int] = None, batched: Optional[bool] = None) -> list[train.TrainResult]:
    """Train the configs as one bundle; `on_epoch(rows, snapshot)` sees every epoch; one result per member."""
    engine = BundleEngine(cfgs, datas, vmap_chunk, batched)
    if resume is not None:
        engine.restore(resume)
    return engine.fit(on_epoch)


def lockstep(cfgs: Sequence[TrainConfig], dataset: datasets.Dataset) -> "BundleEngine | train.Lockstep":
    """Return the configs' runs stepped together: a BundleEngine when the model can be bundled, else a
    `train.Lockstep` of Engines; both go through `train.step` and `train.fit` with the same results."""
    check_compatible(cfgs)
    try:
        check_bundlable(cfgs[0], tuple(dataset.x_train.shape[1:]), dataset.num_classes)
    except SpuriousError:
        return train.Lockstep([train.Engine(c, plant_config(dataset, c))
                               for c in cfgs])
    return BundleEngine(cfgs, plant_members(cfgs, dataset))


def check_bundlable(cfg: TrainConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Raise a SpuriousError if `cfg.model` cannot be bundled (dropout, BatchNorm or buffers), or, for a DP-SGD
    config, if the bundle would not run it as batched matmuls (`dp_batched`)."""
    model = models.build(cfg.model, input_shape, num_classes)
    _check_bundlable(model, cfg.model)
    if dp.enabled(cfg) and not dp_batched(cfg, model):
        raise SpuriousError("DP-SGD runs are bundled only as batched matmuls (Flatten/Linear/ReLU models on the "
                            "CPU); others are stepped as separate Engines (train.Lockstep)")


def dp_batched(cfg: TrainConfig, model: Optional[nn.Module] = None) -> bool:
    """Return whether a bundle of `cfg` would run as batched matmuls by default, the one way a bundle trains
    DP-SGD members (per-example ghost norms of every member at once): a Flatten/Linear/ReLU model
    (`stacked_mlp.linear_layers`; `model`, else built for a 1x28x28 input) on the CPU."""
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    if not device.startswith("cpu") and device != "auto":
        return False
    if model is None:
        try:
            model = models.build(cfg.model, (1, 28, 28), 10)
        except SpuriousError:
            return False
    return stacked_mlp.linear_layers(model) is not None
