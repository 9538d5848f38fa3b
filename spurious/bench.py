"""Engine benchmark: our training loop against a loop shaped like the reference's, in one run.

The reference-shaped loop is a TensorDataset + shuffling DataLoader with a `.item()` host sync per step
and a test pass at batch 32 (protocol §6.3). Both run the same model, optimiser and data on the
same device; the figures are seconds per epoch (median over the timed epochs after one warm-up).
`bundle_throughput` adds bundled training (spurious.bundle) and reports models per hour, and the share of
this machine's matmul speed at the training shapes each setting reached (`matmul_limit`, `epoch_flops`)::

    python -c "from spurious import bench, datasets; from spurious.config import TrainConfig; \
print(bench.bundle_throughput(TrainConfig(n_spurious=100, device='cpu'), datasets.load('fashion'), ks=(1, 8)))"
    python -c "from spurious import bench; \
print(bench.matmul_limit(bench.linear_shapes('large_mlp', (1, 28, 28)), k=8))"
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

from spurious import bundle, models, stacked_mlp, train
from spurious.config import TrainConfig
from spurious.datasets import Dataset
from spurious.errors import SpuriousError
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


# ------------------------------------------------------------------------------------------ matmul limit


def linear_shapes(model: str, input_shape: tuple[int, int, int], num_classes: int = 10) -> list[tuple[int, int]]:
    """Return (D_in, D_out) of each Linear layer of `model` (a Flatten/Linear/ReLU model, e.g. `large_mlp`:
    [(784, 256), (256, 256), (256, 256), (256, 10)] on 1×28×28 input); SpuriousError for other models."""
    built = models.build(model, input_shape, num_classes)
    layers = stacked_mlp.linear_layers(built)
    if layers is None:
        raise SpuriousError(f"model {model!r} is not made of Flatten, Linear and ReLU only; no matmul FLOP count")
    params = dict(built.named_parameters())
    return [(params[weight].shape[1], params[weight].shape[0]) for weight, _ in layers]


def step_matmuls(shapes: Sequence[tuple[int, int]], batch: int) -> list[tuple[str, int, int, int]]:
    """Return the matmuls of one training step of one model as (name, M, K, N), an (M, K) @ (K, N) product each:
    per layer the forward (B, D_in) @ (D_in, D_out), the weight gradient (D_out, B) @ (B, D_in) and, except for
    the first layer (its input needs no gradient), the input gradient (B, D_out) @ (D_out, D_in)."""
    out = []
    for i, (d_in, d_out) in enumerate(shapes):
        out += [(f"layer{i}.forward", batch, d_in, d_out), (f"layer{i}.weight_grad", d_out, batch, d_in)]
        if i:
            out.append((f"layer{i}.input_grad", batch, d_out, d_in))
    return out


def epoch_flops(shapes: Sequence[tuple[int, int]], n_train: int, n_eval: int) -> dict[str, float]:
    """Return the matmul FLOPs (2·M·K·N per product) of one epoch of one model: "train", the `step_matmuls` of
    every training example (forward, weight and input gradients: ≈ 2.4× the forward's for LargeMLP rather than
    3×, as the first layer's input gradient is never computed); "eval", forward passes over `n_eval` images
    (clean and patterned test sets, and validation sets if any); "total". Biases, ReLU and the loss are left
    out (under 0.2 % for LargeMLP). LargeMLP on full Fashion-MNIST: 96.3e9 + 13.4e9 FLOPs."""
    train_flops = n_train * sum(2 * m * k * n for _, m, k, n in step_matmuls(shapes, 1))
    eval_flops = n_eval * sum(2 * d_in * d_out for d_in, d_out in shapes)
    return {"train": float(train_flops), "eval": float(eval_flops), "total": float(train_flops + eval_flops)}


def matmul_limit(shapes: Sequence[tuple[int, int]], batch: int = 128, k: int = 1, repeats: int = 50,
                 device: str | torch.device = "cpu") -> dict:
    """Return this machine's float32 matmul speed at the training shapes (`step_matmuls`), measured with torch.

    k = 1 times plain `torch.mm` products (one model); k > 1 times `torch.bmm` over (k, M, K) @ (k, K, N), the
    shapes of a batched bundle pass of k members. The products take turns for `repeats` rounds after one
    warm-up round, and each keeps its fastest time (load from other processes only slows). Returns
    {"k", "batch", "rows": [{"name", "shape", "gflops"}], "gflops"}: "gflops" (GFLOP/s, 1e9 FLOPs per second)
    is the step's FLOPs over the sum of its products' best times, the speed a training step could reach if it
    did nothing but its matmuls.
    """
    gen, lead = torch.Generator().manual_seed(0), (k,) if k > 1 else ()
    products = [(name, torch.rand(*lead, m, kk, generator=gen).to(device), torch.rand(*lead, kk, n, generator=gen)
                 .to(device)) for name, m, kk, n in step_matmuls(shapes, batch)]
    product = torch.bmm if k > 1 else torch.mm
    for _, a, b in products:  # warm-up: thread pool, allocator, caches
        _synced(product(a, b))
    best = [float("inf")] * len(products)
    for _ in range(repeats):
        for i, (_, a, b) in enumerate(products):
            start = time.perf_counter()
            _synced(product(a, b))
            best[i] = min(best[i], time.perf_counter() - start)
    rows, flops = [], [2 * a.numel() * b.shape[-1] for _, a, b in products]
    for (name, a, b), seconds, count in zip(products, best, flops):
        shape = " @ ".join("x".join(map(str, t.shape)) for t in (a, b))
        rows.append({"name": name, "shape": shape, "gflops": count / seconds / 1e9})
    return {"k": k, "batch": batch, "rows": rows, "gflops": sum(flops) / sum(best) / 1e9}


def _synced(out: torch.Tensor) -> torch.Tensor:
    """Return `out` after waiting for a GPU to finish it."""
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out


# ------------------------------------------------------------------------------------------ throughput


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
    """One benchmarked setting: models per epoch, setup time, a one-epoch function and its timings; `chunk` is
    the members per forward/backward pass (1: one model's matmuls; k > 1: batched (k, B, D) matmuls)."""

    name: str
    k: int
    setup_s: float
    step: Callable[[], object]
    device: torch.device
    chunk: int = 1
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
    return _Setting(name, k, time.perf_counter() - start, engine.step, engine.device, getattr(engine, "chunk", 1))


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
    setup_s (building the engine, planting included), vs_reference, vs_engine, and the matmul speed
    reached against this machine's limit (`gflops`, `limit_gflops`, `limit_pct`: see `_add_flops`).
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
    rows = [s.row(cfg.epochs) for s in settings]
    _add_flops(rows, settings, cfg, planted)
    return _summary(rows)


def _add_flops(rows: list[dict], settings: list[_Setting], cfg: TrainConfig, data: PlantedData) -> None:
    """Add to each row its achieved matmul speed `gflops` (the epoch's `epoch_flops` of its k models over its
    best epoch, GFLOP/s), `limit_gflops` (`matmul_limit` at its pass's shapes, measured now) and `limit_pct`
    (100 · gflops / limit_gflops); NaN for models that are not Flatten/Linear/ReLU stacks."""
    try:
        shapes = linear_shapes(cfg.model, data.input_shape, data.num_classes)
    except SpuriousError:
        for row in rows:
            row.update(gflops=float("nan"), limit_gflops=float("nan"), limit_pct=float("nan"))
        return
    n_test, n_val = len(data.y_test), 0 if data.x_val is None else len(data.x_val)
    limits: dict[int, float] = {}
    for row, setting in zip(rows, settings):
        n_eval = n_test if setting.name == "reference" else 2 * (n_test + n_val)  # the reference scores clean only
        flops = epoch_flops(shapes, len(data.y_train), n_eval)["total"] * setting.k
        if setting.chunk not in limits:
            limits[setting.chunk] = matmul_limit(shapes, cfg.batch_size, setting.chunk, device=setting.device)["gflops"]
        row["gflops"] = flops / row["epoch_s"] / 1e9
        row["limit_gflops"] = limits[setting.chunk]
        row["limit_pct"] = 100.0 * row["gflops"] / row["limit_gflops"]


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


# ------------------------------------------------------------------------------------------ DP-SGD


@dataclass(frozen=True)
class DPSetting:
    """One timed setting of `dp_overhead`: `model`; `method` None for the non-DP epoch, else `spurious.dp`'s
    "ghost" or "vmap"; `train_subset` the first N training images its epoch is timed on (None: all)."""

    model: str
    method: Optional[str]
    train_subset: Optional[int] = None

    @property
    def name(self) -> str:
        return "non-DP" if self.method is None else f"DP {self.method}"


def dp_overhead(cfg: TrainConfig, data: Dataset, settings: Sequence[DPSetting], noise_multiplier: float = 1.0,
                max_norm: float = 1.0, train_subset: Optional[int] = None) -> list[dict]:
    """Return seconds per training epoch (`Engine.train_epoch`, no evaluation) of each setting: `cfg` with the
    setting's model, non-DP or DP-SGD (σ = `noise_multiplier`, C = `max_norm`) with the Engine's `dp_method` set
    to the setting's method, on `data`'s first `train_subset` training images (None: all).

    Each setting first trains one warm-up epoch on two batches, then one timed epoch. A setting with its own
    `train_subset` (fewer images) is timed on those and scaled to the whole set by steps (the expected batch
    is `cfg.batch_size` either way): `epoch_s` = `timed_s` · steps / `steps_timed`, `extrapolated` True. Rows:
    setting, model, method, n_timed, steps_timed, steps, timed_s, epoch_s, extrapolated, and `vs_plain`: epoch_s
    over that of the same model's non-DP row (NaN without one)."""
    data = _subset(data, train_subset)
    n_train, rows = len(data.y_train), []
    for setting in settings:
        private = setting.method is not None
        run_cfg = cfg.replace(model=setting.model, split="full", dp_noise_multiplier=noise_multiplier if private
                              else 0.0, dp_max_grad_norm=max_norm)
        engine = train.Engine(run_cfg, plant_config(_subset(data, 2 * cfg.batch_size), run_cfg))
        engine.dp_method = setting.method or "auto"
        engine.train_epoch()  # warm-up: thread pools, allocator, kernels
        n_timed = min(n_train, setting.train_subset or n_train)
        engine = train.Engine(run_cfg, plant_config(_subset(data, n_timed), run_cfg))
        engine.dp_method = setting.method or "auto"
        timed = _epoch_seconds(engine.train_epoch, engine.device)
        steps, steps_timed = (train.steps_per_epoch(run_cfg, n) for n in (n_train, n_timed))
        rows.append({"setting": setting.name, "model": setting.model, "method": setting.method, "n_timed": n_timed,
                     "steps_timed": steps_timed, "steps": steps, "timed_s": timed,
                     "epoch_s": timed * steps / steps_timed, "extrapolated": n_timed < n_train})
    plain = {row["model"]: row["epoch_s"] for row in rows if row["method"] is None}
    for row in rows:
        row["vs_plain"] = row["epoch_s"] / plain[row["model"]] if row["model"] in plain else float("nan")
    return rows
