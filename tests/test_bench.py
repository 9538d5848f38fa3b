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
