"""`study bench`: engine speed against a reference-shaped loop, DP-SGD's cost (ghost norms and per-example
gradients), bundling, Ray Tune harness overhead, the CLI's start-up time and W&B's overhead, in one run;
`--only tune-output` the files Tune writes for a 1,000-trial grid.

Numbers are printed, never asserted by tests (speed targets are benchmark targets).
"""
from __future__ import annotations

import fnmatch
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from spurious import bench, datasets, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
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
# W&B: the demo study at reduced size (8 trials × 2 epochs), off and offline, each PAIRS times.
WANDB_STUDY = ("--yes", "-v", "0", "--set", "epochs=2", "--set", "n_spurious=[3,10]", "--bundle", "1")  # a run per model
WANDB_PAIRS = 2
WANDB_TARGET = 0.10
# Tune's output: a grid of 1-epoch trials on this many images, and the kinds of files counted.
TUNE_OUTPUT_TRIALS = 1000
TINY_TRAIN, TINY_TEST = 1000, 500
# DP-SGD: LargeMLP and CNN002 at batch 256; the slow settings are timed on a share of the training set.
DP_BATCH = 256
DP_VMAP_SHARE = 0.1  # LargeMLP's DP epoch by per-example gradients (vmap)
DP_CNN_SHARE = 0.05  # CNN002's epochs, non-DP and DP (vmap: Conv2d layers have no ghost norms here)
OUTPUT_KINDS = ("result.json", "params.json", "params.pkl", "progress.csv", "events.out.tfevents.*", "error.*",
                "*state-*.json", "tuner.pkl", "study.json")


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


def _share(n_train: int, share: float, batch: int) -> int:
    """Return the training images a share of `n_train` stands for: at least two batches, at most all."""
    return min(n_train, max(2 * batch, round(share * n_train)))


def dp_section(data_dir: str | None, train_subset: int | None = None) -> dict:
    """Print and return seconds per training epoch on full Fashion-MNIST (or its first `train_subset` images)
    of LargeMLP non-DP, DP-SGD by ghost norms and by per-example gradients (vmap, timed on a share of the
    steps), and of CNN002 non-DP and DP by vmap (both timed on a share), with each DP/non-DP ratio."""
    cfg = TrainConfig(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=10, batch_size=DP_BATCH)
    data = datasets.load("fashion", data_dir)
    n = min(len(data.y_train), train_subset or len(data.y_train))
    vmap_n, cnn_n = _share(n, DP_VMAP_SHARE, DP_BATCH), _share(n, DP_CNN_SHARE, DP_BATCH)
    setting = bench.DPSetting
    settings = [setting("large_mlp", None), setting("large_mlp", "ghost"), setting("large_mlp", "vmap", vmap_n),
                setting("cnn002", None, cnn_n), setting("cnn002", "vmap", cnn_n)]
    device = train.resolve_device(cfg.device)
    subset = f"first {n:,d}" if n < len(data.y_train) else f"full, {n:,d}"
    print(f"DP-SGD — seconds per training epoch (no evaluation), Fashion-MNIST ({subset} training images), batch "
          f"{DP_BATCH}, σ = 1, C = 1, {device}, {torch.get_num_threads()} threads (one epoch each after a "
          f"warm-up)")
    rows = bench.dp_overhead(cfg, data, settings, train_subset=train_subset)
    for row in rows:
        ratio = "" if row["method"] is None else f"  {row['vs_plain']:6.1f}x non-DP"
        timed = (f"  (extrapolated: {row['steps_timed']} of {row['steps']} steps timed, {row['timed_s']:.1f} s)"
                 if row["extrapolated"] else "")
        print(f"  {row['model']:<10s} {row['setting']:<9s} {row['epoch_s']:8.2f} s/epoch{ratio}{timed}")
    by = {(r["model"], r["method"]): r["epoch_s"] for r in rows}
    print(f"  LargeMLP: DP by ghost norms {by['large_mlp', 'vmap'] / by['large_mlp', 'ghost']:.1f}x faster than "
          f"per-example gradients (vmap); CNN002 (Conv2d) takes vmap")
    return {"rows": rows}


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
                   save: bool = True, measured: dict | None = None) -> dict:
    """Print and return models per hour of the 70-epoch LargeMLP Fashion-MNIST trial for the engine and each
    bundle size at 1 thread and at all cores, the layout `study run` picks from them, and save them as this
    machine's profile (study/layout.py) unless `save` is False. `measured`: `bundle_section`'s result for the
    same sizes, timed at this process's thread count, which is then not timed again."""
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
            if measured is not None and threads == before:
                res = measured
            else:
                torch.set_num_threads(threads)
                res = bench.bundle_throughput(cfg, data, tuple(k for k in ks if k > 1), epochs, train_subset)
            for row in (r for r in res["rows"][1:] if r["setting"] == "engine" or r["k"] > 1):
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
    if save and train_subset:
        print("  not saved as this machine's layout profile: measured on a --train-subset (run without it to save)")
    elif save:
        path = layout.save_profile(candidates, epochs_timed=epochs, bundle_sizes=list(ks))
        print(f"  saved as this machine's layout profile: {path} (`study run` uses it unless --cpus-per-trial/"
              f"--bundle are given)")
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


