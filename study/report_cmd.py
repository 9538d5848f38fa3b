"""`study report EXPERIMENT_DIR [...] [--out DIR] [--wandb [MODE]] [--wandb-report]`: tables, figures, each
experiment's provenance (code version and commit, software, device, command, dataset checksums) and an index.html.

Examples::

    study report results/demo-20261128-120000                  # -> results/demo-20261128-120000/report/
    study report results/train-… results/deletion-… --out reports/both
    study report results/demo-20261128-120000 --wandb          # also a W&B run (offline unless told online)
    study report results/demo-20261128-120000 --wandb-report   # also a W&B Report over the study's W&B runs

--wandb-report needs the study's runs online, a W&B API key, and wandb-workspaces:
    pip install 'rare-spurious-study[wandb-report]'
"""
from __future__ import annotations

import argparse
from pathlib import Path

from spurious.errors import SpuriousError
from study.options import expand_path


def arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of `study report`."""
    p.description, p.epilog = __doc__.split("\n\n")[0], __doc__.split("::\n")[1]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("experiments", nargs="+", metavar="EXPERIMENT_DIR", type=expand_path,
                   help="experiment directory (several make one report)")
    p.add_argument("--out", type=expand_path, help="output directory (default: FIRST_EXPERIMENT_DIR/report)")
    p.add_argument("--wandb", nargs="?", const="offline", default="off",
                   choices=["auto", "off", "offline", "online"],
                   help="also log the tables and figures to a W&B run; bare --wandb means offline")
    p.add_argument("--wandb-project", default=None, help="W&B project (default rare-spurious-study)")
    p.add_argument("--wandb-entity", default=None, help="W&B entity (team or user)")
    p.add_argument("--wandb-report", action="store_true",
                   help="also save a W&B Report over one experiment's W&B runs: per pattern, the final spurious score "
                        "and test accuracy per n_spurious and their per-epoch curves (mean ± s.e. over seeds); a "
                        "Pareto panel for tune-mitigation; the summary tables (needs W&B online, see below)")


def check_experiment(path: str) -> Path:
    """Return `path` if it is an experiment directory (study.json or trial folders), else raise one line."""
    directory = Path(path)
    if not directory.is_dir():
        raise SpuriousError(f"experiment directory {path!r} does not exist")
    if not (directory / "study.json").exists() and not any(directory.glob("*/params.json")):
        raise SpuriousError(f"{path!r} is not an experiment directory (no study.json and no trial folders)")
    return directory


def cmd_report(args) -> int:
    from analysis import report
    from analysis.frames import study_kind, study_meta
    from study import wandb_setup

    dirs = [check_experiment(p) for p in args.experiments]
    mode = wandb_setup.resolve_mode(args.wandb)
    if args.wandb_report:
        check_wandb_report(dirs)  # before anything is written
    tuning_dirs = [d for d in dirs if study_kind(d) == "tune-mitigation"]
    if tuning_dirs:
        from analysis import tuning

        if len(dirs) > 1:
            raise SpuriousError("report a tune-mitigation experiment on its own (one directory)")
        out = tuning.write_report(dirs[0], args.out)
        print_provenance(dirs)
        print(f"report: {out / 'index.html'}")
        print(f"tables: {out / 'summary.md'}, {out / 'trials.csv'}, {out / 'pareto.csv'}")
    else:
        out = report.write_report(dirs, args.out)
        if (out / "claims.txt").exists():
            print((out / "claims.txt").read_text().rstrip() + "\n")
        print_provenance(dirs)
        print(f"report: {out / 'index.html'}")
        print(f"tables: {out / 'summary.md'}, {out / 'trials.csv'}, {out / 'epochs.csv'} (+ .parquet)")
        from study import provenance

        own = provenance.collect() if mode != "off" else None  # the report run's config records it
        folder = wandb_setup.log_report(out, dirs, mode, args.wandb_project, args.wandb_entity, own)
        if folder is not None:
            print(f"W&B run: {folder}")
            wandb_setup.print_sync_hint(mode, dirs[0])
    if args.wandb_report:
        print(f"W&B report: {save_wandb_report(dirs[0], study_meta(dirs[0]), out, args.wandb_entity)}")
    return 0


def print_provenance(dirs: list[Path]) -> None:
    """Print each experiment's provenance (study.json), a few lines each."""
    from analysis.frames import study_meta
    from analysis.report import provenance_lines

    for d in dirs:
        print(f"provenance of {d.name}:")
        print("".join(f"  {line}\n" for line in provenance_lines(study_meta(d))))


def check_wandb_report(dirs: list[Path]) -> None:
    """Refuse `--wandb-report` (one line) for several experiments, or where no W&B Report can be saved."""
    from analysis.frames import study_meta
    from study import wandb_report

    if len(dirs) != 1:
        raise SpuriousError(f"--wandb-report takes one experiment directory, got {len(dirs)}")
    wandb_report.check(dirs[0], study_meta(dirs[0]))


def save_wandb_report(experiment: Path, meta: dict, out: Path, entity: str | None) -> str:
    """Build the experiment's W&B Report from study.json, its trials and the report's summary.md, save it and
    return its URL; the entity is the study's, else `entity`, else the API key's default."""
    from analysis import frames
    from study import wandb_report

    if meta.get("wandb", {}).get("mode") == "offline":
        print(f"note: {experiment.name} logged to W&B offline; its panels fill once `wandb sync` has uploaded its runs")
    entity = meta.get("wandb", {}).get("entity") or entity or wandb_report.default_entity()
    built = wandb_report.build(meta, frames.load(experiment), experiment.name, entity,
                               (out / "summary.md").read_text())
    return wandb_report.save(built)
