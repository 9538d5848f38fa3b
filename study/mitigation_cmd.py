"""`study tune-mitigation`: the CLI of the Optuna mitigation search (see study/mitigation.py)."""
from __future__ import annotations

import argparse

from spurious import config as config_lib
from spurious.errors import SpuriousError
from study.options import add_run_options, expand_path, parse_set, run_options

SMOKE_TUNING = {"confirm_seeds": 2}  # with the catalog's smoke tuning (3 settings × 2 seeds)


def arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of `study tune-mitigation`."""
    p.description = ("Search mitigations (L2 weight, input-noise σ, DP-SGD; optionally lr) with Optuna through "
                     "Ray Tune, after "
                     "evaluating the unmitigated baseline; select on a validation split held out of training, then "
                     "confirm the chosen settings on test with fresh seeds (protocol §10.3).")
    p.add_argument("--study", default="mitigation", type=expand_path,
                   help="tuning study to start from (catalog name or YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a training setting, e.g. --set pattern=r3 --set n_spurious=3")
    p.add_argument("--trials", type=int, help="settings to try (default 20)")
    p.add_argument("--objective", help="pareto (default: score vs accuracy) or constrained")
    p.add_argument("--max-acc-drop", type=float, help="accuracy budget D below the baseline (default 0.02)")
    p.add_argument("--seeds", type=int, help="replicates averaged per setting in the search: data seed = training "
                                             "seed = data_seed … data_seed+K-1 (default 3)")
    p.add_argument("--val-size", type=int, help="training images held out as the validation split that selection "
                                                "reads (default 5000; >= 1)")
    p.add_argument("--confirm-seeds", type=int, help="fresh seeds (after the search's) on which the baseline and "
                                                     "the recommended setting are retrained and tested (default 3)")
    p.add_argument("--confirm-pareto", action="store_true", help="also confirm every Pareto setting on test")
    p.add_argument("--sampler", help="tpe (default) or nsga2")
    p.add_argument("--sigma-max", type=float, help="upper bound of the noise σ search (default 1.0)")
    p.add_argument("--l2-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="log-uniform L2 range (default 1e-6 0.1; the floor stands in for 'off')")
    p.add_argument("--tune-lr", action="store_true", help="also search lr (log-uniform, base/10 … base×10)")
    p.add_argument("--mitigations", metavar="LIST",
                   help="comma-separated mitigations to search together: l2, noise, dp (default l2,noise; the "
                        "others stay off). dp searches DP-SGD's noise multiplier and clip norm, and reports ε")
    p.add_argument("--dp-noise-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="log-uniform DP noise multiplier range (default 0.5 4)")
    p.add_argument("--dp-clip-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="log-uniform DP per-example clip norm range (default 0.1 10)")
    p.add_argument("--max-epsilon", type=float,
                   help="privacy budget: only settings with ε <= this (at δ = dp_delta, default 1/N) are searched, "
                        "by raising the noise multiplier's floor; without it (or with 0) ε is a third Pareto objective")
    add_run_options(p, smoke_help="3 settings × 2 seeds, 1 epoch; confirmation on 2 fresh seeds")


def tuning_options(spec, smoke: bool, args: argparse.Namespace | None = None):
    """Return TuningOptions from the study's defaults, its smoke variant and the command line."""
    from study.mitigation import TuningOptions

    values = {**spec.tuning, **({**spec.smoke_tuning, **SMOKE_TUNING} if smoke else {})}
    if args is not None:
        cli_values = {"trials": args.trials, "objective": args.objective, "max_acc_drop": args.max_acc_drop,
                      "seeds": args.seeds, "sampler": args.sampler, "sigma_max": args.sigma_max,
                      "tune_lr": args.tune_lr or None, "val_size": args.val_size,
                      "confirm_seeds": args.confirm_seeds, "confirm_pareto": args.confirm_pareto or None}
        if args.l2_range:
            cli_values.update(l2_low=args.l2_range[0], l2_high=args.l2_range[1])
        if args.mitigations is not None:
            cli_values["mitigations"] = tuple(m.strip() for m in args.mitigations.split(",") if m.strip())
        if args.dp_noise_range:
            cli_values.update(dp_noise_low=args.dp_noise_range[0], dp_noise_high=args.dp_noise_range[1])
        if args.dp_clip_range:
            cli_values.update(dp_clip_low=args.dp_clip_range[0], dp_clip_high=args.dp_clip_range[1])
        cli_values["max_epsilon"] = args.max_epsilon
        values.update({k: v for k, v in cli_values.items() if v is not None})
    return config_lib.from_values(TuningOptions, values, "tuning option")


def run_spec(spec, options, args: argparse.Namespace) -> int:
    """Run a tune-mitigation study (with W&B per the --wandb flags) and print its result."""
    from study import mitigation, wandb_setup

    tuning = tuning_options(spec, options.smoke, args if args.command == "tune-mitigation" else None)
    logging = wandb_setup.Logging.from_flags(args.wandb, args.wandb_project, args.wandb_entity)
    root = mitigation.run(spec, options, tuning, logging)
    logging.print_sync_hint(root)
    return mitigation.exit_code(root)


def handle(args: argparse.Namespace) -> int:
    from study import catalog

    spec = catalog.get(args.study)
    if spec.kind != "tune-mitigation":
        raise SpuriousError(f"study {args.study!r} is a {spec.kind!r} study, not a tune-mitigation study")
    options = run_options(args, parse_set(args.set))
    return run_spec(spec, options, args)
