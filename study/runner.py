"""Builds Tuners from study specs, validates everything before a trial starts, runs and resumes studies."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.utils.util import SafeFallbackEncoder

from analysis import frames
from spurious import bundle, cells, config as config_lib, datasets, dp, models, planted, train
from spurious.errors import SpuriousError
from study import cluster, layout as layout_lib, provenance, space as space_lib, wandb_setup
from study.catalog import StudySpec
from study.options import RunOptions, expand_path
from trainables.train_bundle import train_bundle
from trainables.train_classifier import train_classifier

META_FILE = "study.json"
# The loggers a study's RunConfig carries itself: Tune adds none of its own (`tune_loggers`). study.json records
# them: `study resume` lets Tune add its defaults to a study recorded without.
TUNE_LOGGERS = ("json",)
NO_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


def validate(space: Mapping[str, Any], data: Mapping[str, datasets.Dataset]) -> list[config_lib.TrainConfig]:
    """Return the validated config of every grid point; raise on the first bad one (before any trial)."""
    space_lib.check_domains(space)
    return check_configs([config_lib.from_tune(point) for point in space_lib.points(space)], data)


def check_configs(configs: list[config_lib.TrainConfig],
                  data: Mapping[str, datasets.Dataset]) -> list[config_lib.TrainConfig]:
    """Return `configs` after checking that every name exists, that each model can be built for its dataset
    (and, for DP-SGD, has per-example gradients: `dp.check_model`), and that each planting and validation split
    can be drawn from its dataset (raise a one-line SpuriousError on the first bad one, before any trial)."""
    built: set = set()
    for cfg in configs:
        train.validate_names(cfg)
        if (cfg.model, cfg.dataset, dp.enabled(cfg)) not in built:  # a model per kind: cheap, and catches
            dataset = data[cfg.dataset]                              # what would fail in every trial
            model = models.build(cfg.model, dataset.input_shape, dataset.num_classes)
            if dp.enabled(cfg):
                dp.check_model(model, cfg.model)
            built.add((cfg.model, cfg.dataset, dp.enabled(cfg)))
        y = data[cfg.dataset].y_train  # canonical (config.from_tune)
        if cfg.targets:
            idx = planted.choose_spurious_two_class(y, cfg.targets[0], cfg.targets[1], cfg.n_spurious, cfg.data_seed)
        else:
            idx = planted.choose_spurious(y, cfg.target, cfg.n_spurious, cfg.data_seed)
        planted.choose_validation(y, cfg.val_size, cfg.data_seed, exclude=idx)
    return configs


def dataset_names(space: Mapping[str, Any]) -> list[str]:
    """Return the canonical dataset names used anywhere in `space`."""
    names = {config_lib.flatten(p).get("dataset", config_lib.TrainConfig.dataset) for p in space_lib.points(space)}
    return sorted({datasets.DATASETS.canonical(n) for n in names})


def load_datasets(names: list[str], data_dir: str | None) -> dict[str, datasets.Dataset]:
    """Load each dataset once on the driver (they reach the trials through Ray's object store)."""
    return {name: datasets.load(name, data_dir) for name in names}


def start_ray(options: RunOptions) -> None:
    """Join the cluster at `--address`, or start embedded Ray on this machine."""
    if ray.is_initialized():
        return
    cluster.check_address(options.address)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's own start-up notes (INFO) only at -v 2: a refused launch stays one line
    quiet = {"log_to_driver": options.verbose > 1,
             "logging_level": logging.INFO if options.verbose > 1 else logging.WARNING}
    try:
        if options.address:
            ray.init(address=options.address, **quiet)
        else:
            # "local": a new Ray instance here, never one a `ray start` or $RAY_ADDRESS left running
            ray.init(address="local", include_dashboard=False, **quiet)
    except ConnectionError as err:
        raise SpuriousError(f"cannot connect to Ray at {options.address!r}: {err}") from None


def trial_resources(options: RunOptions) -> dict[str, float]:
    """Return per-trial resources {"cpu", "gpu"} (see cluster.plan_resources: refuse only the impossible)."""
    return cluster.plan_resources(options.cpus_per_trial, options.gpus_per_trial, options.address,
                                  options.static_cluster)


def build_trainable(data: Mapping[str, datasets.Dataset], checkpoint_every: int, resources: dict,
                    bundled: bool = False):
    """Return the Tune trainable: data through the object store, resources per trial. `train_classifier` runs
    every trial layout (one model, or cells and models: trainables/train_bundle.py); `bundled` picks
    `train_bundle`, which studies bundled before cells existed were recorded with."""
    fn = train_bundle if bundled else train_classifier
    trainable = tune.with_parameters(fn, datasets=dict(data), checkpoint_every=checkpoint_every)
    return tune.with_resources(trainable, resources)


def cells_space(configs: list[config_lib.TrainConfig], size: int, data: Mapping[str, datasets.Dataset]) -> dict:
    """Return a param space with one grid point per trial of `cells.plan(configs, size)` under the key "run":
    a trial that trains one model for one cell holds that cell's config; any other holds {"bundle": cell
    configs, "models": the model index of each cell}. Each distinct model is trained once (protocol §7.3)."""
    entries = []
    for members, indices in cells.plan(configs, size):
        if len(members) == 1:
            entries.append(members[0].to_dict())
            continue
        # several models in lock-step: a bundle (DP ones only where cells.plan found them batched)
        if max(indices) > 0:
            dataset = data[members[0].dataset]
            bundle.check_bundlable(members[0], dataset.input_shape, dataset.num_classes)
        entries.append({"bundle": [c.to_dict() for c in members], "models": indices})
    return {"run": space_lib.grid(entries)}


def trial_dirname(trial) -> str:
    """Return a short trial directory name: `train_<id>_<pattern>_n<n>_c<class>_d<data seed>_s<seed>` for one
    cell, `cells_<id>` for one model scored as several cells, `bundle_<id>` for several models."""
    spec = trial.config.get("run", trial.config)
    if "bundle" in spec:
        return f"{'bundle' if max(spec.get('models') or [1]) > 0 else 'cells'}_{trial.trial_id}"
    flat = config_lib.flatten(spec, on_clash="path")
    label = "_".join(f"{k}{flat[key]}" for k, key in (("", "pattern"), ("n", "n_spurious"), ("c", "target"),
                                                       ("d", "data_seed"), ("s", "seed")) if key in flat)
    return f"train_{trial.trial_id}" + (f"_{label}" if label else "")


def bundle_dirname(trial) -> str:
    """Return a short trial directory name for a bundle (kept: studies bundled before cells record it)."""
    return f"bundle_{trial.trial_id}"


class ResultLogger(JsonLoggerCallback):
    """Tune's JSON logger (each trial's result.json and params.json) without params.pkl, which nothing reads."""

    def update_config(self, trial, config: dict) -> None:
        self._trial_configs[trial] = config
        with Path(trial.local_path, "params.json").open("w") as f:
            json.dump(config, f, indent=2, sort_keys=True, cls=SafeFallbackEncoder)


def tune_loggers() -> list:
    """Return the loggers a study's RunConfig carries (TUNE_LOGGERS) and tell Tune, through
    TUNE_DISABLE_AUTO_CALLBACK_LOGGERS, to add none of its own: no progress.csv, no TensorBoard events.
    analysis/frames.py, ResultGrid and the W&B replay read only result.json and params.json."""
    tune_defaults(not TUNE_LOGGERS)
    return [ResultLogger()] if "json" in TUNE_LOGGERS else []


def tune_defaults(add: bool) -> None:
    """Let Tune add its default loggers (CSV, JSON, TensorBoard) to the Tuners of this process, or not."""
    os.environ[NO_AUTO_LOGGERS] = "0" if add else "1"


def run_config(options: RunOptions, name: str, callbacks: list | None = None,
               storage_path: str | None = None) -> tune.RunConfig:
    """Return the RunConfig: storage, retries from the last checkpoint, checkpoints kept, `ResultLogger`.

    The callbacks list is copied: Tune appends its own progress reporter to the list it gets, and a list
    shared by two Tuners would hand the second one the first one's finished reporter.
    """
    return tune.RunConfig(
        name=name, storage_path=storage_path or options.storage_uri(),
        callbacks=[*(callbacks or []), *tune_loggers()],
        verbose=options.verbose,
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=options.keep_checkpoints or None))  # 0: keep all


