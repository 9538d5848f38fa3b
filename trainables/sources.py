"""What the post-hoc trainables (deletion, membership inference) share: reading an earlier study's
checkpoint through Ray's storage, rebuilding the data it was trained on, and typed settings."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from ray import tune

from spurious import checkpoint, config as config_lib
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from spurious.planted import PlantedData, plant_config
from trainables.common import dataset_for


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def read_checkpoint(path: str, name: str | None = None) -> dict:
    """Return the state in file `name` (e.g. a bundle member's `member_<k>.pt`; default: model 0 in either
    layout of `spurious.checkpoint`) of a Tune checkpoint directory given as a local path or a URI (s3://,
    gs://, file://). It is read through Ray's storage layer, so the trial may run on any node that sees the
    storage; a missing or unreadable checkpoint raises a one-line SpuriousError."""
    try:
        with tune.Checkpoint(str(path)).as_directory() as directory:
            return checkpoint.load(Path(directory) / name) if name else checkpoint.read_member(directory, 0)
    except SpuriousError:
        raise
    except Exception as err:  # pyarrow and Ray raise many types for missing or unreachable storage
        raise SpuriousError(f"checkpoint {str(path)!r} cannot be read: {type(err).__name__}: "
                            f"{_first_line(err)}") from None


def read_source(entry: Mapping[str, Any]) -> dict:
    """Return the checkpoint state of a source-table entry {"checkpoint": dir or URI, "file": name}."""
    return read_checkpoint(entry["checkpoint"], entry.get("file"))


def planted_data(state: dict, datasets: Mapping[str, Any]) -> tuple[TrainConfig, PlantedData]:
    """Return the checkpoint's config and the planted data it was trained on (the same `plant` call), after
    checking that the planted training indices are the checkpoint's."""
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise SpuriousError("the checkpoint is not a training checkpoint (no config or model)")
    cfg = config_lib.from_dict(state["config"])
    data = plant_config(dataset_for(datasets, cfg.dataset), cfg)
    saved = np.sort(np.asarray(state.get("spurious_idx", []), np.int64))
    if not np.array_equal(saved, np.sort(np.asarray(data.spurious_idx, np.int64))):
        raise SpuriousError(f"the checkpoint's {len(saved)} planted examples are not the {len(data.spurious_idx)} "
                            f"that plant() chooses for its config; was the dataset changed?")
    return cfg, data


def source_columns(cfg: TrainConfig) -> dict[str, Any]:
    """Return the source model's config as flat report keys (so results join to the training study)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("device", "eval_batch_size")}
