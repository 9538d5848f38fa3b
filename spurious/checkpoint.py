"""The checkpoint format and its file layout, in one place (issue 12).

A checkpoint is one model's training state, a dict that `torch.load(weights_only=True)` can read::

    format        FORMAT (int); `check` rejects any other
    config        TrainConfig.to_dict() of the run
    epoch         epochs completed; the learning-rate schedule is a function of it (`train.lr_at`)
    model         the model's state_dict
    optimizer     a torch.optim.SGD/Adam state_dict; param_groups' lr is the rate of the next epoch
    rng           {"torch": global CPU RNG, "generator": the run's shuffling/noise generator, "cuda"?: ...}
    spurious_idx  int64 tensor (n_planted,): the planted training rows
    history       the per-epoch metric rows so far
    (post-hoc trials may add records, e.g. "deletion"; MIA trials save per-example scores instead)

Checkpoints written before issue 12 also hold a "scheduler" dict (MultiStepLR's state); it is ignored.

Layout: a checkpoint directory holds one file per model, `member_000.pt` … `member_<K-1>.pt`; a trial
that trains one model writes member 0, a bundle (`--bundle K`) or a K-seed mitigation trial writes K.
Directories written before issue 12 hold `checkpoint.pt` instead, with one state or (tune-mitigation)
{"members": [state, ...]}; `member_path`, `read_member` and `read_members` still read those.

    from spurious import checkpoint
    state = checkpoint.read_member("results/demo/trial/checkpoint_000002", 0)
    model = checkpoint.model_from_checkpoint(state, (1, 28, 28))
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from spurious import models
from spurious.errors import SpuriousError

FORMAT = 1
LEGACY_FILE = "checkpoint.pt"  # the one-file layout of checkpoints written before issue 12


def member_file(k: int) -> str:
    """Return the file name of model `k` (0-based) in a checkpoint directory, e.g. `member_003.pt`."""
    return f"member_{k:03d}.pt"


def save(state: dict, path: str | Path) -> Path:
    """Write a checkpoint atomically (temporary file, then rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load(path: str | Path) -> dict:
    """Read a checkpoint safely (`weights_only=True`: it may come from another machine) onto the CPU.

    Raises a one-line SpuriousError when the file is missing or cannot be read."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SpuriousError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as err:  # torch raises many types for corrupt files
        raise SpuriousError(f"checkpoint {str(path)!r} cannot be read: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None


def write_members(directory: str | Path, states: Sequence[dict]) -> list[Path]:
    """Write one file per model state into `directory`; return their paths."""
    return [save(state, Path(directory) / member_file(k)) for k, state in enumerate(states)]


def member_path(directory: str | Path | None, k: int) -> Optional[Path]:
    """Return the existing file holding model `k` of a checkpoint directory (the legacy `checkpoint.pt` for
    model 0 of an old directory), or None when there is none."""
    if directory is None:
        return None
    for name in (member_file(k),) + ((LEGACY_FILE,) if k == 0 else ()):
        if (Path(directory) / name).exists():
            return Path(directory) / name
    return None


def read_members(directory: str | Path, count: int) -> list[dict]:
    """Return the `count` model states of a checkpoint directory, in either layout.

    Raises a SpuriousError if the directory holds another number of models or a file cannot be read."""
    directory = Path(directory)
    if not (directory / member_file(0)).exists() and (directory / LEGACY_FILE).exists():
        state = load(directory / LEGACY_FILE)
        states = list(state["members"]) if "members" in state else [state]
    else:
        states = [load(directory / member_file(k)) for k in range(count)]
    if len(states) != count:
        raise SpuriousError(f"checkpoint {str(directory)!r} holds {len(states)} models, expected {count}")
    return states


def read_member(directory: str | Path, k: int = 0) -> dict:
    """Return model `k`'s state from a checkpoint directory, in either layout."""
    directory = Path(directory)
    if (directory / member_file(k)).exists() or not (directory / LEGACY_FILE).exists():
        return load(directory / member_file(k))
    state = load(directory / LEGACY_FILE)
    members = state["members"] if "members" in state else [state]
    if k >= len(members):
        raise SpuriousError(f"checkpoint {str(directory)!r} holds {len(members)} models, not model {k}")
    return members[k]


def check(state: dict, what: str = "checkpoint") -> None:
    """Raise a SpuriousError unless `state` has this module's FORMAT."""
    if state.get("format") != FORMAT:
        raise SpuriousError(f"{what} format {state.get('format')!r} is not {FORMAT}")


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """Return the RNG states a resumed run needs: global CPU, the run's generator, and CUDA's on a GPU."""
    rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_global_rng(rng: dict, device: torch.device) -> None:
    """Set the global CPU (and, on a GPU, CUDA) RNG from `rng` as `rng_state` made it; the caller sets its
    own generators from rng["generator"]."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def make(config: dict, epoch: int, model: dict, optimizer: dict, rng: dict, spurious_idx, history: list[dict]) -> dict:
    """Return a checkpoint dict in this module's FORMAT; `spurious_idx` is any int array (n_planted,)."""
    idx = torch.as_tensor(np.asarray(spurious_idx, np.int64))
    return {"format": FORMAT, "config": config, "epoch": int(epoch), "model": model, "optimizer": optimizer,
            "rng": rng, "spurious_idx": idx, "history": [dict(r) for r in history]}


def model_from_checkpoint(state: dict, input_shape: tuple[int, int, int], num_classes: int = 10) -> torch.nn.Module:
    """Rebuild the model of a checkpoint on the CPU, in eval mode; `input_shape` is (C, H, W)."""
    from spurious.config import from_dict

    cfg = from_dict(state["config"])
    model = models.build(cfg.model, input_shape, num_classes)
    model.load_state_dict(state["model"])
    return model.eval()