def default_name(spec: StudySpec, smoke: bool) -> str:
    """Return `<study>[-smoke]-<timestamp>`."""
    return f"{spec.name}{'-smoke' if smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class Prepared:
    """Everything validated and loaded for a run, before Ray starts any trial."""

    spec: StudySpec
    space: dict
    configs: list
    data: dict
    name: str
    trials: int = 0
    trainings: int = 0

    @property
    def cells(self) -> int:
        """Return the number of analysed cells (one analysis row each)."""
        return len(self.configs) * self.spec.num_samples


def is_grid_study(spec: StudySpec, space: Mapping[str, Any]) -> bool:
    """Return whether a study's cells are known before it runs: num_samples = 1 and no sampled axis."""
    return spec.num_samples == 1 and not any(space_lib.is_sampled(v) for v in space.values())


def prepare(spec: StudySpec, options: RunOptions) -> Prepared:
    """Resolve the study and validate every trial config and the data; raise SpuriousError on bad input.

    A grid study becomes one Tune trial per distinct training (`cells_space`), the seed policy applied
    (`StudySpec.cells`); a sampled study keeps its param space (one trial per sample, nothing shared).
    """
    name = options.name or default_name(spec, options.smoke)
    check_new(options, name)
    space = spec.resolved(options.smoke, options.overrides)
    data = load_datasets(dataset_names(space), options.data_dir)
    if is_grid_study(spec, space):
        space_lib.check_domains(space)
        configs = check_configs(spec.cells(options.smoke, options.overrides), data)
        choose_layout(options, configs, data, grid=True)
        space = cells_space(configs, options.bundle, data)
        return Prepared(spec, space, configs, data, name, space_lib.count(space), cells.count_trainings(configs))
    choose_layout(options, [], data, grid=False)
    if options.bundle > 1:
        raise SpuriousError("--bundle needs a grid study (num_samples = 1, no sampled axis): sampled configs "
                            "cannot be grouped")
    space = spec.sampled_space(options.smoke, options.overrides)
    configs = validate(space, data)
    count = space_lib.count(space, spec.num_samples)
    return Prepared(spec, space, configs, data, name, count, count)


