"""`study bench --only gpu` (what `scripts/gpu-bench.sh` runs): one device, one run, the figures a GPU user
needs to size a study.

It prints models per hour of the 70-epoch LargeMLP Fashion-MNIST trial for the reference-shaped loop, our
engine (one model per process), Tune packing (several trials side by side on one device: 0.25 GPU each
on a GPU, 1 CPU each on the CPU) and bundles of K models; the peak device memory of each bundle; and the
projected wall time of the catalog studies `paper-mlp` (grid G1, protocol §7.1) and `paper-fashion`
(protocol §7.2) on this one device, with the targets (bundles ≥ 50× the reference loop; G1 under an hour).

Every code path runs on the CPU too (tests/test_bench.py runs it on a few hundred images), so the GPU run
is not its first run. Figures come from a few timed epochs (best of), extrapolated to 70-epoch trainings;
the projection divides each study's trainings per model by the fastest measured layout for that model:
LargeMLP trainings by the best of packing and bundles, CNN002 trainings (not bundlable: dropout) by
packing.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Optional, Sequence

import torch

from spurious import bench, bundle, cells, datasets
from spurious.config import TrainConfig

REFERENCE_TARGET = 50.0  # bundles' models/hour over the reference-shaped loop's
G1_TARGET_H = 1.0
PROJECTED = ("paper-mlp", "paper-fashion")
EPOCHS = 70


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory(cfg: TrainConfig, data: datasets.Dataset, k: int) -> Optional[int]:
    """Return the peak device memory in bytes of building a bundle of `k` members and training and
    evaluating it for one epoch (None on the CPU, where torch keeps no such counter)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfgs = [cfg.replace(data_seed=cfg.data_seed + i) for i in range(k)]
    engine = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, data))
    engine.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del engine
    torch.cuda.empty_cache()
    return int(peak)


