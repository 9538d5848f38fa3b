"""`train_classifier`: the Ray Tune trainable of training studies — one trained model (the paper's experimental
unit), or several cells and models in one trial (`trainables.train_bundle`)."""
from __future__ import annotations

from typing import Mapping

from spurious import cells, config as config_lib, train
from spurious.datasets import Dataset
from spurious.planted import plant_config
from trainables.common import (checkpoint_due, dataset_for, maybe_inject_fault, report,
                               restored_state, use_trial_threads)


def trial_spec(config: Mapping) -> Mapping:
    """Return a trial's own entry: grid studies wrap each trial's entry in "run" (study/runner.py); sampled
    studies and older records have the training config itself."""
    return config["run"] if set(config) == {"run"} else config


def train_classifier(config: Mapping, datasets: Mapping[str, Dataset], checkpoint_every: int = 5) -> None:
    """Train one model (or, for an entry with "bundle", several cells and models: `train_bundle.train_cells`);
    report every epoch through Tune, checkpoint every `checkpoint_every` epochs and at the end.

    `datasets` comes from `tune.with_parameters`, so it travels through Ray's object store and worker
    nodes need no copy of the data files. Each report carries the epoch's metrics (TRAIN_KEYS, TEST_KEYS,
    VAL_KEYS with a validation split), `n_planted`, `pattern_l2`, the full canonical config, and at the
    last epoch the packed per-test-image indicators (`spurious.cells.final_record`).
    """
    spec = trial_spec(config)
    if "bundle" in spec:
        from trainables.train_bundle import train_cells

        train_cells(spec["bundle"], spec.get("models"), datasets, checkpoint_every)
        return
    cfg = config_lib.from_tune(spec)
    record = cfg.to_dict()  # every reported row carries the full canonical config
    use_trial_threads()
    data = plant_config(dataset_for(datasets, cfg.dataset), cfg)
    cell = cells.CellData(cfg, data.x_test, data.y_test, data.x_test_patterned)
    fixed = {"n_planted": len(data.spurious_idx), "pattern_l2": cell.pattern_l2}
    engine = train.Engine(cfg, data)
    state = restored_state()
    if state is not None:
        engine.restore(state)

    def on_epoch(metrics: dict, snapshot) -> None:
        epoch = metrics["epoch"]
        maybe_inject_fault(epoch)
        due = checkpoint_due(epoch, cfg.epochs, checkpoint_every)
        final = cells.final_record(engine.model, cell) if epoch == cfg.epochs else {}
        report({**metrics, **fixed, **final, **record}, snapshot() if due else None)

    engine.fit(on_epoch)
