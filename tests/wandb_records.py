"""Read an offline W&B run back with wandb's own record schema (`wandb.proto.wandb_internal_pb2.Record`).

wandb 0.31 ships no Python reader for its `.wandb` transaction log (the Go core writes it), so this
undoes only the framing: a 7-byte file header (":W&B", magic, version), then LevelDB-log records in
32 KiB blocks, each chunk prefixed by crc32 (4 bytes), length (2) and type (1: full, 2: first,
3: middle, 4: last).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

BLOCK = 32768
CHUNK_HEADER = 7
FILE_HEADER = 7
COMPLETE = (1, 4)


def records(path: str | Path) -> Iterator:
    """Yield every Record protobuf of a `.wandb` file in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, parts = FILE_HEADER, []
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:
            pos += left  # block trailer padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        pos += CHUNK_HEADER
        parts.append(data[pos:pos + length])
        pos += length
        if kind in COMPLETE:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _items(items) -> dict:
    """Return config/history items as a dict, nested keys (a logged dict, image or table) as nested dicts."""
    out: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def read_run(run_dir: str | Path) -> dict:
    """Return {"config", "tags", "group", "job_type", "name", "history"} of an offline run folder."""
    (log,) = Path(run_dir).glob("*.wandb")
    out = {"config": {}, "tags": [], "group": None, "job_type": None, "name": None, "history": []}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(tags=list(record.run.tags), group=record.run.run_group, job_type=record.run.job_type,
                       name=record.run.display_name)
            out["config"].update(_items(record.run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].append(_items(record.history.item))
    return out


def run_offline_smoke(storage: Path, name: str) -> subprocess.CompletedProcess:
    """Run `study run demo --smoke --wandb offline -v 0` from this checkout as a user without W&B credentials
    or network would (a fresh HOME, no WANDB_* variables, an unreachable W&B host, a closed stdin, so a login
    prompt fails instead of waiting); return the finished process (exit code 0 is asserted)."""
    repo = Path(__file__).resolve().parents[1]
    home = storage / f"{name}-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(home), WANDB_BASE_URL="http://127.0.0.1:9", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "study.cli", "run", "demo", "--smoke", "--wandb", "offline",
           "--storage-path", str(storage), "--name", name, "-v", "0"]
    done = subprocess.run(cmd, cwd=repo, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done
