"""Shared fixtures: a small learnable synthetic dataset, real Fashion-MNIST where installed, and a user's
defaults for W&B.

The test session runs as a user without W&B credentials would: a temporary HOME (no netrc, no W&B
settings) and no W&B variables, so `--wandb auto` resolves to offline by itself, exactly as on a fresh
machine. Subprocesses inherit this environment.
"""
import os
import tempfile
from pathlib import Path

import pytest
import torch

for _var in [v for v in os.environ if v.startswith("WANDB_")] + ["NETRC"]:
    os.environ.pop(_var, None)
os.environ["HOME"] = tempfile.mkdtemp(prefix="study-tests-home-")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def synthetic_dataset(n_train=600, n_test=300, shape=(1, 28, 28), seed=0, name="synthetic"):
    """Return a learnable 10-class dataset: each class is a bright horizontal band at its own height."""
    from spurious.datasets import Dataset

    gen = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(n) % 10
        x = 0.3 * torch.rand((n, *shape), generator=gen)
        h = shape[1]
        for c in range(10):
            rows = slice(6 + c * (h - 8) // 10, 6 + c * (h - 8) // 10 + 2)
            x[y == c, :, rows, 6:] += 0.6
        return x.clamp(0, 1), y

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    return Dataset(name, x_train, y_train, x_test, y_test, tuple(str(i) for i in range(10)))


@pytest.fixture
def tiny_data():
    return synthetic_dataset()


requires_fashion = pytest.mark.skipif(not FASHION_DIR.exists(),
                                      reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