def choose_layout(options: RunOptions, configs: list[config_lib.TrainConfig], data: Mapping[str, datasets.Dataset],
                  grid: bool) -> layout_lib.Layout:
    """Set `options.cpus_per_trial` and `options.bundle` where the user left them to `study run`
    (study/layout.py: this machine's `study bench` profile, else the built-in rule) and record the layout in
    `options.layout`; return it."""
    user_cpus = None if options.auto_cpus else options.cpus_per_trial
    user_bundle = None if options.auto_bundle else options.bundle
    bundlable = False
    if grid and configs and options.auto_bundle:
        dataset = data[configs[0].dataset]
        try:
            bundle.check_bundlable(configs[0], dataset.input_shape, dataset.num_classes)
            bundlable = len({bundle.compatible_key(c) for c in configs}) < len(configs)
        except SpuriousError:
            bundlable = False
    local = cluster.local_node()
    gpu = (options.gpus_per_trial or 0) > 0 or (options.gpus_per_trial is None and local["gpus"] > 0)
    auto = options.auto_cpus or options.auto_bundle
    chosen = layout_lib.choose(user_cpus, user_bundle, trainings=cells.count_trainings(configs) if configs else 1,
                               grid=grid, bundlable=bundlable, cores=local["cpus"], gpu=gpu,
                               cluster=bool(options.address), profile=layout_lib.load_profile() if auto else None,
                               max_concurrent=options.max_concurrent)
    options.cpus_per_trial, options.bundle = chosen.cpus_per_trial, chosen.bundle
    options.layout = {**chosen.to_meta(), "line": chosen.describe(None if options.address else local["cpus"],
                                                                     options.max_concurrent)}
    return chosen


