"""Provenance: what produced an experiment. The code (project version, git commit and whether the checkout had
uncommitted changes), the software versions, the machine that ran the driver, the dataset files (sha256)
and the command line. `study run` and the other launch commands record it as study.json's "provenance",
each `study resume` appends its own to "resumed", and every W&B run of the study carries it in its config.

    from study import provenance
    record = provenance.collect(["fashion"], data_dir=None, resources={"cpu": 1.0})

Nothing here raises: a value that cannot be found (no git, not a checkout, no local dataset files) is None.
"""
from __future__ import annotations

import configparser
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]  # the project's source tree: a checkout, or site-packages
DISTRIBUTION = "rare-spurious-study"
PACKAGES = ("torch", "ray", "optuna", "numpy", "wandb")
# Files at least this large keep their sha256 in the cache folder across processes (keyed by path, size and
# modification time): CIFAR-10's batches take about a second to hash on a busy 2-core machine.
LARGE_FILE = 32 * 2**20
SHA_CACHE = "sha256.json"
GIT_TIMEOUT_S = 10


def command_line(argv: Sequence[str]) -> str:
    """Return the command as the user typed it, shell-quoted; `python -m study.cli` shows as such (its argv[0]
    is the module's file path)."""
    argv = list(argv)
    if argv and Path(argv[0]).parts[-2:] == ("study", "cli.py"):
        argv = ["python", "-m", "study.cli", *argv[1:]]
    return shlex.join(argv)


def collect(datasets: Sequence[str] = (), data_dir: str | None = None, resources: Mapping[str, Any] | None = None,
            argv: Sequence[str] | None = None) -> dict:
    """Return this process's provenance record: time, version, git_commit, git_dirty, python, packages, cpu, gpu,
    cuda, torch_threads, trial_threads (from the per-trial `resources`), command (shell-quoted `argv`, default
    sys.argv), cwd, and datasets (per name: the folder its files were read from and their sha256)."""
    commit, dirty = git_state(ROOT)
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "version": version(), "git_commit": commit,
            "git_dirty": dirty, "python": platform.python_version(), "packages": package_versions(),
            "cpu": cpu_name(), **gpu(), "torch_threads": torch_threads(),
            "trial_threads": max(1, int(resources.get("cpu") or 1)) if resources else None,
            "command": command_line(sys.argv if argv is None else argv), "cwd": os.getcwd(),
            "datasets": dataset_checksums(datasets, data_dir)}


def version() -> str | None:
    """Return the project version: setup.cfg's when running from a checkout, else the installed package's."""
    setup = ROOT / "setup.cfg"
    if setup.is_file():
        parser = configparser.ConfigParser()
        try:
            parser.read(setup)
            return parser.get("metadata", "version")
        except configparser.Error:
            pass
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    """Return git's output for `args` run in `root`, None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """Return (HEAD commit, whether any file differs from it, untracked files included) of the git checkout whose
    top folder is `root`; (None, None) when `root` is not the top of one (say, a package installed into a
    virtualenv inside some other checkout) or git is missing."""
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != Path(root).resolve():
        return None, None
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain")
    return commit, None if commit is None or status is None else bool(status)


def package_versions() -> dict[str, str | None]:
    """Return the installed version of each of PACKAGES (None when one is not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """Return the CPU model: /proc/cpuinfo's "model name", else what `platform` knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def gpu() -> dict[str, Any]:
    """Return {"gpu": name of the first GPU and how many, "cuda": torch's CUDA version}, both None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            return {"gpu": torch.cuda.get_device_name(0) + (f" (×{count})" if count > 1 else ""),
                    "cuda": torch.version.cuda}
    except Exception:  # a broken driver must not stop a launch; the record just says no GPU
        pass
    return {"gpu": None, "cuda": None}


def torch_threads() -> int | None:
    """Return torch's CPU thread count in this process (trials set theirs to their CPUs)."""
    try:
        import torch

        return torch.get_num_threads()
    except Exception:
        return None


def dataset_checksums(names: Sequence[str], data_dir: str | None = None) -> dict[str, dict | None]:
    """Return, per dataset name, {"dir": the folder `datasets.load` reads it from, "sha256": {file name: digest}};
    None for a dataset with no local files."""
    from spurious import datasets
    from spurious.errors import SpuriousError

    out: dict[str, dict | None] = {}
    for name in sorted(names):
        try:
            files = datasets.source_files(name, data_dir)
            out[name] = {"dir": str(files[0].parent), "sha256": {p.name: sha256(p) for p in files}}
        except (SpuriousError, OSError):
            out[name] = None
    return out


def sha256(path: Path) -> str:
    """Return the hex sha256 of a file, computed once per process (and, for large files, once per change)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    if size < LARGE_FILE:
        return _hash_file(path)
    cache = _read_cache()
    entry = cache.get(path)
    if isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime_ns:
        return entry["sha256"]
    digest = _hash_file(path)
    _write_cache({**cache, path: {"size": size, "mtime_ns": mtime_ns, "sha256": digest}})
    return digest


def _hash_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_file() -> Path:
    from spurious import datasets

    return datasets.cache_root() / SHA_CACHE


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: Mapping[str, Any]) -> None:
    """Replace the checksum cache in one step (a concurrent launch loses at most its own new entry)."""
    target = _cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f"{target.name}.{os.getpid()}")
        part.write_text(json.dumps(cache, indent=1))
        os.replace(part, target)
    except OSError:
        pass  # a read-only cache folder: hash again next time
