"""Command-line pieces every `study` command shares: run options, `--set` parsing, path expansion, confirmation.

Light on purpose (no Ray, torch or pandas at import): `study --help`, `study list` and `study show` must
answer in well under a second, and the argument parsers of every command are built from this module.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from spurious.errors import SpuriousError

CONFIRM_ABOVE = 100
MIN_CPUS = 0.0001  # Ray tracks resources to 4 decimals
WANDB_MODES = ("auto", "off", "offline", "online")


class UsageError(SpuriousError):
    """A command-line mistake."""


def expand_path(text: str | os.PathLike) -> str:
    """Return a path option with `~` and environment variables expanded (URIs keep their scheme).

    `--storage-path=~/res` reaches us unexpanded (the shell expands `~` only at the start of a word), so
    every path option goes through here.
    """
    return os.path.expandvars(os.path.expanduser(str(text)))


@dataclass
class RunOptions:
    """How to run a study: where, with what resources, and where results go."""

    storage_path: str = "./results"
    name: str | None = None
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    data_dir: str | None = None
    smoke: bool = False
    overrides: dict = field(default_factory=dict)
    max_failures: int = 2
    keep_checkpoints: int = 2
    verbose: int = 1
    bundle: int = 1
    static_cluster: bool = False
    # `study run` picks CPUs per trial and bundling itself when the user left the flag out (study/layout.py)
    auto_cpus: bool = False
    auto_bundle: bool = False
    layout: dict | None = None

    def __post_init__(self) -> None:
        self.storage_path = expand_path(self.storage_path)
        if self.data_dir is not None:
            self.data_dir = str(Path(expand_path(self.data_dir)).resolve())

    def storage_uri(self) -> str:
        """Return the storage path as Tune wants it: a URI, or an absolute local path."""
        return self.storage_path if "://" in self.storage_path else str(Path(self.storage_path).resolve())


def parse_set(items: Sequence[str]) -> dict:
    """Parse `--set key=value` items; values are YAML scalars or lists (`n_spurious=[0,3,10]`)."""
    from spurious import config as config_lib

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r} must look like key=value")
        allowed = [*config_lib.field_names(), "optim", "mitigation"]
        if key not in allowed:
            raise UsageError(f"--set {key!r} is not a config key; allowed: {', '.join(allowed)}")
        try:
            out[key] = numbers(yaml.safe_load(raw))
        except yaml.YAMLError:
            raise UsageError(f"--set {item!r}: cannot parse value {raw!r}") from None
    return out


def numbers(value):
    """Turn strings such as '1e-4' (YAML 1.1 reads them as text) into numbers, recursively."""
    if isinstance(value, list):
        return [numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items()}
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def add_run_options(p: argparse.ArgumentParser, smoke_help: str | None = None, default_name: str | None = None,
                    trains: bool = True) -> None:
    """Add the options shared by commands that launch trials (and `--smoke`, described by `smoke_help`);
    `default_name` describes the default experiment name; `trains=False` (post-hoc studies, which train no
    bundle of models) leaves out `--bundle`."""
    if smoke_help:
        p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--address", help="Ray cluster address (host:port or auto); default: embedded Ray here")
    p.add_argument("--storage-path", default="./results", type=expand_path,
                   help="results root, local path or URI (default ./results)")
    p.add_argument("--name", help=f"experiment name (default {default_name or '<study>-<timestamp>'})")
    p.add_argument("--cpus-per-trial", type=float,
                   help="CPUs (torch threads) per trial (default: " + ("picked by `study run` from `study bench`, "
                        "see the README's trial layout section; 1 for tune-mitigation" if trains else "1") + ")")
    p.add_argument("--gpus-per-trial", type=float, help="GPU share per trial, e.g. 0.25 (default 0.25 if GPUs, else 0)")
    p.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    if trains:
        p.add_argument("--bundle", type=int, metavar="K",
                       help="train up to K compatible configs (MLPs) in lock-step per trial (default: picked by "
                            "`study run` on this machine's CPUs, 1 on a GPU or a cluster; 1 = no bundling)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed trial, each from its last checkpoint (default 2)")
    p.add_argument("--static-cluster", action="store_true",
                   help="the cluster at --address has no autoscaler: refuse resources it lacks now instead of "
                        "waiting for workers")
    p.add_argument("--data-dir", type=expand_path,
                   help="directory with the dataset files (else $SPURIOUS_DATA, system folders, cache)")
    p.add_argument("--yes", action="store_true", help="do not ask before launching a large study")
    p.add_argument("-v", "--verbose", type=int, default=1, choices=[0, 1, 2], help="Tune output level")
    p.add_argument("--wandb", default="auto", choices=WANDB_MODES,
                   help="W&B: one run per trial (default auto: online if an API key is configured, else offline)")
    p.add_argument("--wandb-project", default="rare-spurious-study", help="W&B project")
    p.add_argument("--wandb-entity", help="W&B entity (team or user; default: the key's default entity)")


def add_source_arguments(p: argparse.ArgumentParser, source_help: str, setting: str, keys: Sequence[str],
                         selected: str = "source trials") -> None:
    """Add the arguments every post-hoc study takes (`study delete`, `mia`, `detect`): `--from` (the source
    experiment, `source_help`), `--set` (a `setting` of `keys`; a list makes a grid axis) and `--filter`
    (keep the `selected` whose config column matches)."""
    p.add_argument("--from", dest="source", required=True, metavar="EXPERIMENT_DIR", type=expand_path,
                   help=source_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"{setting} ({', '.join(keys)}); a list makes a grid axis")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help=f"keep {selected} whose config column equals VALUE (or one of a list); repeatable")


def setting_keys(settings_class: type, fixed: Sequence[str]) -> list[str]:
    """Return the fields of a post-hoc trial's settings dataclass that `--set` accepts (all but `fixed`)."""
    from dataclasses import fields

    return [f.name for f in fields(settings_class) if f.name not in fixed]