def session_meta(kind: str, study: str, options: RunOptions, logging: wandb_setup.Logging, resources: dict,
                 datasets_used: list[str], trials: int, **extra) -> dict:
    """Return the study.json record every study kind writes: what `study resume` needs to set up the same
    process and trainable in any shell (data, resources, W&B, retries), the kind's own `extra`, and this
    launch's provenance (study/provenance.py: code, software, machine, dataset checksums, command)."""
    return {"study": study, "kind": kind, "datasets": sorted(datasets_used), "data_dir": options.data_dir,
            "resources": resources, "trials": trials, "smoke": options.smoke, "overrides": options.overrides,
            "max_failures": options.max_failures, "keep_checkpoints": options.keep_checkpoints,
            "max_concurrent": options.max_concurrent, "bundle": options.bundle,
            "static_cluster": options.static_cluster, "wandb": logging.to_meta(),
            **({"layout": options.layout} if options.layout else {}), "tune_loggers": list(TUNE_LOGGERS), **extra,
            "provenance": provenance.collect(datasets_used, options.data_dir, resources)}


def write_meta(path: str | Path, meta: Mapping[str, Any]) -> None:
    """Write study.json into an experiment directory (a local path or a URI); SpuriousError (one line) when the
    storage refuses."""
    try:
        write_text(join(path, META_FILE), json.dumps(meta, indent=2, default=str))
    except OSError as err:
        raise SpuriousError(f"cannot write experiment {str(path)!r}: {err.strerror or err}") from None


def check_local_resources(options: RunOptions) -> None:
    """On embedded Ray (no --address), refuse per-trial resources this machine lacks (one line), before Ray starts."""
    if not options.address:
        cluster.plan_resources(options.cpus_per_trial, options.gpus_per_trial, None, nodes=[cluster.local_node()])


def begin(options: RunOptions) -> dict[str, float]:
    """Start a launch: refuse on embedded Ray what this machine lacks (before Ray starts), join or start Ray,
    plan per-trial resources and check the storage is shared; return the resources."""
    check_local_resources(options)
    start_ray(options)
    resources = trial_resources(options)
    cluster.check_storage(options.storage_uri())
    return resources


def join(base: str | Path, name: str) -> str | Path:
    """Return `base/name` for a local path (a Path) or a URI such as s3://bucket/dir (a string)."""
    return f"{str(base).rstrip('/')}/{name}" if "://" in str(base) else Path(base) / name


def location(path: str | Path) -> str | Path:
    """Return an experiment location as given on the command line: a URI as is, a local path resolved."""
    return str(path) if "://" in str(path) else Path(expand_path(path)).resolve()


