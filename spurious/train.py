"""The training engine: a pure function from config + data + model factory to a trained model (protocol §6).

All data lives on the device as tensors; batches are gathered with a random permutation from a
dedicated generator, so there is no DataLoader, no per-sample Python and no per-step host sync.
Example (no Ray involved)::

    from spurious import config, train
    cfg = config.TrainConfig(pattern="s3", n_spurious=100, epochs=3)
    result = train.run(cfg, on_epoch=lambda metrics, snapshot: print(metrics))
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spurious import checkpoint, datasets, dp, metrics, models, patterns
from spurious.config import AUGMENTATIONS, TrainConfig
from spurious.errors import SpuriousError
from spurious.planted import PlantedData, plant_config

GAMMA = 0.1  # the reference's MultiStepLR decay at each milestone (protocol §6.2)
# The reference's MultiStepLR milestone table, keyed by the largest epoch count it applies to (protocol §6.2).
MILESTONES = ((30, (15, 25)), (40, (20, 30)), (50, (25, 40)), (60, (30, 50)), (70, (40, 50, 60)),
              (80, (40, 60, 70)), (120, (50, 90, 110)), (140, (60, 100, 120)), (160, (40, 80, 120, 140)),
              (200, (80, 140, 180)))

ModelFactory = Callable[[TrainConfig, PlantedData], torch.nn.Module]
Snapshot = Callable[[], dict]
EpochCallback = Callable[[dict, Snapshot], Any]


class TrainingError(RuntimeError):
    """Training broke down (non-finite loss or parameters); the message is one line."""


@dataclass
class TrainResult:
    """The trained model, the per-epoch metrics and the final checkpoint state."""

    model: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    state: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        """Return the last epoch's metrics."""
        return self.history[-1] if self.history else {}


def milestones(epochs: int) -> list[int]:
    """Return the reference's MultiStepLR milestones for a run of `epochs` epochs (protocol §6.2)."""
    for limit, steps in MILESTONES:
        if epochs <= limit:
            return list(steps)
    return [60, 120]


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Return the learning rate of epoch `epoch` (0-based, i.e. after `epoch` completed epochs): `cfg.lr`
    times GAMMA once per milestone of `milestones(cfg.epochs)` reached, multiplied in the order and with the
    arithmetic of torch's MultiStepLR, so the value is bit-identical to the scheduler's (protocol §6.2)."""
    lr = cfg.lr
    for milestone in milestones(cfg.epochs):
        if milestone <= epoch:
            lr = lr * GAMMA  # MultiStepLR's `lr * gamma ** count` with count 1: milestones are distinct
    return lr


def with_lr(optimizer_state: dict, lr: float) -> dict:
    """Return a torch optimizer `state_dict()` with every param group's lr set to `lr` (a shallow copy)."""
    return {**optimizer_state, "param_groups": [{**g, "lr": lr} for g in optimizer_state["param_groups"]]}


def resolve_device(name: str) -> torch.device:
    """Return the torch device for `name`; `auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpuriousError(f"device {name!r} was asked for but no CUDA GPU is available; use cpu or auto")
    return torch.device(name)


def validate_names(cfg: TrainConfig) -> None:
    """Raise a SpuriousError if the dataset, model or pattern name is unknown."""
    datasets.DATASETS.canonical(cfg.dataset)
    aug = models.parse_model_name(cfg.model).augmentation
    if aug not in (None, *AUGMENTATIONS):
        raise SpuriousError(f"augmentation {aug!r} in model name {cfg.model!r} is not one of "
                            f"{', '.join(AUGMENTATIONS)}")
    patterns.get(cfg.pattern)


def prepare(cfg: TrainConfig, root: str | Path | None = None) -> PlantedData:
    """Return the planted data for `cfg`, loading the dataset from `root` or the usual places."""
    validate_names(cfg)
    return plant_config(datasets.load(cfg.dataset, root), cfg)


def default_model(cfg: TrainConfig, data: PlantedData) -> torch.nn.Module:
    """Build `cfg.model` from the model registry for the data's input shape."""
    return models.build(cfg.model, data.input_shape, data.num_classes)


def augmentation_of(cfg: TrainConfig) -> str:
    """Return the augmentation in force: the config's, or the one named in a reference model string."""
    if cfg.augmentation != "none":
        return cfg.augmentation
    return models.parse_model_name(cfg.model).augmentation or "none"


