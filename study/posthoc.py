"""Post-hoc studies: Tune studies whose trials consume the checkpoints of an earlier training study
(`study delete`, `study mia`, `study detect`; the CLI is in delete_cmd.py, mia_cmd.py and detect_cmd.py).

An experiment directory `<storage>/<name>/` is an ordinary Tune experiment, one trial directory per
post-hoc trial, plus `study.json`: kind `delete`, `mia` or `detect`, the source experiment, and the table of source
checkpoints the trainable reads, which `study resume` uses to rebuild the trainable. The source may be a
local or shared directory or a URI (s3://, gs://, file://): checkpoints are read through Ray's storage
layer inside the trials, so a post-hoc study may run on other nodes than the training study did, as long
as they see its storage.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import ray
import yaml
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from analysis import detection as detection_analysis, frames, load, posthoc as posthoc_analysis
from spurious import checkpoint, config as config_lib
from spurious.errors import SpuriousError
from study import cluster, runner, space as space_lib, wandb_setup
from study.options import confirm
from trainables.delete import delete
from trainables.detect import detect
from trainables.mia import mia_attack

KINDS = ("delete", "mia", "detect")
SHADOW_SPLITS = ("mia_shadow", "mia_online")  # membership studies' reference models: nothing of their own to study
# kind -> (trainable, the keyword under which it takes its source table)
TRAINABLES: dict[str, tuple[Callable, str]] = {"delete": (delete, "sources"), "mia": (mia_attack, "targets"),
                                               "detect": (detect, "sources")}
TRIAL_FILES = ("params.json", "result.json", "error.txt")


@dataclass
class Plan:
    """A validated post-hoc study, ready to run: its param space and the source table of its trainable."""

    kind: str
    source: str
    name: str
    space: dict
    sources: dict
    datasets: list[str]
    trials: int
    extra_meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- reading the source study


def is_uri(path: str | Path) -> bool:
    """Return whether `path` is a URI (s3://, gs://, file://) rather than a local path."""
    return "://" in str(path)


def canonical_source(source: str | Path) -> str:
    """Return a source as recorded in study.json: a URI as given, a local path made absolute."""
    return str(source).rstrip("/") if is_uri(source) else str(Path(source).resolve())


def source_name(source: str) -> str:
    """Return the experiment name of a source path or URI (its last component)."""
    return str(source).rstrip("/").rsplit("/", 1)[-1]


def _mirror(uri: str, into: Path) -> None:
    """Copy the per-trial result files of a remote experiment into `into`, the files of its checkpoints as
    empty placeholders, so `analysis.load` can read it without downloading any model."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    for trial in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if trial.type != pafs.FileType.Directory:
            continue
        for item in fs.get_file_info(pafs.FileSelector(trial.path)):
            local = into / trial.base_name / item.base_name
            if item.type == pafs.FileType.Directory and item.base_name.startswith("checkpoint_"):
                local.mkdir(parents=True, exist_ok=True)
                for file in fs.get_file_info(pafs.FileSelector(item.path)):
                    (local / file.base_name).touch()
            elif item.base_name in TRIAL_FILES:
                local.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(item.path) as stream:
                    local.write_bytes(stream.read())


def _file_names(df: pd.DataFrame) -> list[str | None]:
    """Return each row's checkpoint file name: `checkpoint_file` where `load` gives it (a bundle member's
    `member_<k>.pt`), else the file of model 0 in `spurious.checkpoint`'s layout."""
    if "checkpoint_file" not in df:
        return [checkpoint.member_file(0) if isinstance(c, str) else None for c in df["checkpoint"]]
    return [Path(f).name if isinstance(f, str) else None for f in df["checkpoint_file"]]