def write_text(path: str | Path, text: str) -> None:
    """Write a small text file to a local path or a URI (pyarrow's file systems: s3://, gs://, …)."""
    if "://" not in str(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(str(path))
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as stream:
        stream.write(text.encode())


def read_text(path: str | Path) -> str:
    """Read a small text file from a local path or a URI; FileNotFoundError when it is missing."""
    if "://" not in str(path):
        return Path(path).read_text()
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(str(path))
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode()


def print_unfinished(df, planned: int, experiment_path: str) -> bool:
    """Print how many of the `planned` trials of a study's `load` frame `df` did not finish and how to continue
    them (`analysis.frames.unfinished_trials`); return whether any did not (an interrupted run: exit 130)."""
    unfinished = frames.unfinished_trials(df, planned)
    if unfinished:
        print(f"interrupted: {unfinished} of {planned} trials did not finish; `study resume {experiment_path}` "
              "continues them")
    return unfinished > 0


def read_meta(path: str | Path) -> dict:
    """Return the study metadata stored in an experiment directory (local or URI)."""
    if "://" not in str(path) and not Path(path).exists():
        raise SpuriousError(f"{str(path)!r} does not exist (expected a study experiment directory)")
    if "://" not in str(path) and not Path(path).is_dir():
        raise SpuriousError(f"{str(path)!r} is a file, not a study experiment directory")
    try:
        return json.loads(read_text(join(path, META_FILE)))
    except FileNotFoundError:
        raise SpuriousError(f"{str(path)!r} is not a study experiment directory (no {META_FILE})") from None


@dataclass
class Launch:
    """A validated study of any kind, ready to run (nothing started yet): what the runner needs from a kind.

    `meta` holds the kind's own study.json fields, from which `study resume` rebuilds its trainable
    (study/kinds.py); `tune` the kind's extra TuneConfig arguments.
    """

    kind: str
    study: str
    name: str
    space: dict
    data: dict
    trials: int
    meta: dict = field(default_factory=dict)
    tune: dict = field(default_factory=dict)
    num_samples: int = 1


def check_new(options: RunOptions, name: str) -> None:
    """Refuse to overwrite an existing local experiment directory (one line, pointing to `study resume`)."""
    target = join(options.storage_uri(), name)
    if "://" not in options.storage_uri() and Path(target).exists():
        raise SpuriousError(f"experiment {str(target)!r} already exists; continue it with `study resume "
                            f"{target}` or choose another --name")


def launch(plan: Launch, options: RunOptions, trainable_of: Callable[[dict, dict, dict], Any],
           logging: wandb_setup.Logging | None = None,
           preflight: Callable[[Launch], None] | None = None) -> tune.ResultGrid:
    """Run a study of any kind through a Tuner and return its ResultGrid.

    One path for every kind: refuse an existing experiment, join or start Ray, plan per-trial resources
    (cluster.plan_resources), check the storage is shared, run the kind's `preflight(plan)` check, record
    study.json (local or URI) and fit a Tuner with the kind's trainable — `trainable_of(meta, data,
    resources)`, built from the same study.json fields `study resume` uses (study/kinds.py) — and W&B
    callbacks per `logging`.
    """
    logging = logging or wandb_setup.Logging()
    check_new(options, plan.name)
    resources = begin(options)
    if preflight:
        preflight(plan)
    save_state_often(plan.trials)
    exp_path = join(options.storage_uri(), plan.name)
    meta = session_meta(plan.kind, plan.study, options, logging, resources, list(plan.data), plan.trials,
                        **plan.meta)
    write_meta(exp_path, meta)
    logging = replace(logging, provenance=meta["provenance"])  # each W&B run's config carries it too
    tuner = tune.Tuner(trainable_of(meta, plan.data, resources), param_space=space_lib.to_tune(plan.space),
                       tune_config=tune.TuneConfig(num_samples=plan.num_samples,
                                                   max_concurrent_trials=options.max_concurrent, **plan.tune),
                       run_config=run_config(options, plan.name, logging.callbacks(exp_path, plan.name)))
    return tuner.fit()


def train_launch(prepared: Prepared, options: RunOptions) -> Launch:
    """Return the Launch of a prepared training study (bundled when --bundle > 1)."""
    return Launch("train", prepared.spec.name, prepared.name, prepared.space, prepared.data, prepared.trials,
                  meta={"checkpoint_every": prepared.spec.checkpoint_every, "seed_policy": prepared.spec.seed_policy,
                        "cells": prepared.cells, "trainings": prepared.trainings},
                  tune={"reuse_actors": True, "trial_dirname_creator": trial_dirname if "run" in prepared.space
                        else None},
                  num_samples=prepared.spec.num_samples)


def train_trainable(meta: Mapping[str, Any], data: Mapping[str, datasets.Dataset], resources: dict):
    """Return a training study's trainable as its study.json describes it."""
    # studies bundled before cells existed recorded no "cells" and run train_bundle's layout
    return build_trainable(data, meta["checkpoint_every"], resources, meta.get("bundle", 1) > 1 and "cells" not in meta)


def save_state_often(trials: int) -> None:
    """Save Tune's experiment state every 2 s for studies of up to 1,000 trials (Tune's default is every
    10 s or more), so a killed driver loses at most 2 s of trial bookkeeping; larger studies keep Tune's
    adaptive period because saving their state costs more."""
    if trials <= 1000:
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")


@dataclass
class Reopened:
    """An interrupted experiment of any kind, with this process set up as its launch set it up."""

    path: str | Path
    meta: dict
    options: RunOptions
    resources: dict
    data: dict
    logging: wandb_setup.Logging


def reopen(path: str | Path, address: str | None = None, verbose: int = 1) -> Reopened:
    """Set up this process to continue the experiment at `path` (local or URI), whatever shell it runs in.

    From study.json: W&B mode and directory (the callbacks restored from tuner.pkl need them; an online
    study needs an API key here too), the data directory, per-trial resources, retries, concurrency and
    Tune's state-saving period; Ray is joined at `address` (default: embedded). Raises SpuriousError (one
    line) for a directory that is not a restorable study.
    """
    path = location(path)
    meta = read_meta(path)
    if not tune.Tuner.can_restore(str(path)) and meta.get("kind") != "tune-mitigation":
        raise SpuriousError(f"{str(path)!r} holds no restorable Tune experiment")
    text = str(path).rstrip("/")
    res = meta.get("resources", {})
    options = RunOptions(storage_path=text.rsplit("/", 1)[0], name=text.rsplit("/", 1)[-1], address=address,
                         cpus_per_trial=res.get("cpu", 1.0), gpus_per_trial=res.get("gpu"),
                         max_concurrent=meta.get("max_concurrent"), data_dir=meta.get("data_dir"),
                         smoke=bool(meta.get("smoke")), overrides=meta.get("overrides") or {},
                         max_failures=meta.get("max_failures", 2), keep_checkpoints=meta.get("keep_checkpoints", 2),
                         verbose=verbose, bundle=meta.get("bundle", 1),
                         static_cluster=bool(meta.get("static_cluster")))
    logging = wandb_setup.Logging.from_meta(meta)
    logging.reactivate(path)
    # a restored Tuner carries the loggers its launch gave it: Tune adds its own only to one that has none
    tune_defaults(not meta.get("tune_loggers"))
    data = load_datasets(meta["datasets"], options.data_dir)
    start_ray(options)
    save_state_often(int(meta.get("trials", 0)))
    resources = trial_resources(options)
    meta = record_resume(path, meta, provenance.collect(meta["datasets"], options.data_dir, resources))
    return Reopened(path, meta, options, resources, data, replace(logging, provenance=meta["resumed"][-1]))


def record_resume(path: str | Path, meta: Mapping[str, Any], record: Mapping[str, Any]) -> dict:
    """Return study.json `meta` with a resume's provenance `record` appended to "resumed" (the launch's own
    "provenance" stays as it was), and write it back to the experiment at `path`."""
    meta = {**meta, "resumed": [*meta.get("resumed", []), dict(record)]}
    write_meta(path, meta)
    return meta


def resume(again: Reopened, trainable_of: Callable[[dict, dict, dict], Any],
           retry_errored: bool = False) -> tune.ResultGrid:
    """Continue a reopened study of a Tune-experiment kind with its trainable `trainable_of(meta, data,
    resources)`: finished trials stay finished, unfinished ones restart from their checkpoints (errored ones
    too with `retry_errored`)."""
    # Restoring reads every trial's results; those that never started before the interruption have none, which
    # Ray reports as a warning with a FileNotFoundError per trial. They run now: nothing is missing.
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        tuner = tune.Tuner.restore(str(again.path), trainable=trainable_of(again.meta, again.data, again.resources),
                                   resume_unfinished=True, resume_errored=retry_errored)
    finally:
        quiet.setLevel(level)
    return tuner.fit()
