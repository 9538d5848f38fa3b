"""Engine benchmark: our training loop against a loop shaped like the reference's, in one run.

The reference-shaped loop is a TensorDataset + shuffling DataLoader with a `.item()` host sync per step
and a test pass at batch 32 (PAPER_SPEC §7.1–7.2). Both run the same model, optimiser and data on the
same device; the figures are seconds per epoch (median over the timed epochs after one warm-up).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from spurious import train
from spurious.config import TrainConfig
from spurious.planted import PlantedData


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