def source_trials(source: str | Path) -> pd.DataFrame:
    """Return `analysis.load` of the source experiment (a local path or a URI), with `checkpoint` set to each
    trial's latest checkpoint directory as an absolute path or a URI that a trial on any node can read, and
    `file` to the model's file in it."""
    if not is_uri(source):
        path = Path(source).resolve()
        if not path.exists():
            raise SpuriousError(f"source experiment {str(source)!r} does not exist")
        if not path.is_dir():
            raise SpuriousError(f"source experiment {str(source)!r} is a file, not an experiment directory")
        outer = next((p for p in path.parents if (p / runner.META_FILE).is_file()), None)
        if not (path / runner.META_FILE).is_file() and outer is not None:
            kind = runner.read_meta(outer).get("kind", "train")
            raise SpuriousError(f"source {str(source)!r} is a folder inside the {kind} study {str(outer)!r}; pass "
                                "the experiment directory of a training study")
        df = load(path)
        if df.empty:
            raise SpuriousError(f"source experiment {str(source)!r} holds no trials")
        df["file"] = _file_names(df)
        df["checkpoint"] = [str(Path(c).resolve()) if isinstance(c, str) else None for c in df["checkpoint"]]
        return df
    with tempfile.TemporaryDirectory() as tmp:
        _mirror(str(source), Path(tmp))
        df = load(tmp)
        df["file"] = _file_names(df) if not df.empty else []
        base = str(source).rstrip("/")
        df["checkpoint"] = [f"{base}/{Path(c).relative_to(tmp).as_posix()}" if isinstance(c, str) else None
                            for c in df["checkpoint"]]
    if df.empty:
        raise SpuriousError(f"source experiment {str(source)!r} holds no trials")
    return df


def parse_pairs(items: Sequence[str], flag: str = "--filter") -> dict[str, Any]:
    """Parse `key=value` items of `flag`; a value is a YAML scalar or a list."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpuriousError(f"{flag} {item!r} must look like key=value")
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SpuriousError(f"{flag} {item!r}: cannot parse value {raw!r}") from None
    return out


def _matches(column: pd.Series, value: Any) -> pd.Series:
    values = value if isinstance(value, list) else [value]
    if column.name in config_lib.NAMED_KEYS:  # `--filter pattern=v8` selects s3 trials, as typed or canonical
        column = column.map(lambda v: _canonical_or_same(column.name, v))
        values = [_canonical_or_same(column.name, v) for v in values]
    numeric = pd.to_numeric(column, errors="coerce")
    hit = pd.Series(False, index=column.index)
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            hit |= numeric == v
        else:
            hit |= column.astype(str) == str(v)
    return hit


def _canonical_or_same(key: str, value: Any) -> Any:
    try:
        return config_lib.canonical_name(key, value)
    except SpuriousError:
        return value


def apply_filters(df: pd.DataFrame, filters: Mapping[str, Any]) -> pd.DataFrame:
    """Return the rows of `df` whose columns equal every filter's value (or one of its list of values)."""
    for key, value in filters.items():
        if key not in df:
            columns = [c for c in ("trial_id", *frames.CONFIG_COLUMNS) if c in df]
            raise SpuriousError(f"--filter {key!r} is not a column of the source trials; use one of "
                                f"{', '.join(columns)}")
        df = df[_matches(df[key], value)]
    return df


def finished(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Return the TERMINATED trials with a checkpoint, and one note per kind of trial left out."""
    ok = (df["status"] == "TERMINATED") & df["checkpoint"].notna() & df.get("file", df["checkpoint"]).notna()
    notes = []
    for status, count in df[~ok]["status"].value_counts().items():
        why = "no checkpoint" if status == "TERMINATED" else f"status {status}"
        notes.append(f"skipping {count} source trial(s) with {why}")
    return df[ok], notes


def settings_grid(overrides: Mapping[str, Any]) -> tuple[dict, list[dict]]:
    """Return the Tune space of `--set` overrides (a list is a grid axis) and every combination of them."""
    space = {k: space_lib.from_yaml(v, k) for k, v in overrides.items()}
    return space, space_lib.points(space)


# ---------------------------------------------------------------- running and resuming


def build_trainable(kind: str, data: Mapping, sources: Mapping, resources: dict):
    """Return the post-hoc trainable with the datasets and source table bound, and its resources."""
    fn, keyword = TRAINABLES[kind]
    return tune.with_resources(tune.with_parameters(fn, datasets=dict(data), **{keyword: dict(sources)}),
                               resources)


def trainable_of(meta: Mapping[str, Any], data: Mapping, resources: dict):
    """Return a post-hoc study's trainable as its study.json describes it (kind and source table)."""
    if meta.get("kind") not in KINDS:
        raise SpuriousError(f"not a post-hoc study (kind {meta.get('kind')!r})")
    return build_trainable(meta["kind"], data, meta["sources"], resources)


@ray.remote(num_cpus=0)
def _exists(path: str) -> bool:
    return os.path.exists(path)


def check_sources_visible(plan: Plan, timeout_s: float = 60.0) -> None:
    """Refuse, on a multi-node cluster, a local source path that some node cannot see: its trials could not
    read the checkpoints (URIs are read through Ray's storage layer from any node)."""
    probe = next(iter(plan.sources.values()))["checkpoint"]
    if is_uri(probe) or len(cluster.alive_nodes()) <= 1:
        return
    nodes = cluster.alive_nodes()
    refs = [_exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["node_id"], soft=False))
            .remote(probe) for n in nodes]
    missing = [n["address"] for n, ok in zip(nodes, ray.get(refs, timeout=timeout_s)) if not ok]
    if missing:
        raise SpuriousError(f"the source checkpoints under {plan.source!r} are not visible from node(s) "
                            f"{', '.join(missing)}; put the source study on shared storage or a URI")


