"""A trial's W&B run as the study logs it: its flat config and tags, and the bookkeeping that keeps a restarted
trial one run offline (earlier run folders moved aside, earlier results replayed). Shared by study/wandb_setup.py
(settings, modes, reports) and study/wandb_callback.py (the Tune callback); imports neither Ray nor W&B.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from spurious import config as config_lib
from spurious.errors import SpuriousError

WANDB_SUBDIR = "wandb"
SUPERSEDED_SUBDIR = "superseded"
TAG_KEYS = ("dataset", "pattern")


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def flat_config(config: Mapping[str, Any], trainable: str | None = None) -> dict[str, Any]:
    """Return the trial config as W&B should see it: nested variant dicts flattened, training defaults
    filled in (so every run has pattern, n_spurious, l2, noise_sigma, …), plus the trainable's name."""
    flat = config_lib.flatten(config, on_clash="path")  # a key set twice by variant dicts: kept by path
    try:
        flat = config_lib.from_dict(flat).to_dict()
    except SpuriousError:
        pass  # another trainable's config: log it as given
    out = {k: _plain(v) for k, v in flat.items()}
    return {**out, "trainable": trainable} if trainable else out


def run_tags(config: Mapping[str, Any]) -> list[str]:
    """Return the W&B tags of a trial: dataset, pattern and trainable, as `key:value`."""
    return [f"{k}:{config[k]}" for k in (*TAG_KEYS, "trainable") if config.get(k) is not None]


def supersede_runs(directory: str | Path | None, run_id: str) -> bool:
    """Move the offline run folders of W&B run `run_id` under `directory`/wandb into wandb/superseded/.

    W&B cannot resume an offline run: a trial restarted by `study resume` (or retried after a fault) gets a
    new offline folder with the same run id. Its earlier folder, possibly cut short by the kill, is moved
    aside, and the callback replays the trial's earlier results into the new run, so the
    `wandb/offline-run-*` folders hold exactly one complete run per trial and `wandb sync` uploads each
    trial once. Returns whether any folder was moved.
    """
    if directory is None:
        return False
    runs = Path(directory) / WANDB_SUBDIR
    old = sorted(runs.glob(f"offline-run-*-{run_id}"))
    for folder in old:
        target = runs / SUPERSEDED_SUBDIR / folder.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), str(target))
    return bool(old)


def earlier_results(trial, before_iteration: int) -> list[dict]:
    """Return the results a trial reported before `before_iteration` (its result.json, last report of each
    training iteration kept), oldest first; the epochs of a restarted trial that it will report again are
    left out."""
    latest: dict[int, dict] = {}
    for text in _result_files(trial):
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed driver
            step = record.get("training_iteration")
            if isinstance(step, int) and step < before_iteration:
                latest[step] = record
        if latest:
            break
    return [latest[k] for k in sorted(latest)]


def _result_files(trial) -> list[str]:
    """Return the texts of a trial's result.json: the driver's staging copy (current within a session), then
    the copy in storage (what a resumed session finds)."""
    texts = []
    staging = getattr(trial, "local_path", None)
    if staging and (Path(staging) / "result.json").is_file():
        texts.append((Path(staging) / "result.json").read_text())
    try:
        fs, path = trial.storage.storage_filesystem, f"{trial.path}/result.json"
        with fs.open_input_stream(path) as stream:
            texts.append(stream.read().decode())
    except Exception:  # no copy in storage yet, or no storage context (a test double)
        pass
    return texts
