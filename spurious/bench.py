"""Engine benchmark: our training loop against a loop shaped like the reference's, in one run.

The reference-shaped loop is a TensorDataset + shuffling DataLoader with a `.item()` host sync per step
and a test pass at batch 32 (protocol §6.3). Both run the same model, optimiser and data on the
same device; the figures are seconds per epoch (median over the timed epochs after one warm-up).
`bundle_throughput` adds bundled training (spurious.bundle) and reports models per hour::

    python -c "from spurious import bench, datasets; from spurious.config import TrainConfig; \
print(bench.bundle_throughput(TrainConfig(n_spurious=100, device='cpu'), datasets.load('fashion'), ks=(1, 8)))"
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Optional, Sequence

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from spurious import bundle, train
from spurious.config import TrainConfig
from spurious.datasets import Dataset
from spurious.planted import PlantedData, plant, plant_config


def _timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, loader: DataLoader,
                    test_loader: DataLoader | None, device: torch.device) -> None:
    """Run one epoch the way the reference does: DataLoader batches, per-step `.item()`, test at batch 32."""
    model.train()
    total_loss, total_correct = 0.0, 0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        loss = F.cross_entropy(out, yb, reduction="none").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total_loss += loss.item() * len(yb)
        total_correct += (out.argmax(1) == yb).sum().item()
    if test_loader is not None:
        model.eval()
        with torch.no_grad():
            for xb, yb in test_loader:
                out = model(xb.to(device))
                total_correct += (out.argmax(1) == yb.to(device)).sum().item()


def engine_vs_reference(cfg: TrainConfig, data: PlantedData, repeats: int = 3) -> dict[str, float]:
    """Return seconds per epoch for the reference-shaped loop and our engine, with and without metrics."""
    engine = train.Engine(cfg, data)
    ref_model = train.default_model(cfg, data).to(engine.device)
    ref_opt = train.make_optimizer(cfg, ref_model.parameters())
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=cfg.batch_size, shuffle=True)
    test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=32)
    out = {
        "reference_train_s": _timed(lambda: reference_epoch(ref_model, ref_opt, loader, None, engine.device),
                                    repeats),
        "reference_full_s": _timed(lambda: reference_epoch(ref_model, ref_opt, loader, test_loader,
                                                           engine.device), repeats),
        "engine_train_s": _timed(engine.train_epoch, repeats),
        "engine_full_s": _timed(lambda: (engine.train_epoch(), engine.evaluate()), repeats),
    }
    out["train_ratio"] = out["engine_train_s"] / out["reference_train_s"]
    out["full_ratio"] = out["engine_full_s"] / out["reference_full_s"]
    return out


def _subset(data: Dataset, train_subset: Optional[int]) -> Dataset:
    """Return `data` with only the first `train_subset` training examples (the test set is kept whole)."""
    if train_subset is None:
        return data
    return Dataset(data.name, data.x_train[:train_subset], data.y_train[:train_subset], data.x_test, data.y_test,
                   data.class_names)


def _epoch_seconds(step: Callable[[], object], device: torch.device) -> float:
    """Return the wall time of one call of `step` (one epoch), synchronising a GPU."""
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass
class _Setting:
    """One benchmarked setting: models per epoch, setup time, a one-epoch function and its timings."""

    name: str
    k: int
    setup_s: float
    step: Callable[[], object]
    device: torch.device
    times: list[float] = field(default_factory=list)

    def row(self, epochs: int) -> dict:
        """Return the setting's row; models per hour use the best epoch, for `epochs`-epoch trainings."""
        best = min(self.times)
        return {"setting": self.name, "k": self.k, "setup_s": self.setup_s, "epoch_s": best,
                "epoch_s_median": statistics.median(self.times), "models_per_hour": self.k * 3600.0 / (best * epochs)}