def _timed_run(argv: list[str]) -> float:
    """Return the wall time of one fresh `study run` process; SpuriousError (its last line) if it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "study.cli", "run", *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    if done.returncode:
        raise SpuriousError(f"study run {' '.join(argv)} failed: {(done.stderr.strip().splitlines() or [''])[-1]}")
    return time.perf_counter() - start


def wandb_section(data_dir: str | None, pairs: int = WANDB_PAIRS) -> dict:
    """Print and return the wall times of a small real study, `study run demo` at 8 trials × 2 epochs in fresh
    processes, with W&B off and offline (the default without an API key), in pairs (off, offline, then
    offline, off: load from elsewhere hits both alike), and W&B's overhead: the median of the pairs' ratios."""
    print(f"W&B overhead — `study run demo {' '.join(WANDB_STUDY)}` (8 trials × 2 epochs), fresh processes, "
          f"{pairs} interleaved pairs of --wandb off and offline (target <= {WANDB_TARGET:.0%})")
    times: dict[str, list[float]] = {"off": [], "offline": []}
    extra = ["--data-dir", data_dir] if data_dir else []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            for mode in ("off", "offline")[::1 if i % 2 == 0 else -1]:
                times[mode].append(_timed_run(["demo", *WANDB_STUDY, "--wandb", mode, "--storage-path", tmp,
                                               "--name", f"{mode}-{i}", *extra]))
    overhead = statistics.median(on / off - 1 for on, off in zip(times["offline"], times["off"]))
    for mode, runs in times.items():
        print(f"  --wandb {mode:<8s}: {', '.join(f'{t:.1f} s' for t in runs)}")
    print(f"  overhead {overhead:+.0%}  {'ok' if overhead <= WANDB_TARGET else 'over target'}")
    return {**times, "overhead": overhead}


def tiny_dataset(data: datasets.Dataset, train: int = TINY_TRAIN, test: int = TINY_TEST) -> datasets.Dataset:
    """Return the first `train` training and `test` test images of `data`: trials that take a fraction of a
    second, so Tune's own costs dominate."""
    return datasets.Dataset(data.name, data.x_train[:train], data.y_train[:train], data.x_test[:test],
                            data.y_test[:test], data.class_names)


def output_files(path: str | Path) -> dict:
    """Return the number and bytes of the files under an experiment directory, in all and per kind."""
    kinds: dict[str, list[int]] = {}
    for file in Path(path).rglob("*"):
        if file.is_file():
            kind = next((k for k in OUTPUT_KINDS if fnmatch.fnmatch(file.name, k)), "other")
            if file.parent.name.startswith("checkpoint_"):
                kind = "checkpoint_*/"
            kinds.setdefault(kind, [0, 0])
            kinds[kind][0] += 1
            kinds[kind][1] += file.stat().st_size
    return {"files": sum(n for n, _ in kinds.values()), "bytes": sum(b for _, b in kinds.values()),
            "kinds": {k: tuple(v) for k, v in sorted(kinds.items())}}


def _run_grid(spec, data, options, loggers: tuple[str, ...]) -> float:
    """Return the wall time of a training study on `data` whose RunConfig carries `loggers` (runner.TUNE_LOGGERS;
    none: Tune adds its CSV, JSON and TensorBoard loggers)."""
    from study import runner

    prepared = runner.prepare(spec, options)
    prepared.data = data
    with mock.patch.object(runner, "TUNE_LOGGERS", loggers):
        start = time.perf_counter()
        runner.launch(runner.train_launch(prepared, options), options, runner.train_trainable)
        return time.perf_counter() - start