def run(plan: Plan, options: runner.RunOptions, logging: wandb_setup.Logging | None = None) -> str:
    """Run a planned post-hoc study (W&B per `logging`) through the one runner; return its experiment path."""
    runner.check_new(options, plan.name)
    data = runner.load_datasets(plan.datasets, options.data_dir)
    launch = runner.Launch(plan.kind, plan.kind, plan.name, plan.space, data, plan.trials,
                           meta={"source": plan.source, "sources": plan.sources, **plan.extra_meta})
    return runner.launch(launch, options, trainable_of, logging, preflight=lambda _: check_sources_visible(plan)
                         ).experiment_path


def launch(plan: Plan, notes: list[str], options: runner.RunOptions, args) -> int:
    """Print the notes, confirm a large study, run it (with W&B per `--wandb`) and print its table."""
    runner.check_new(options, plan.name)  # before anything is printed as if it would run
    for note in notes:
        print(note)
    confirm(plan.trials, args.yes)
    logging = wandb_setup.Logging.from_flags(args.wandb, args.wandb_project, args.wandb_entity)
    experiment_dir = runner.join(options.storage_uri(), plan.name)
    print(f"{plan.kind}: {plan.trials} trials -> {experiment_dir}", flush=True)
    code = finish(run(plan, options, logging), plan.kind)
    logging.print_sync_hint(experiment_dir)
    return code


def finish(experiment_path: str, kind: str) -> int:
    """Print the study's table, its errored trials and its path; return 130 when trials are left unfinished
    (an interrupted run: `study resume` continues it), 1 if any trial errored, else 0."""
    df = load(experiment_path)
    meta = runner.read_meta(experiment_path)
    print()
    if kind == "delete":
        print(posthoc_analysis.deletion_table(df))
        if "cg_converged" in df and (df["cg_converged"] == False).any():  # noqa: E712 (NaN for other methods)
            bad = df[df["cg_converged"] == False]  # noqa: E712
            print(f"not converged: {len(bad)} group-influence trial(s) stopped at cg_max_iter before cg_tol "
                  f"(cg_residual up to {bad['cg_residual'].max():.3g}); their update is a partial solve, see "
                  "ihvp_residual: " + ", ".join(map(str, bad["trial_id"])))
    elif kind == "detect":
        print(detection_analysis.detection_text(df))
    elif meta.get("deletion"):
        print(posthoc_analysis.mia_deletion_table(df))
    else:
        print(posthoc_analysis.mia_table(df))
    status = df["status"] if not df.empty else pd.Series(dtype=str)
    errored = df[status == "ERROR"] if not df.empty else df
    for row in errored.itertuples():
        print(f"errored: {row.trial_id}: {row.error or row.status}")
    print(f"\nexperiment: {experiment_path}")
    if runner.print_unfinished(df, int(meta.get("trials", len(df))), experiment_path):
        return 130
    return 1 if len(errored) else 0