def packing(model: str, data_dir: Optional[str], trials: int, epochs: int) -> dict:
    """Run `trials` 1-model trials of `model` side by side through Ray Tune on this device (0.25 GPU each on a
    GPU, else 1 CPU each) for `epochs` epochs; return models per hour of 70-epoch trainings: the number of
    trials that run at once over the median epoch time (epochs after each trial's first, when it has more). Full training set (the
    `--train-subset` of the in-process settings does not apply: use `--data-dir` with smaller files)."""
    from study import catalog, runner, space as space_lib

    gpu = torch.cuda.is_available()
    share = 0.25 if gpu else 0.0
    space = {"dataset": "fashion", "model": model, "epochs": epochs, "pattern": "s3", "n_spurious": 10,
             "data_seed": space_lib.grid(list(range(trials))), "device": _device()}
    spec = catalog.StudySpec("bench-packing", "Tune packing benchmark", space, checkpoint_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        options = runner.RunOptions(storage_path=tmp, name="packing", data_dir=data_dir, verbose=0,
                                    cpus_per_trial=1.0, gpus_per_trial=share, bundle=1)
        start = time.perf_counter()
        grid = runner.launch(runner.train_launch(runner.prepare(spec, options), options), options,
                             runner.train_trainable)
        wall = time.perf_counter() - start
        times = []
        for result in grid:
            epochs_s = [row["time_this_iter_s"] for row in _reported(result.path)]
            times.extend(epochs_s[1:] or epochs_s)
    at_once = min(trials, int(1 / share) if gpu else max(1, _cpus()))
    epoch_s = statistics.median(times) if times else float("nan")
    return {"model": model, "trials": trials, "at_once": at_once, "share": share, "epoch_s": epoch_s,
            "wall_s": wall, "models_per_hour": at_once * 3600.0 / (epoch_s * EPOCHS)}


def _reported(trial_dir: str) -> list[dict]:
    """Return a trial's reported rows from its result.json (one JSON object per line)."""
    import json
    from pathlib import Path

    path = Path(trial_dir) / "result.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cpus() -> int:
    from study import cluster

    return int(cluster.local_node()["cpus"])


def trainings_by_model(study: str) -> dict[str, int]:
    """Return the number of distinct trainings of a catalog grid study per model architecture."""
    from study import catalog

    configs = catalog.get(study).cells()
    out: dict[str, int] = {}
    for members in cells.group_by_training(configs):
        model = configs[members[0]].model
        out[model] = out.get(model, 0) + 1
    return out


def projection(rates: dict[str, float]) -> dict[str, dict]:
    """Return, per study of PROJECTED, its trainings per model and the projected hours at `rates`
    (models per hour of 70-epoch trainings per model; a model without a rate makes the projection NaN)."""
    out = {}
    for study in PROJECTED:
        counts = trainings_by_model(study)
        hours = sum(n / rates.get(model, float("nan")) for model, n in counts.items())
        out[study] = {"trainings": counts, "hours": hours}
    return out


PACKED_MODELS = ("large_mlp", "cnn002")


def main(data_dir: Optional[str] = None, ks: Sequence[int] = (8, 32, 128), epochs: int = 2,
         train_subset: Optional[int] = None, packing_trials: int = 8,
         packing_models: Sequence[str] = PACKED_MODELS) -> dict:
    """Run the GPU benchmark on this machine's device (see the module docstring); print and return its figures.

    `packing_models`: the models whose Tune packing is measured (LargeMLP is always measured; a study's model
    that is not measured makes its projection n/a)."""
    device = _device()
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (no GPU here: the code paths, not GPU figures)"
    subset = f", first {train_subset} training images" if train_subset else ""
    print(f"GPU benchmark — {name}; 70-epoch Fashion-MNIST trainings, {epochs} timed epochs per setting{subset}")
    cfg = TrainConfig(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=10, epochs=EPOCHS, device=device)
    data = bench._subset(datasets.load("fashion", data_dir), train_subset)
    res = bench.bundle_throughput(cfg, data, tuple(ks), epochs)
    rows = {row["setting"]: row for row in res["rows"]}
    reference = rows["reference"]["models_per_hour"]
    print(f"  {'reference loop':>22s}: {reference:>12,.0f} models/hour")
    print(f"  {'engine':>22s}: {rows['engine']['models_per_hour']:>12,.0f} models/hour "
          f"({rows['engine']['vs_reference']:.1f}x reference)")
    models = ["large_mlp"] + [m for m in packing_models if m != "large_mlp"]
    packed = {m: packing(m, data_dir, packing_trials, epochs) for m in models}
    for model, p in packed.items():
        label = f"Tune packing {p['at_once']}×" + (f"{p['share']:g} GPU" if p["share"] else "1 CPU")
        full = ", full training set" if train_subset else ""
        print(f"  {label:>22s}: {p['models_per_hour']:>12,.0f} models/hour ({model}; "
              f"{p['models_per_hour'] / reference:.1f}x reference{full})" if model == "large_mlp" else
              f"  {label:>22s}: {p['models_per_hour']:>12,.0f} models/hour ({model}{full})")
    memory = {}
    for k in ks:
        row = rows[f"bundle_{k}"]
        memory[k] = peak_memory(cfg, data, k)
        mem = f"peak {memory[k] / 2**30:.2f} GiB" if memory[k] is not None else "peak memory: n/a on the CPU"
        print(f"  {'bundle K=' + str(k):>22s}: {row['models_per_hour']:>12,.0f} models/hour "
              f"({row['vs_reference']:.1f}x reference; {mem})")
    best_mlp = max([rows[f"bundle_{k}"]["models_per_hour"] for k in ks] + [packed["large_mlp"]["models_per_hour"]])
    verdict = "ok" if best_mlp >= REFERENCE_TARGET * reference else "below target"
    print(f"  best LargeMLP layout: {best_mlp / reference:.1f}x the reference loop (target >= {REFERENCE_TARGET:g}x): "
          f"{verdict}")
    rates = {m: p["models_per_hour"] for m, p in packed.items()}
    proj = projection({**rates, "large_mlp": best_mlp})
    for study, p in proj.items():
        if train_subset:
            print(f"  projected {study}: not computed (the in-process rows ran on --train-subset {train_subset}, "
                  f"Tune packing on the full training set)")
            continue
        counts = ", ".join(f"{n:,} {m}" for m, n in p["trainings"].items())
        missing = [m for m in p["trainings"] if m not in rates]
        if missing:
            print(f"  projected {study}: n/a ({', '.join(missing)} not measured; {counts} trainings)")
            continue
        target = (f" (target < {G1_TARGET_H:g} h: {'ok' if p['hours'] < G1_TARGET_H else 'over'})"
                  if study == "paper-mlp" else "")
        print(f"  projected {study}: {p['hours']:.2f} h on this one device ({counts} trainings of {EPOCHS} "
              f"epochs){target}")
    return {"device": name, "rows": res["rows"], "packing": packed, "peak_memory": memory, "projection": proj,
            "best_vs_reference": best_mlp / reference}