def tune_output_section(data_dir: str | None, trials: int = TUNE_OUTPUT_TRIALS) -> dict:
    """Print and return, for a grid of `trials` 1-epoch trials on tiny data (W&B off), the wall time and the
    files Tune writes with its default loggers and with the study's (result.json and params.json only), and
    whether the analysis frames of the two are equal."""
    from analysis import frames
    from study import catalog, runner, space as space_lib

    space = {"dataset": "fashion", "model": "mlp", "epochs": 1, "pattern": "s3", "n_spurious": 3,
             "data_seed": space_lib.grid(list(range(trials)))}
    spec = catalog.StudySpec("bench-tune-output", "Tune output benchmark", space, checkpoint_every=1)
    data = {"fashion": tiny_dataset(datasets.load("fashion", data_dir))}
    print(f"Tune output — {trials} trials × 1 epoch (MLP, {TINY_TRAIN} training and {TINY_TEST} test images of "
          f"Fashion-MNIST), W&B off, embedded Ray started beforehand")
    out, loaded = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = runner.RunOptions(storage_path=tmp, name="warm-up", data_dir=data_dir, verbose=0)
        runner.start_ray(warm)
        _run_grid(catalog.StudySpec("warm-up", "", {**space, "data_seed": space_lib.grid([0, 1])}), data, warm,
                  runner.TUNE_LOGGERS)
        for label, loggers in (("Tune's loggers (CSV, JSON, TensorBoard)", ()),
                               ("result.json + params.json", runner.TUNE_LOGGERS)):
            name = "defaults" if not loggers else "study"
            options = runner.RunOptions(storage_path=tmp, name=name, data_dir=data_dir, verbose=0)
            wall = _run_grid(spec, data, options, loggers)
            files = output_files(Path(tmp) / name)
            out[name] = {"wall_s": wall, **files}
            loaded[name] = frames.load(Path(tmp) / name)
            print(f"  {label:<42s} {wall:7.1f} s  {files['files']:>7,d} files  {files['bytes'] / 1e6:8.2f} MB")
            print("    " + ", ".join(f"{k} {n:,d} ({b / 1e6:.2f} MB)" for k, (n, b) in files["kinds"].items()))
    out["frames_equal"] = _same_rows(*loaded.values())
    print(f"  analysis frames equal (metrics and config by data seed): {'yes' if out['frames_equal'] else 'NO'}")
    return out


def _same_rows(a, b) -> bool:
    """Return whether two studies' analysis frames hold the same configs and metrics, trial by trial."""
    from analysis.frames import CONFIG_COLUMNS, METRICS

    columns = [c for c in (*CONFIG_COLUMNS, *METRICS, "status", "epochs_done") if c in a.columns]
    rows = [df[columns].astype(str).sort_values(list(columns)).reset_index(drop=True) for df in (a, b)]
    return len(a) == len(b) and rows[0].equals(rows[1])


def main(data_dir: str | None = None, repeats: int = 3, harness: bool = True,
         bundle_sizes: tuple[int, ...] = (1, 8, 32), bundle_epochs: int = 2,
         train_subset: int | None = None, only: str | None = None, packing_trials: int = 8,
         packing_models: tuple[str, ...] = ("large_mlp", "cnn002"), trials: int = TUNE_OUTPUT_TRIALS) -> dict:
    """Run every benchmark section but tune-output and gpu (or `only` one: engine, dp, bundle, layout, harness,
    cli, wandb, tune-output with `trials` trials, gpu with `packing_trials` and `packing_models`) and return the
    numbers."""
    out = {}
    if only in (None, "cli"):
        out["cli"] = cli_section(repeats)
    if only in (None, "engine"):
        out["engine"] = engine_section(data_dir, repeats)
    if only in (None, "dp"):
        out["dp"] = dp_section(data_dir, train_subset)
    if only in (None, "bundle") and bundle_sizes:
        out["bundle"] = bundle_section(data_dir, bundle_sizes, bundle_epochs, train_subset)
    if only == "gpu":  # not part of the default run: scripts/gpu-bench.sh runs it on a GPU machine
        from study import bench_gpu

        out["gpu"] = bench_gpu.main(data_dir, bundle_sizes, bundle_epochs, train_subset, packing_trials,
                                    packing_models)
    if only in (None, "layout") and bundle_sizes:
        out["layout"] = layout_section(data_dir, bundle_sizes, bundle_epochs, train_subset,
                                       measured=out.get("bundle"))
    if only in (None, "harness") and (harness or only == "harness"):
        out["harness"] = harness_section(data_dir)
    if only in (None, "wandb"):
        out["wandb"] = wandb_section(data_dir)
    if only == "tune-output":
        out["tune-output"] = tune_output_section(data_dir, trials)
    return out
