"""`train_classifier`: one training run of the paper's experimental unit as a Ray Tune trainable."""
from __future__ import annotations

from typing import Mapping

from spurious import config as config_lib, train
from spurious.datasets import Dataset
from spurious.planted import plant
from trainables.common import (checkpoint_due, dataset_for, maybe_inject_fault, report,
                               restored_state, use_trial_threads)


def train_classifier(config: Mapping, datasets: Mapping[str, Dataset], checkpoint_every: int = 5) -> None:
    """Train one model; report every epoch through Tune, checkpoint every `checkpoint_every` epochs and at the end.

    `datasets` comes from `tune.with_parameters`, so it travels through Ray's object store and worker
    nodes need no copy of the data files.
    """
    cfg = config_lib.from_tune(config)
    record = cfg.to_dict()  # every reported row carries the full canonical config
    use_trial_threads()
    data = plant(dataset_for(datasets, cfg.dataset), cfg.pattern, cfg.n_spurious, cfg.target, cfg.data_seed,
                 cfg.split)

    def on_epoch(metrics: dict, snapshot) -> None:
        epoch = metrics["epoch"]
        maybe_inject_fault(epoch)
        due = checkpoint_due(epoch, cfg.epochs, checkpoint_every)
        metrics["n_planted"] = len(data.spurious_idx)
        report({**metrics, **record}, snapshot() if due else None)

    train.train(cfg, data, on_epoch=on_epoch, resume=restored_state())
