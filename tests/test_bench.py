"""`study bench`'s GPU section and scripts/gpu-bench.sh, run on the CPU (CI has no GPU): every code path the
GPU run takes, on a few hundred training images. Speeds are never asserted (benchmarks, not timed tests)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from study import bench_gpu
from tests.conftest import requires_fashion

ROOT = Path(__file__).resolve().parents[1]


def test_projection_counts_each_distinct_training_once_per_model():
    assert bench_gpu.trainings_by_model("paper-fashion") == {"large_mlp": 982}  # as the catalog says
    counts = bench_gpu.trainings_by_model("paper-mlp")
    assert set(counts) == {"large_mlp", "cnn002"} and counts["large_mlp"] == counts["cnn002"]
    proj = bench_gpu.projection({"large_mlp": 982.0, "cnn002": 100.0})
    assert proj["paper-fashion"]["hours"] == pytest.approx(1.0)
    assert proj["paper-mlp"]["hours"] == pytest.approx(counts["large_mlp"] / 982 + counts["cnn002"] / 100)
    assert math.isnan(bench_gpu.projection({"large_mlp": 1.0})["paper-mlp"]["hours"])


@requires_fashion
@pytest.mark.slow
@pytest.mark.ray
def test_gpu_bench_script_runs_every_section_on_the_cpu():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-bench.sh"), "--train-subset", "512",
                           "--bundle-sizes", "2", "--bundle-epochs", "1", "--packing-trials", "2",
                           "--packing-models", "large_mlp"], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "device: no CUDA GPU visible" in out
    for line in ("reference loop:", "engine:", "Tune packing 2×1 CPU:", "bundle K=2:", "peak memory: n/a on the CPU",
                 "best LargeMLP layout:", "(target >= 50x)", "full training set)",
                 "projected paper-fashion: not computed (the in-process rows ran on --train-subset 512",
                 "gpu-bench:"):
        assert line in out, line


@pytest.mark.parametrize("argv, message", [
    (["--only", "gpu", "--packing-models", "nosuch"], "--packing-models 'nosuch' is not a model"),
    (["--only", "gpu", "--packing-trials", "0"], "--packing-trials must be >= 1, got 0"),
    (["--only", "cli", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--only", "layout", "--bundle-epochs", "0"], "--bundle-epochs must be >= 1, got 0"),
    (["--only", "cli", "--data-dir", "/nonexistent"], "--data-dir '/nonexistent' is not a directory"),
])
def test_bad_gpu_bench_options_are_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "study.cli", "bench", *argv], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_dp_overhead_times_each_setting_by_its_method_and_scales_shares_to_the_epoch(tiny_data, monkeypatch):
    from spurious import bench, dp
    from spurious.config import TrainConfig

    methods, noisy = [], dp.noisy_gradient
    def recorded(*args, method, **kwargs):
        methods.append(method)
        return noisy(*args, method=method, **kwargs)

    monkeypatch.setattr(dp, "noisy_gradient", recorded)
    cfg = TrainConfig(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=3, batch_size=64, device="cpu")
    settings = [bench.DPSetting("mlp", None), bench.DPSetting("mlp", "ghost"), bench.DPSetting("mlp", "vmap", 256),
                bench.DPSetting("cnn002", "vmap", 128)]
    rows = bench.dp_overhead(cfg, tiny_data, settings)
    assert [r["setting"] for r in rows] == ["non-DP", "DP ghost", "DP vmap", "DP vmap"]
    assert [(r["n_timed"], r["steps_timed"], r["steps"], r["extrapolated"]) for r in rows] == [
        (600, 10, 10, False), (600, 9, 9, False), (256, 4, 9, True), (128, 2, 9, True)]  # DP: ⌊N/B⌋ steps
    for row in rows:
        assert row["timed_s"] > 0
        assert row["epoch_s"] == pytest.approx(row["timed_s"] * row["steps"] / row["steps_timed"])
    assert rows[1]["vs_plain"] == pytest.approx(rows[1]["epoch_s"] / rows[0]["epoch_s"])
    assert math.isnan(rows[3]["vs_plain"])  # no non-DP CNN002 row
    assert methods == ["ghost"] * (2 + 9) + ["vmap"] * (2 + 4) + ["vmap"] * (2 + 2)  # warm-up: two steps each


def test_the_dp_section_prints_every_setting(monkeypatch, capsys):
    from tests.conftest import synthetic_dataset

    from study import bench

    monkeypatch.setattr(bench.datasets, "load", lambda name, root=None: synthetic_dataset(n_train=640, n_test=64))
    monkeypatch.setattr(bench, "DP_BATCH", 64)
    out = bench.dp_section(None)
    printed = capsys.readouterr().out
    assert "DP-SGD — seconds per training epoch (no evaluation), Fashion-MNIST (full, 640 training images)" in printed
    assert [(r["model"], r["setting"], r["n_timed"]) for r in out["rows"]] == [
        ("large_mlp", "non-DP", 640), ("large_mlp", "DP ghost", 640), ("large_mlp", "DP vmap", 128),
        ("cnn002", "non-DP", 128), ("cnn002", "DP vmap", 128)]
    for line in ("large_mlp  DP ghost", "x non-DP", "extrapolated: 2 of 10 steps timed", "cnn002     DP vmap",
                 "ghost norms", "faster than per-example gradients (vmap)"):
        assert line in printed, line