def aug01(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding 4 and random horizontal flip, per image, as tensor ops (protocol §5.3)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx = (torch.randint(0, 9, (2, n), generator=gen, device=x.device))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    flip = torch.rand(n, generator=gen, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def perturb(x: torch.Tensor, gen: torch.Generator, noise_sigma: float, augment: bool) -> torch.Tensor:
    """Return a training batch x (B, C, H, W) after aug01 (when `augment`) and then N(0, noise_sigma²) input
    noise (when noise_sigma > 0), both drawn from `gen` in that order (protocol §5.3, §6.3); x itself when neither."""
    if augment:
        x = aug01(x, gen)
    if noise_sigma > 0:
        x = x + noise_sigma * torch.randn(x.shape, generator=gen, device=x.device)
    return x


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """Return SGD (momentum, no Nesterov) or Adam, with coupled L2 weight decay `cfg.l2` (protocol §6.1)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.l2)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.l2)


class Engine:
    """Holds the model, optimiser and RNGs of one run; `fit` trains it epoch by epoch.

    `schedule(epoch)` gives each epoch's learning rate (`lr_at` by default; deletion replaces it).
    """

    # How a DP epoch computes the clipped per-example sum (`spurious.dp.noisy_gradient`'s method): "auto" takes
    # ghost norms for Linear-only models; the DP benchmark (`spurious.bench.dp_overhead`) sets "ghost" or "vmap".
    dp_method = "auto"

    def __init__(self, cfg: TrainConfig, data: PlantedData, model_factory: Optional[ModelFactory] = None):
        self.cfg, self.device = cfg, resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = (model_factory or default_model)(cfg, data).to(self.device)
        if dp.enabled(cfg):
            dp.check_model(self.model, cfg.model)
        self.data = data.to(self.device)
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.schedule: Callable[[int], float] = partial(lr_at, cfg)
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.augment = augmentation_of(cfg) == "aug01"
        self.epoch, self.history, self.failed = 0, [], {}

    def train_epoch(self) -> tuple[float, float]:
        """Run one epoch over the shuffled patterned training set at `schedule(epoch)`'s learning rate (a
        DP-SGD epoch of Poisson-sampled batches when the config says so: `spurious.dp`); return the running
        loss and accuracy."""
        cfg, x, y = self.cfg, self.data.x_train, self.data.y_train
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.epoch)
        self.model.train()
        if dp.enabled(cfg):
            return self._private_epoch()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for idx in torch.randperm(len(y), generator=self.gen, device=self.device).split(cfg.batch_size):
            xb, yb = perturb(x[idx], self.gen, cfg.noise_sigma, self.augment), y[idx]
            out = self.model(xb)
            loss = F.cross_entropy(out, yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_value_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            loss_sum += loss.detach() * len(yb)
            correct += (out.argmax(1) == yb).sum()
        return (loss_sum / len(y)).item(), (correct.double() / len(y)).item()

    def _private_epoch(self) -> tuple[float, float]:
        """Run one DP-SGD epoch (`spurious.dp`): ⌊N/B⌋ Poisson-sampled batches from the run's generator, each
        step's gradient clipped per example and noised; return the loss and accuracy over the examples seen."""
        cfg, x, y = self.cfg, self.data.x_train, self.data.y_train
        n, q = len(y), dp.sample_rate(cfg, len(y))
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        for idx in dp.poisson_batches(n, q, dp.steps_per_epoch(cfg, n), self.gen):
            xb, yb = perturb(x[idx], self.gen, cfg.noise_sigma, self.augment), y[idx]
            self.optimizer.zero_grad(set_to_none=True)
            losses, logits = dp.noisy_gradient(self.model, xb, yb, cfg.dp_noise_multiplier, cfg.dp_max_grad_norm,
                                               q * n, self.gen, method=self.dp_method)
            self.optimizer.step()
            loss_sum += losses.sum()
            correct += (logits.argmax(1) == yb).sum() if len(yb) else 0
            seen += len(yb)
        return (loss_sum / max(seen, 1)).item(), (correct.double() / max(seen, 1)).item()

    def privacy(self) -> dict[str, float]:
        """Return the privacy guarantee of a DP run after the epochs trained so far (`spurious.dp`;
        protocol §10.5), else {}: `dp_epsilon` at `dp_delta_used` (δ: `cfg.dp_delta`, or 1/N), and the
        group-privacy bound for the k planted training images (k = `len(data.spurious_idx)`, at least 1):
        `dp_group_epsilon` = kε and `dp_group_delta` = k·e^{(k−1)ε}·δ (capped at 1: a bound of δ = 1 says
        nothing)."""
        return privacy(self.cfg, len(self.data.y_train), self.epoch, len(self.data.spurious_idx))

    def evaluate(self) -> dict[str, float]:
        """Return the clean and patterned test metrics of the current model (protocol §4.2), the same on the
        validation split (`metrics.VAL_KEYS`) when the data has one, and the privacy guarantee of a DP run
        (`privacy`)."""
        return {**metrics.evaluate_data(self.model, self.data, self.data.target, self.cfg.tau,
                                        self.cfg.eval_batch_size), **self.privacy()}

    def step(self) -> dict:
        """Train and evaluate one epoch; return its metrics (raises TrainingError on divergence)."""
        return step(self)[0]

    def fit(self, on_epoch: Optional[EpochCallback] = None) -> TrainResult:
        """Train up to `cfg.epochs`, calling `on_epoch(metrics, snapshot)` after every epoch."""
        fit(self, None if on_epoch is None else lambda rows, snapshot: on_epoch(rows[0], snapshot))
        return TrainResult(self.model, list(self.history), self.snapshot())

    # The member protocol of `step` and `fit` with K = 1 (BundleEngine implements it for K members).
    drop_diverged = False  # a lone run that diverges raises TrainingError

    @property
    def cfgs(self) -> list[TrainConfig]:
        """Return the configs of the members: this run's."""
        return [self.cfg]

    @property
    def lrs(self) -> list[float]:
        """Return the members' learning rates for the current epoch."""
        return [self.schedule(self.epoch)]

    @property
    def histories(self) -> list[list[dict]]:
        """Return the members' metric histories (this run's `history`)."""
        return [self.history]

    def train_members(self) -> tuple[list[float], list[float]]:
        """Return `train_epoch`'s running loss and accuracy as one-member lists."""
        loss, acc = self.train_epoch()
        return [loss], [acc]

    def evaluate_members(self) -> list[dict[str, float]]:
        """Return `evaluate`'s metrics as a one-member list."""
        return [self.evaluate()]

    def snapshot(self) -> dict:
        """Return a checkpoint (`spurious.checkpoint`'s format): model, optimiser, epoch, RNGs, config, history."""
        optimizer = with_lr(self.optimizer.state_dict(), self.schedule(self.epoch))
        return checkpoint.make(self.cfg.to_dict(), self.epoch, self.model.state_dict(), optimizer,
                               checkpoint.rng_state(self.gen, self.device), self.data.spurious_idx, self.history)

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint made by `snapshot` (same config); an old one's "scheduler" is ignored."""
        checkpoint.check(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        checkpoint.restore_global_rng(state["rng"], self.device)
        self.gen.set_state(state["rng"]["generator"])
        self.epoch, self.history = int(state["epoch"]), [dict(r) for r in state["history"]]


def privacy(cfg: TrainConfig, n_train: int, epochs: int, n_planted: int) -> dict[str, float]:
    """Return `Engine.privacy`'s guarantee of a run of `cfg` on `n_train` examples after `epochs` epochs, the
    group being its `n_planted` planted images (at least 1); {} when the run is not DP."""
    if not dp.enabled(cfg):
        return {}
    steps = epochs * dp.steps_per_epoch(cfg, n_train)
    target_delta = dp.delta(cfg, n_train)
    eps = dp.epsilon(cfg.dp_noise_multiplier, dp.sample_rate(cfg, n_train), steps, target_delta)
    group_eps, group_delta = dp.group_epsilon(eps, target_delta, max(1, n_planted))
    return dict(zip(metrics.PRIVACY_KEYS, (eps, target_delta, group_eps, group_delta)))


def steps_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    """Return the optimiser steps of one training epoch on `n_train` examples: ⌈N / B⌉ shuffled batches, or
    DP-SGD's ⌊N / B⌋ Poisson batches (`dp.steps_per_epoch`)."""
    return dp.steps_per_epoch(cfg, n_train) if dp.enabled(cfg) else -(-n_train // cfg.batch_size)


def divergence_message(loss: float, epoch: int, lr: float, cfg: TrainConfig) -> str:
    """Return the one-line message for a training loss that became non-finite in epoch `epoch` (1-based)."""
    return (f"training loss became {loss} at epoch {epoch} (lr={lr}, optimizer={cfg.optimizer}); "
            "lower the learning rate")


def step(engine) -> list[Optional[dict]]:
    """Train and evaluate one epoch of every member of `engine`; return one metrics row per member.

    `engine` is an Engine (K = 1) or a BundleEngine (K members): it has `cfgs`, `epoch`, `lrs`, `failed`,
    `histories`, `drop_diverged`, `train_members()` and `evaluate_members()`. A member whose training loss
    is not finite raises TrainingError, or, where `drop_diverged`, is recorded in `failed` and gets None rows
    from then on; TrainingError is raised when no member is left. Rows hold "epoch", "epoch_lr" (the
    schedule's rate that epoch), TRAIN_KEYS, TEST_KEYS (`spurious.metrics`) and "epoch_time_s" (seconds,
    training and evaluation of all members).
    """
    start, lrs = time.perf_counter(), engine.lrs
    losses, accs = engine.train_members()
    for k, loss in enumerate(losses):
        if k not in engine.failed and not np.isfinite(loss):
            message = divergence_message(loss, engine.epoch + 1, lrs[k], engine.cfgs[k])
            if not engine.drop_diverged:
                raise TrainingError(message)
            engine.failed[k] = message
    if len(engine.failed) == len(losses):
        raise TrainingError(f"every bundle member diverged; member 0: {engine.failed[0]}")
    engine.epoch += 1
    tests, seconds = engine.evaluate_members(), time.perf_counter() - start
    rows: list[Optional[dict]] = []
    for k, history in enumerate(engine.histories):
        row = None if k in engine.failed else {"epoch": engine.epoch, "epoch_lr": lrs[k], "train_loss": losses[k],
                                               "train_acc": accs[k], **tests[k], "epoch_time_s": seconds}
        if row is not None:
            history.append(row)
        rows.append(row)
    return rows


def fit(engine, on_epoch: Optional[Callable[[list, Callable], Any]] = None) -> None:
    """Run `step(engine)` up to the members' epoch count, calling `on_epoch(rows, engine.snapshot)` after
    every epoch with copies of the rows (None for a dropped member); the one epoch loop of the library."""
    while engine.epoch < engine.cfgs[0].epochs:
        rows = step(engine)
        if on_epoch is not None:
            on_epoch([None if r is None else dict(r) for r in rows], engine.snapshot)


class Lockstep:
    """K Engines stepped together, epoch by epoch, through `step` and `fit`: the member protocol over separate
    runs, for models a bundle cannot hold (dropout, BatchNorm) and DP-SGD runs a bundle does not batch
    (`bundle.dp_batched`). Member k is exactly `engines[k]`'s run."""

    drop_diverged = False

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.engines, self.failed = list(engines), {}

    @property
    def epoch(self) -> int:
        """Return the epochs completed (the same for every member)."""
        return self.engines[0].epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        for engine in self.engines:
            engine.epoch = value

    @property
    def cfgs(self) -> list[TrainConfig]:
        """Return the members' configs."""
        return [e.cfg for e in self.engines]

    @property
    def lrs(self) -> list[float]:
        """Return the members' learning rates for the current epoch."""
        return [e.schedule(e.epoch) for e in self.engines]

    @property
    def histories(self) -> list[list[dict]]:
        """Return the members' metric histories."""
        return [e.history for e in self.engines]

    def train_members(self) -> tuple[list[float], list[float]]:
        """Run one epoch of every member; return their running losses and accuracies."""
        losses, accs = zip(*(e.train_epoch() for e in self.engines))
        return list(losses), list(accs)

    def evaluate_members(self) -> list[dict[str, float]]:
        """Return every member's test metrics."""
        return [e.evaluate() for e in self.engines]

    def member_model(self, k: int) -> torch.nn.Module:
        """Return member k's model (the engine's own: do not train it)."""
        return self.engines[k].model

    def snapshot(self) -> list[dict]:
        """Return one checkpoint per member."""
        return [e.snapshot() for e in self.engines]

    def restore(self, states: Sequence[dict]) -> None:
        """Continue every member from its checkpoint."""
        if len(states) != len(self.engines):
            raise SpuriousError(f"restore needs {len(self.engines)} member checkpoints, got {len(states)}")
        for engine, state in zip(self.engines, states):
            engine.restore(state)


def train(cfg: TrainConfig, data: PlantedData, model_factory: Optional[ModelFactory] = None,
          on_epoch: Optional[EpochCallback] = None, resume: Optional[dict] = None) -> TrainResult:
    """Train a model on `data` per `cfg`; `on_epoch(metrics, snapshot)` sees every epoch (protocol §6)."""
    engine = Engine(cfg, data, model_factory)
    if resume is not None:
        engine.restore(resume)
    return engine.fit(on_epoch)


def run(cfg: TrainConfig, on_epoch: Optional[EpochCallback] = None, root: str | Path | None = None,
        resume: Optional[dict] = None) -> TrainResult:
    """Load and plant the data for `cfg`, then train; the library's one-call entry point."""
    return train(cfg, prepare(cfg, root), on_epoch=on_epoch, resume=resume)
