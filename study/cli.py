"""`study`: run and inspect rare-spurious-correlation studies on Ray Tune.

Examples::

    study list
    study show demo
    study run demo                       # real Fashion-MNIST, embedded Ray, ~4 min on 2 CPUs
    study run demo --smoke --set n_spurious=[0,3,10]
    study run paper-mlp --address auto --gpus-per-trial 0.25 --storage-path s3://bucket/studies
    study resume results/demo-20261128-120000
    study bench
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import yaml

from spurious.errors import SpuriousError

CONFIRM_ABOVE = 100


class UsageError(SpuriousError):
    """A command-line mistake."""


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
            out[key] = _numbers(yaml.safe_load(raw))
        except yaml.YAMLError:
            raise UsageError(f"--set {item!r}: cannot parse value {raw!r}") from None
    return out


def _numbers(value):
    """Turn strings such as '1e-4' (YAML 1.1 reads them as text) into numbers, recursively."""
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Add the options shared by commands that launch trials."""
    p.add_argument("--address", help="Ray cluster address (host:port or auto); default: embedded Ray here")
    p.add_argument("--storage-path", default="./results", help="results root, local path or URI (default ./results)")
    p.add_argument("--name", help="experiment name (default <study>-<timestamp>)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float, help="GPU share per trial, e.g. 0.25 (default 0.25 if GPUs, else 0)")
    p.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    p.add_argument("--bundle", type=int, default=1, metavar="K",
                   help="train up to K compatible configs (MLPs) in lock-step per trial (default 1: no bundling)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failed trial, each from its last checkpoint (default 2)")
    p.add_argument("--data-dir", help="directory with the dataset files (else $SPURIOUS_DATA, system folders, cache)")
    p.add_argument("--yes", action="store_true", help="do not ask before launching a large study")
    p.add_argument("-v", "--verbose", type=int, default=1, choices=[0, 1, 2], help="Tune output level")
    p.add_argument("--wandb", default="auto", choices=["auto", "off", "offline", "online"],
                   help="W&B: one run per trial (default auto: online if an API key is configured, else offline)")
    p.add_argument("--wandb-project", default="rare-spurious-study", help="W&B project")
    p.add_argument("--wandb-entity", help="W&B entity (team or user; default: the key's default entity)")


def build_parser() -> argparse.ArgumentParser:
    """Return the `study` argument parser."""
    parser = argparse.ArgumentParser(prog="study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Examples:\n" + __doc__.split("::\n")[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list the catalog's studies")
    show = sub.add_parser("show", help="show a study's resolved param space and trial count")
    show.add_argument("study", help="catalog name or YAML file")
    show.add_argument("--smoke", action="store_true")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    run = sub.add_parser("run", help="run a study (catalog name or YAML file)")
    run.add_argument("study", help="catalog name or YAML file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key; a list makes a grid axis (repeatable)")
    run.add_argument("--smoke", action="store_true", help="run the study's tiny smoke variant")
    add_run_options(run)
    res = sub.add_parser("resume", help="finish an interrupted study")
    res.add_argument("experiment", help="experiment directory")
    res.add_argument("--retry-errored", action="store_true", help="also retry errored trials from their checkpoints")
    res.add_argument("--address", help="Ray cluster address (default: embedded Ray here)")
    res.add_argument("-v", "--verbose", type=int, default=1, choices=[0, 1, 2])
    bench = sub.add_parser("bench", help="benchmark the engine against a reference-shaped loop, and the harness")
    bench.add_argument("--data-dir")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--skip-harness", action="store_true", help="skip the Ray Tune harness benchmark")
    bench.add_argument("--bundle-sizes", default="1,8,32",
                       help="bundle sizes K to measure, comma-separated (e.g. 1,8,32,128 on a GPU; empty: skip)")
    bench.add_argument("--bundle-epochs", type=int, default=2, help="timed epochs per setting (best of)")
    bench.add_argument("--train-subset", type=int, help="use only the first N training images (large K on a CPU)")
    parser.set_defaults(_handlers={**COMMANDS, **_extensions(sub)})
    return parser


def cmd_list(args) -> int:
    from study import catalog

    for name in catalog.names():
        spec = catalog.get(name)
        print(f"{name:16s} {spec.trial_count():>6d} trials  {spec.description.splitlines()[0]}")
    return 0


def cmd_show(args) -> int:
    from study import catalog, runner

    spec = catalog.get(args.study)
    overrides = parse_set(args.set)
    space = spec.resolved(args.smoke, overrides)
    runner.check_domains(space)
    print(spec.description or spec.name)
    print(yaml.safe_dump(_printable(space), sort_keys=False, width=110))
    print(f"trials: {spec.trial_count(args.smoke, overrides)}  checkpoint every {spec.checkpoint_every} epochs"
          f"{'  expected: ' + spec.expected_time if spec.expected_time else ''}")
    return 0


def _printable(value):
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def confirm(count: int, assume_yes: bool) -> None:
    """Ask before launching more than CONFIRM_ABOVE trials; refuse without a terminal unless --yes."""
    if count <= CONFIRM_ABOVE or assume_yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"this study launches {count} trials; pass --yes to confirm")
    answer = input(f"Launch {count} trials? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UsageError("cancelled")


def run_options(args) -> "runner.RunOptions":
    """Return RunOptions from the shared run flags (checked first)."""
    from study import runner

    _check_resources(args)
    runner.check_address(args.address)
    return runner.RunOptions(storage_path=args.storage_path, name=args.name, address=args.address,
                             cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                             max_concurrent=args.max_concurrent, data_dir=args.data_dir, smoke=args.smoke,
                             overrides=parse_set(args.set), verbose=args.verbose, max_failures=args.max_failures,
                             bundle=args.bundle)


def cmd_run(args) -> int:
    from study import catalog, runner, wandb_setup

    options = run_options(args)
    spec = catalog.get(args.study)
    wandb_mode = wandb_setup.resolve_mode(args.wandb)
    confirm(spec.trial_count(options.smoke, options.overrides), args.yes)
    if spec.kind == "tune-mitigation":
        from study import mitigation_cmd

        return mitigation_cmd.run_spec(spec, options, args)
    prepared = runner.prepare(spec, options)
    bundles = f" in {len(prepared.space['bundle']['grid_search'])} bundle trials" if options.bundle > 1 else ""
    print(f"study {spec.name}: {len(prepared.configs) * spec.num_samples} trials{bundles} -> "
          f"{options.storage_uri()}/{prepared.name}", flush=True)
    experiment_dir = f"{options.storage_uri()}/{prepared.name}"
    callbacks = wandb_setup.callbacks(wandb_mode, args.wandb_project, args.wandb_entity, experiment_dir,
                                      prepared.name)
    results = runner.run(prepared, options, callbacks=callbacks)
    code = finish(results.experiment_path)
    wandb_setup.print_sync_hint(wandb_mode, experiment_dir)
    return code


def _check_resources(args) -> None:
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.bundle < 1:
        raise UsageError(f"--bundle must be >= 1, got {args.bundle}")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures must be >= 0, got {args.max_failures}")


def cmd_resume(args) -> int:
    from study import runner

    options = runner.RunOptions(address=args.address, verbose=args.verbose)
    path = runner.location(args.experiment)
    meta = runner.read_meta(path)
    if meta.get("kind") == "tune-mitigation":
        from study import mitigation

        mitigation.resume(path, meta, options, args.retry_errored)
        return 0
    if meta.get("kind") in ("delete", "mia"):
        from study import posthoc

        return posthoc.resume_cmd(path, options, args.retry_errored)
    results = runner.resume(path, args.retry_errored, options)
    return finish(results.experiment_path)


def finish(experiment_path: str) -> int:
    """Print the spurious-score table and the experiment path; exit 1 if any trial errored."""
    from analysis import frames

    if "://" in str(experiment_path):
        print(f"\nexperiment: {experiment_path}\n(copy it to a local folder and run `study report` on it for "
              f"tables and figures)")
        return 0
    df = frames.load(experiment_path)
    print()
    print(frames.score_table(df))
    errored = frames.errored(df)
    for line in errored:
        print(f"errored: {line}")
    print(f"\nexperiment: {experiment_path}")
    return 1 if errored else 0


def cmd_bench(args) -> int:
    from study import bench

    try:
        sizes = tuple(int(k) for k in args.bundle_sizes.split(",") if k.strip())
    except ValueError:
        raise UsageError(f"--bundle-sizes {args.bundle_sizes!r} must be comma-separated integers") from None
    if any(k < 1 for k in sizes) or args.bundle_epochs < 1 or (args.train_subset is not None and args.train_subset < 1):
        raise UsageError("--bundle-sizes, --bundle-epochs and --train-subset must be >= 1")
    bench.main(data_dir=args.data_dir, repeats=args.repeats, harness=not args.skip_harness, bundle_sizes=sizes,
               bundle_epochs=args.bundle_epochs, train_subset=args.train_subset)
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "run": cmd_run, "resume": cmd_resume, "bench": cmd_bench}
# Modules that add subcommands: each has `register(subparsers) -> {name: handler(args) -> int}`.
EXTENSIONS: tuple[str, ...] = ("study.report_cmd", "study.mitigation_cmd", "study.doctor_cmd", "study.delete_cmd",
                                 "study.mia_cmd")


def _extensions(sub) -> dict:
    import importlib

    handlers = {}
    for module in EXTENSIONS:
        handlers.update(importlib.import_module(module).register(sub))
    return handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `study` console script; user mistakes print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args._handlers[args.command](args)
    except SpuriousError as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("study: interrupted; `study resume EXPERIMENT_DIR` continues a run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