def check_resources(args: argparse.Namespace) -> None:
    """Raise UsageError for a resource flag outside its range."""
    if args.cpus_per_trial is not None and not args.cpus_per_trial >= MIN_CPUS:  # NaN fails too
        raise UsageError(f"--cpus-per-trial must be at least {MIN_CPUS} (Ray's resource precision), got "
                         f"{args.cpus_per_trial}")
    if args.gpus_per_trial is not None and not args.gpus_per_trial >= 0:
        raise UsageError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    bundle = getattr(args, "bundle", None)
    if bundle is not None and bundle < 1:
        raise UsageError(f"--bundle must be >= 1, got {args.bundle}")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures must be >= 0, got {args.max_failures}")


def check_paths(args: argparse.Namespace) -> None:
    """Raise UsageError for an experiment name that is not one folder name, a --data-dir that does not exist, or
    a local --storage-path that cannot hold experiment folders (nothing is created here)."""
    name = getattr(args, "name", None)
    if name is not None and (not name or name in (".", "..") or "/" in name or "\\" in name):
        raise UsageError(f"--name {name!r} must be one folder name (no '/', not '.' or '..')")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir!r} is not a directory")
    storage = args.storage_path
    if "://" in storage:
        return
    existing = Path(storage).resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not existing.is_dir() else "is not writable"
        raise UsageError(f"--storage-path {storage!r} cannot hold experiments: {str(existing)!r} {what}")


def run_options(args: argparse.Namespace, overrides: dict | None = None) -> RunOptions:
    """Return RunOptions from the shared run flags (checked first; an unreachable --address fails here)."""
    from study import cluster

    check_resources(args)
    check_paths(args)
    cluster.check_address(args.address)
    bundle = getattr(args, "bundle", None)
    return RunOptions(storage_path=args.storage_path, name=args.name, address=args.address,
                      cpus_per_trial=1.0 if args.cpus_per_trial is None else args.cpus_per_trial,
                      gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, data_dir=args.data_dir,
                      smoke=getattr(args, "smoke", False), overrides=overrides or {}, verbose=args.verbose,
                      max_failures=args.max_failures, bundle=1 if bundle is None else bundle,
                      static_cluster=args.static_cluster, auto_cpus=args.cpus_per_trial is None,
                      auto_bundle=bundle is None)


def confirm(count: int, assume_yes: bool) -> None:
    """Ask before launching more than CONFIRM_ABOVE trials; refuse without a terminal unless --yes."""
    if count <= CONFIRM_ABOVE or assume_yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"this study launches {count} trials; pass --yes to confirm")
    answer = input(f"Launch {count} trials? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UsageError("cancelled")