def _reference_setting(cfg: TrainConfig, data: PlantedData) -> _Setting:
    """Build the reference-shaped loop (DataLoader, per-step `.item()`, test pass at batch 32)."""
    start, device = time.perf_counter(), train.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = train.default_model(cfg, data).to(device)
    opt = train.make_optimizer(cfg, model.parameters())
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=cfg.batch_size, shuffle=True)
    test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=32)
    return _Setting("reference", 1, time.perf_counter() - start,
                    lambda: reference_epoch(model, opt, loader, test_loader, device), device)


def _engine_setting(name: str, make: Callable[[], Any], k: int) -> _Setting:
    """Build the engine `make()` returns (Engine or BundleEngine); its epoch is a train+evaluate `step`."""
    start = time.perf_counter()
    engine = make()
    return _Setting(name, k, time.perf_counter() - start, engine.step, engine.device)


def _warm_up(cfg: TrainConfig, data: Dataset) -> None:
    """Train one epoch on two batches so that thread pools, the allocator and kernels are warm."""
    small = plant(_subset(data, 2 * cfg.batch_size), cfg.pattern, 0, cfg.target, cfg.data_seed)
    train.Engine(cfg.replace(split="full"), small).step()


def _make_bundle(cfgs: list[TrainConfig], data: Dataset, vmap_chunk: Optional[int]) -> bundle.BundleEngine:
    """Return a BundleEngine over freshly planted members (planting counts as setup time)."""
    return bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, data), vmap_chunk)


def bundle_throughput(cfg: TrainConfig, data: Dataset, ks: Sequence[int] = (1, 8, 32, 128), epochs: int = 1,
                      train_subset: Optional[int] = None, vmap_chunk: Optional[int] = None) -> dict:
    """Return models per hour of `cfg`-shaped trainings: reference loop, Engine, and bundles of each K (issue 8).

    `data` is the clean dataset; bundle members differ by data_seed (cfg.data_seed + i). Every setting
    trains and evaluates each epoch. The settings take turns, one epoch each, for `epochs` rounds;
    `epoch_s` is a setting's fastest epoch (as timeit does: slower repeats come from other processes)
    and `epoch_s_median` its median. Models per hour assume `cfg.epochs`-epoch trainings.
    `train_subset` keeps the first N training images (the test set stays whole), for large K on small
    machines. Returns {"rows": [...], "best": setting, "recommendation": text}; rows also carry k,
    setup_s (building the engine, planting included), vs_reference and vs_engine.
    """
    data = _subset(data, train_subset)
    planted = plant_config(data, cfg)
    _warm_up(cfg, data)
    settings = [_reference_setting(cfg, planted),
                _engine_setting("engine", functools.partial(train.Engine, cfg, planted), 1)]
    for k in ks:
        cfgs = [cfg.replace(data_seed=cfg.data_seed + i) for i in range(k)]
        settings.append(_engine_setting(f"bundle_{k}", functools.partial(_make_bundle, cfgs, data, vmap_chunk), k))
    for _ in range(epochs):  # interleaved, so a burst of load elsewhere hits every setting alike
        for setting in settings:
            setting.times.append(_epoch_seconds(setting.step, setting.device))
    return _summary([s.row(cfg.epochs) for s in settings])


def _summary(rows: list[dict]) -> dict:
    """Return the rows with ratios to the reference loop and to the engine, plus the fastest setting."""
    for row in rows:
        row["vs_reference"] = row["models_per_hour"] / rows[0]["models_per_hour"]
        row["vs_engine"] = row["models_per_hour"] / rows[1]["models_per_hour"]
    best = max(rows[1:], key=lambda r: r["models_per_hour"])
    return {"rows": rows, "best": best["setting"],
            "recommendation": f"{best['setting']}: {best['models_per_hour']:,.0f} models/hour, "
                              f"{best['vs_reference']:.1f}x the reference-shaped loop and "
                              f"{best['vs_engine']:.2f}x the engine one model at a time"}
