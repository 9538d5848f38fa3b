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
import importlib
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

import yaml

from spurious.errors import SpuriousError
from study.options import UsageError, add_run_options, confirm, expand_path, parse_set, run_options

__all__ = ["main", "build_parser", "parse_set", "UsageError"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, and "module:function" names of its argument set-up and its handler.

    Both are imported only when the command is used, so `study --help`, `study list` and `study show`
    never import torch or Ray.
    """

    name: str
    help: str
    arguments: str
    handler: str


COMMANDS = (
    Command("list", "list the catalog's studies", "study.cli:list_arguments", "study.cli:cmd_list"),
    Command("show", "show a study's resolved param space and trial count", "study.cli:show_arguments",
            "study.cli:cmd_show"),
    Command("run", "run a study (catalog name or YAML file)", "study.cli:run_arguments", "study.cli:cmd_run"),
    Command("resume", "finish an interrupted study of any kind", "study.cli:resume_arguments",
            "study.cli:cmd_resume"),
    Command("report", "write tables, figures and index.html for experiments", "study.report_cmd:arguments",
            "study.report_cmd:cmd_report"),
    Command("tune-mitigation", "Optuna search for the L2 / noise / DP-SGD setting that removes a pattern",
            "study.mitigation_cmd:arguments", "study.mitigation_cmd:handle"),
    Command("delete", "delete the spurious examples from a training study's models (protocol §8)",
            "study.delete_cmd:arguments", "study.delete_cmd:handle"),
    Command("mia", "membership-inference attacks on a membership study's target models, or on the original, "
                   "deleted and retrained models of a deletion study of one (protocol §9)",
            "study.mia_cmd:arguments", "study.mia_cmd:handle"),
    Command("detect", "can the planted examples be found? score a training study's training images for suspicion "
                      "(protocol §12)", "study.detect_cmd:arguments", "study.detect_cmd:handle"),
    Command("doctor", "check cluster, storage, datasets and W&B before a launch", "study.doctor_cmd:arguments",
            "study.doctor_cmd:handle"),
    Command("bench", "benchmark the engine, DP-SGD, bundling, the harness, CLI start-up, W&B and Tune's output",
            "study.cli:bench_arguments",
            "study.cli:cmd_bench"),
)


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the bad value and what is allowed, exit 2 (`study CMD --help` for more)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: Sequence[str] | None = None, full: bool = False) -> argparse.ArgumentParser:
    """Return the `study` argument parser: every subcommand listed, the arguments of the one named in
    `argv` (or of all with `full`) added."""
    parser = Parser(prog="study", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="Examples:\n" + __doc__.split("::\n")[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    words = set(argv or ())
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if full or command.name in words:
            _resolve(command.arguments)(p)
        p.set_defaults(_handler=command.handler)
    return parser


def list_arguments(p: argparse.ArgumentParser) -> None:
    """`study list` takes no arguments."""


def show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=expand_path, help="catalog name or YAML file")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_seed_policy(p)
    add_checkpoint_options(p)


def add_seed_policy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed-policy", choices=["replicate", "reference"],
                   help="training seed of each replicate: replicate = its data seed (replicates differ in planted "
                        "examples and initialisation), reference = seed 0 as the paper did (default: the study's); "
                        "a study or --set that sets `seed` keeps it under either policy")


def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", type=expand_path, help="catalog name or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; a list makes a grid axis (repeatable)")
    add_seed_policy(p)
    add_checkpoint_options(p)
    add_run_options(p, smoke_help="run the study's tiny smoke variant")


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="save a checkpoint every N epochs and at the last (0: only the last; default: the study's)")
    p.add_argument("--keep-checkpoints", type=int, metavar="N",
                   help="checkpoints kept per trial, the latest N (0: all; default: the study's, 2 for most). A "
                        "detection study's loss_trajectory and tracin read every kept checkpoint: see `study detect`")


def checkpointed(spec, args):
    """Return `spec` with `--checkpoint-every` / `--keep-checkpoints` applied; UsageError for a negative value."""
    for flag, value in (("--checkpoint-every", args.checkpoint_every), ("--keep-checkpoints", args.keep_checkpoints)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    return spec.with_checkpoints(args.checkpoint_every, args.keep_checkpoints)


def resume_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Finish an interrupted study of any kind (run, tune-mitigation, delete, mia, detect) in this or a "
                     "fresh shell: data, resources and W&B are set up as study.json records them.")
    p.add_argument("experiment", type=expand_path, help="experiment directory (local path or URI)")
    p.add_argument("--retry-errored", action="store_true", help="also retry errored trials from their checkpoints")
    p.add_argument("--address", help="Ray cluster address (default: embedded Ray here)")
    p.add_argument("-v", "--verbose", type=int, default=1, choices=[0, 1, 2])


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=expand_path)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-harness", action="store_true", help="skip the Ray Tune harness benchmark")
    p.add_argument("--bundle-sizes", default="1,8,32",
                   help="bundle sizes K to measure, comma-separated (e.g. 1,8,32,128 on a GPU; empty: skip)")
    p.add_argument("--bundle-epochs", type=int, default=2, help="timed epochs per setting (best of)")
    p.add_argument("--train-subset", type=int,
                   help="use only the first N training images (bundle, layout, dp, gpu; large K on a CPU)")
    p.add_argument("--packing-trials", type=int, default=8,
                   help="gpu section: trials of the Tune packing measurement (default 8)")
    p.add_argument("--packing-models", default="large_mlp,cnn002",
                   help="gpu section: models whose Tune packing is measured, comma-separated (default large_mlp,cnn002)")
    p.add_argument("--only", choices=["engine", "dp", "bundle", "layout", "harness", "cli", "wandb", "tune-output",
                                      "gpu"],
                   help="run one section only (default: all but tune-output and gpu; dp: seconds per epoch of DP-SGD "
                        "by ghost norms and by per-example gradients against non-DP; gpu: what scripts/gpu-bench.sh "
                        "runs)")
    p.add_argument("--trials", type=int, default=1000,
                   help="trials of the tune-output section's grid of 1-epoch trials (default 1000)")


def cmd_list(args) -> int:
    from study import catalog

    for name in catalog.names():
        spec = catalog.get(name)
        print(f"{name:20s} {spec.trial_count():>6d} {'settings' if spec.kind != 'train' else 'cells   '}  "
              f"{spec.description.splitlines()[0]}")
    return 0


def cmd_show(args) -> int:
    from study import catalog, space as space_lib

    spec = checkpointed(catalog.get(args.study).with_seed_policy(args.seed_policy), args)
    overrides = parse_set(args.set)
    space = spec.resolved(args.smoke, overrides)
    space_lib.check_domains(space)
    if spec.kind == "train" and spec.num_samples == 1 and not any(map(space_lib.is_sampled, space.values())):
        from spurious.config import count_trainings

        configs = spec.cells(args.smoke, overrides, canonical=False)  # quick: no torch (names as typed)
        count = (f"{len(configs)} cells, {count_trainings(configs)} trainings (each distinct model is trained "
                 f"once and scored under every cell that needs it)")
    else:
        count = f"trials: {spec.trial_count(args.smoke, overrides)}"
    if spec.kind == "tune-mitigation":  # what tune-mitigation searches and how (its defaults: see --help)
        tuning = {**spec.tuning, **(spec.smoke_tuning if args.smoke else {})}
        count += "; tuning: " + ", ".join(f"{k}={','.join(v) if isinstance(v, (list, tuple)) else v}"
                                          for k, v in tuning.items())
    print(spec.description or spec.name)  # only now: a bad config above is one line, nothing else
    print(yaml.safe_dump(space, sort_keys=False, width=110))
    print(count)
    sets_seed = "seed" in space or any("seed" in v for v in space_lib.variant_dicts(space))
    print(f"seed policy: {spec.seed_policy} ({SEED_POLICY_TEXT[spec.seed_policy]})"
          + ("; this study sets `seed` itself, which the policy leaves as set" if sets_seed else ""))
    expected = f"  expected: {spec.expected_time}" if spec.expected_time and not args.smoke else ""
    every = ("at the last epoch" if not spec.checkpoint_every else "every epoch" if spec.checkpoint_every == 1
             else f"every {spec.checkpoint_every} epochs and at the last")
    kept = "all kept" if spec.keep_checkpoints == 0 else f"the latest {spec.keep_checkpoints} kept"
    print(f"checkpoints: {every}, {kept}{expected}")
    return 0


SEED_POLICY_TEXT = {"replicate": "each replicate's training seed is its data seed",
                    "reference": "training seed 0 for every replicate, as the paper did; n = 0 replicates are "
                                 "one model"}


def cmd_run(args) -> int:
    from study import catalog, kinds, runner, wandb_setup

    options = run_options(args, parse_set(args.set))
    spec = checkpointed(catalog.get(args.study).with_seed_policy(args.seed_policy), args)
    options.keep_checkpoints = spec.keep_checkpoints
    logging = wandb_setup.Logging.from_flags(args.wandb, args.wandb_project, args.wandb_entity)
    confirm(spec.trial_count(options.smoke, options.overrides), args.yes)
    if spec.kind == "tune-mitigation":
        from study import mitigation_cmd

        if not options.auto_bundle:
            raise UsageError(f"--bundle {options.bundle} applies to training studies; a tune-mitigation trial "
                             f"already trains its models in lock-step (leave --bundle out)")

        return mitigation_cmd.run_spec(spec, options, args)
    prepared = runner.prepare(spec, options)
    runner.check_local_resources(options)  # before the banner: a refused launch is one line
    experiment_dir = runner.join(options.storage_uri(), prepared.name)
    print(f"study {spec.name}: {prepared.cells} cells, {prepared.trainings} trainings in {prepared.trials} "
          f"trial{'s' if prepared.trials != 1 else ''} "
          f"(seed policy {spec.seed_policy}) -> {experiment_dir}", flush=True)
    if options.layout:
        print(options.layout["line"], flush=True)
    results = runner.launch(runner.train_launch(prepared, options), options, runner.train_trainable, logging)
    code = kinds.finish_training(results.experiment_path)
    logging.print_sync_hint(experiment_dir)
    return code


def cmd_resume(args) -> int:
    from study import kinds, runner

    again = runner.reopen(args.experiment, args.address, args.verbose)
    kind = again.meta.get("kind", "train")
    named = f" {again.meta.get('study')!r}" if kind in ("train", "tune-mitigation") else ""  # post-hoc: the path says
    print(f"resuming {kind} study{named}: {again.path}", flush=True)
    return kinds.resume(again, args.retry_errored)


def cmd_bench(args) -> int:
    from study import bench

    try:
        sizes = tuple(int(k) for k in args.bundle_sizes.split(",") if k.strip())
    except ValueError:
        raise UsageError(f"--bundle-sizes {args.bundle_sizes!r} must be comma-separated integers") from None
    for flag, values in (("--bundle-sizes", sizes), ("--bundle-epochs", (args.bundle_epochs,)),
                         ("--train-subset", () if args.train_subset is None else (args.train_subset,)),
                         ("--repeats", (args.repeats,))):
        bad = [v for v in values if v < 1]
        if bad:
            raise UsageError(f"{flag} must be >= 1, got {bad[0]}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir!r} is not a directory")
    if args.packing_trials < 1:
        raise UsageError(f"--packing-trials must be >= 1, got {args.packing_trials}")
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    from spurious import models

    packed = tuple(m.strip() for m in args.packing_models.split(",") if m.strip())
    unknown = [m for m in packed if m not in models.names()]
    if unknown:
        raise UsageError(f"--packing-models {unknown[0]!r} is not a model; allowed: {', '.join(models.names())}")
    bench.main(data_dir=args.data_dir, repeats=args.repeats, harness=not args.skip_harness, bundle_sizes=sizes,
               bundle_epochs=args.bundle_epochs, train_subset=args.train_subset, only=args.only,
               packing_trials=args.packing_trials, packing_models=packed, trials=args.trials)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `study` console script; user mistakes print one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return _resolve(args._handler)(args)
    except SpuriousError as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a message names the experiment (e.g. tune-mitigation's phases)
        print(f"study: {err}" if str(err) else "study: interrupted; `study resume EXPERIMENT_DIR` continues a run",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`study show … | head`): stop quietly
        sys.stderr = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
