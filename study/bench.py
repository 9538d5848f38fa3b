"""`study bench`: engine speed against a reference-shaped loop, bundling, Ray Tune harness overhead and the
CLI's start-up time, in one run.

Numbers are printed, never asserted by tests (speed targets are benchmark targets).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

import torch

from spurious import bench, datasets, train
from spurious.config import TrainConfig
from spurious.planted import plant_config

HARNESS_TRIALS = 8
HARNESS_EPOCHS = 3
# Commands that must answer in under a second: they import no torch or Ray.
QUICK_COMMANDS = (("--help",), ("list",), ("show", "demo"))
QUICK_TARGET_S = 1.0
# Bundled training's targets on the CPU (issue 15): models/hour against the engine for K >= 8, and the share of
# the matmul limit (`spurious.bench.matmul_limit`) reached.
BUNDLE_TARGET = 1.5
LIMIT_TARGET_PCT = 50.0


def engine_section(data_dir: str | None, repeats: int) -> dict:
    """Print and return seconds per epoch of LargeMLP on full Fashion-MNIST: engine vs reference loop."""
    cfg = TrainConfig(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=10, batch_size=128)
    data = train.prepare(cfg, data_dir)
    res = bench.engine_vs_reference(cfg, data, repeats)
    device = train.resolve_device(cfg.device)
    print(f"engine vs reference-shaped loop — LargeMLP, full Fashion-MNIST, batch 128, SGD, {device}, "
          f"{torch.get_num_threads()} threads (median of {repeats} epochs)")
    print(f"  training step only : engine {res['engine_train_s']:.3f} s/epoch, reference "
          f"{res['reference_train_s']:.3f} s/epoch, ratio {res['train_ratio']:.2f} (target <= 1.00)")
    print(f"  with epoch metrics : engine {res['engine_full_s']:.3f} s/epoch, reference "
          f"{res['reference_full_s']:.3f} s/epoch, ratio {res['full_ratio']:.2f} (target <= 1.15)")
    return res


def harness_configs() -> list[TrainConfig]:
    """Return the 8 trials of the harness benchmark (2 patterns × 2 counts × 2 seeds, 3 epochs)."""
    return [TrainConfig(dataset="fashion", pattern=p, n_spurious=n, data_seed=s, epochs=HARNESS_EPOCHS)
            for p in ("s3", "r3") for n in (0, 10) for s in (0, 1)]


def harness_section(data_dir: str | None) -> dict:
    """Print and return wall time of the 8-trial study through Ray Tune vs back-to-back in this process."""
    from study import catalog, runner, space as space_lib

    configs = harness_configs()
    data = datasets.load("fashion", data_dir)
    start = time.perf_counter()
    for cfg in configs:
        train.train(cfg, plant_config(data, cfg))
    serial = time.perf_counter() - start

    space = {"dataset": "fashion", "epochs": HARNESS_EPOCHS, "pattern": space_lib.grid(["s3", "r3"]),
             "n_spurious": space_lib.grid([0, 10]), "data_seed": space_lib.grid([0, 1])}
    spec = catalog.StudySpec("bench-harness", "harness overhead benchmark", space, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        options = runner.RunOptions(storage_path=tmp, name="bench", data_dir=data_dir, verbose=0)
        start = time.perf_counter()
        # W&B off (no logging given): this measures the harness alone
        runner.launch(runner.train_launch(runner.prepare(spec, options), options), options, runner.train_trainable)
        tuned = time.perf_counter() - start
    ratio = tuned / serial
    print(f"harness overhead — {HARNESS_TRIALS} trials × {HARNESS_EPOCHS} epochs, Fashion-MNIST LargeMLP")
    print(f"  back-to-back in one process: {serial:.1f} s; through Ray Tune (embedded, incl. start-up): "
          f"{tuned:.1f} s; ratio {ratio:.2f} (target <= 1.25)")
    return {"serial_s": serial, "tune_s": tuned, "ratio": ratio}


def bundle_section(data_dir: str | None, ks: tuple[int, ...], epochs: int, train_subset: int | None) -> dict:
    """Print and return models per hour of 70-epoch LargeMLP Fashion-MNIST trainings: the reference-shaped
    loop, our engine one model per process, and bundles of K models (issue 8), each with the matmul speed it
    reached against this machine's limit at its shapes (issue 15)."""
    cfg = TrainConfig(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=10, epochs=70)
    res = bench.bundle_throughput(cfg, datasets.load("fashion", data_dir), ks, epochs, train_subset)
    device = train.resolve_device(cfg.device)
    subset = f", first {train_subset} training images" if train_subset else ""
    print(f"throughput — 70-epoch LargeMLP Fashion-MNIST trainings (epochs timed: {epochs}, best of; {device}"
          f"{subset})")
    for row in res["rows"]:
        print(f"  {row['setting']:>12s}: {row['models_per_hour']:>10,.0f} models/hour  "
              f"({row['vs_reference']:.2f}x reference, {row['vs_engine']:.2f}x engine); "
              f"limit: {row['limit_gflops']:.0f} GFLOP/s, reached: {row['limit_pct']:.0f} %")
    print(f"  targets: bundles of K >= 8 at >= {BUNDLE_TARGET:g}x the engine's models/hour; "
          f"> {LIMIT_TARGET_PCT:g} % of the matmul limit")
    if device.type != "cuda":
        print("  Tune packing with fractional GPUs: skipped (no GPU here)")
    print(f"  best on this machine: {res['recommendation']}")
    return res


