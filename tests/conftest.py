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

# `python -c SIGNAL_AT_FIRST_RESULT ARGS…` runs `study ARGS…` with a Tune callback in every Tuner the run creates that
# sends the driver a signal when a trial first reports, in the Tune experiment (run config name: a tuning's
# "baseline", "search" or "confirm", a training study's experiment name) and with the signal that the environment
# variable SIGNAL_AT_FIRST_RESULT names ("search:SIGINT"): an interruption at a known point, however short the
# phase. The callback is added after the study's loggers, which write the result first. Tune pickles callbacks with
# the experiment, so a later `study resume` restores them: they act only where the environment says so, and once.
SIGNAL_AT_FIRST_RESULT = (
    "import os, signal, sys\n"
    "from ray import tune\n"
    "from study import cli, runner\n"
    "class SignalAtFirstResult(tune.Callback):\n"
    "    def __init__(self, phase):\n"
    "        self.phase, self.sent = phase, False\n"
    "    def on_trial_result(self, iteration, trials, trial, result, **info):\n"
    "        phase, _, name = os.environ.get('SIGNAL_AT_FIRST_RESULT', '').partition(':')\n"
    "        if phase == self.phase and not self.sent:\n"
    "            self.sent = True\n"
    "            os.kill(os.getpid(), getattr(signal, name))\n"
    "plain = runner.run_config\n"
    "def run_config(options, name, callbacks=None, storage_path=None):\n"
    "    config = plain(options, name, callbacks, storage_path)\n"
    "    config.callbacks.append(SignalAtFirstResult(name))\n"
    "    return config\n"
    "runner.run_config = run_config\n"
    "sys.exit(cli.main(sys.argv[1:]))\n")


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