def layout_section(data_dir: str | None, ks: tuple[int, ...], epochs: int, train_subset: int | None,
                   save: bool = True) -> dict:
    """Print and return models per hour of the 70-epoch LargeMLP Fashion-MNIST trial for the engine and each
    bundle size at 1 thread and at all cores, the layout `study run` picks from them, and save them as this
    machine's profile (study/layout.py) unless `save` is False."""
    from study import cluster, layout

    cores = cluster.local_node()["cpus"]
    cfg = TrainConfig(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=10, epochs=70)
    data = datasets.load("fashion", data_dir)
    before, candidates = torch.get_num_threads(), []
    subset = f", first {train_subset} training images" if train_subset else ""
    print(f"layout — 70-epoch LargeMLP Fashion-MNIST trials per hour, one trial at a time, {cores} cores "
          f"(epochs timed: {epochs}, best of{subset})")
    try:
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            res = bench.bundle_throughput(cfg, data, tuple(k for k in ks if k > 1), epochs, train_subset)
            for row in res["rows"][1:]:
                candidates.append({"threads": threads, "bundle": row["k"], "models_per_hour": row["models_per_hour"]})
    finally:
        torch.set_num_threads(before)
    for c in candidates:
        machine = max(1, cores // c["threads"]) * c["models_per_hour"]
        print(f"  {c['threads']} thread{'s' if c['threads'] > 1 else ' '} × bundle {c['bundle']:>3d}: "
              f"{c['models_per_hour']:>9,.0f} models/hour per trial, {machine:>9,.0f} with {max(1, cores // c['threads'])} "
              f"side by side")
    best = layout.best_candidate(candidates, cores, bundling=True)
    print(f"  best: {best['threads']} thread(s) per trial, bundle {best['bundle']}")
    if save:
        print(f"  saved as this machine's layout profile: {layout.save_profile(candidates)} (`study run` uses it "
              f"unless --cpus-per-trial/--bundle are given)")
    return {"candidates": candidates, "best": best}


def cli_section(repeats: int = 3) -> dict:
    """Print and return the wall time (median of `repeats` fresh processes) of `study --help`, `study list`
    and `study show demo`: each must answer in under a second."""
    print(f"CLI start-up — fresh `python -m study.cli` processes, median of {repeats} (target < {QUICK_TARGET_S:g} s)")
    out = {}
    for argv in QUICK_COMMANDS:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "study.cli", *argv], check=True, stdout=subprocess.DEVNULL,
                           stdin=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        out[" ".join(argv)] = median = statistics.median(times)
        verdict = "ok" if median < QUICK_TARGET_S else "over target"
        print(f"  study {' '.join(argv):<12s} {median:.2f} s  {verdict}")
    return out


def main(data_dir: str | None = None, repeats: int = 3, harness: bool = True,
         bundle_sizes: tuple[int, ...] = (1, 8, 32), bundle_epochs: int = 2,
         train_subset: int | None = None, only: str | None = None, packing_trials: int = 8,
         packing_models: tuple[str, ...] = ("large_mlp", "cnn002")) -> dict:
    """Run every benchmark section (or `only` one: engine, bundle, harness, cli) and return the numbers."""
    out = {}
    if only in (None, "cli"):
        out["cli"] = cli_section(repeats)
    if only in (None, "engine"):
        out["engine"] = engine_section(data_dir, repeats)
    if only in (None, "bundle") and bundle_sizes:
        out["bundle"] = bundle_section(data_dir, bundle_sizes, bundle_epochs, train_subset)
    if only == "gpu":  # not part of the default run: scripts/gpu-bench.sh runs it on a GPU machine
        from study import bench_gpu

        out["gpu"] = bench_gpu.main(data_dir, bundle_sizes, bundle_epochs, train_subset, packing_trials,
                                    packing_models)
    if only in (None, "layout") and bundle_sizes:
        out["layout"] = layout_section(data_dir, bundle_sizes, bundle_epochs, train_subset)
    if only in (None, "harness") and (harness or only == "harness"):
        out["harness"] = harness_section(data_dir)
    return out
