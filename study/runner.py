"""Builds Tuners from study specs, validates everything before a trial starts, runs and resumes studies."""
from __future__ import annotations

import itertools
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import ray
from ray import tune

from spurious import bundle, config as config_lib, datasets, train
from spurious.errors import SpuriousError
from study import cluster
from study.catalog import StudySpec
from trainables.common import flatten_config
from trainables.train_bundle import train_bundle
from trainables.train_classifier import train_classifier

META_FILE = "study.json"
NONNEGATIVE_KEYS = ("l2", "noise_sigma", "grad_clip")


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

    def storage_uri(self) -> str:
        """Return the storage path as Tune wants it: a URI, or an absolute local path."""
        return self.storage_path if "://" in self.storage_path else str(Path(self.storage_path).resolve())


def grid_combinations(space: Mapping[str, Any]) -> list[dict]:
    """Return every grid point of `space`, with sampled axes replaced by one sample (for validation)."""
    keys = list(space)
    axes = [space[k]["grid_search"] if _is_grid(space[k]) else [_sample(space[k])] for k in keys]
    return [dict(zip(keys, values)) for values in itertools.product(*axes)]


def _is_grid(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"grid_search"}


def _sample(value: Any) -> Any:
    return value.sample() if hasattr(value, "sample") else value


def check_domains(space: Mapping[str, Any]) -> None:
    """Raise if a sampled L2, noise or clip range reaches below zero."""
    for key in NONNEGATIVE_KEYS:
        lower = getattr(space.get(key), "lower", None) if hasattr(space.get(key), "sample") else None
        if isinstance(lower, (int, float)) and lower < 0:
            raise SpuriousError(f"{key} range starts at {lower}; {key} must be >= 0")


def validate(space: Mapping[str, Any], data: Mapping[str, datasets.Dataset]) -> list[config_lib.TrainConfig]:
    """Return the validated config of every grid point; raise on the first bad one (before any trial)."""
    check_domains(space)
    configs = []
    for point in grid_combinations(space):
        cfg = config_lib.from_dict(flatten_config(point))
        train.validate_names(cfg)
        dataset = data[datasets.DATASETS.canonical(cfg.dataset)]
        datasets.choose_spurious(dataset.y_train, cfg.target, cfg.n_spurious, cfg.data_seed)
        configs.append(cfg)
    return configs


def dataset_names(space: Mapping[str, Any]) -> list[str]:
    """Return the canonical dataset names used anywhere in `space`."""
    names = {flatten_config(p).get("dataset", config_lib.TrainConfig.dataset) for p in grid_combinations(space)}
    return sorted({datasets.DATASETS.canonical(n) for n in names})


def load_datasets(names: list[str], data_dir: str | None) -> dict[str, datasets.Dataset]:
    """Load each dataset once on the driver (they reach the trials through Ray's object store)."""
    return {name: datasets.load(name, data_dir) for name in names}


def check_address(address: str | None) -> None:
    """Fail fast with one line if a `host:port` cluster address does not answer."""
    if not address or address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError) as err:
        raise SpuriousError(f"cannot reach Ray cluster at --address {address!r}: {err}") from None


def start_ray(options: RunOptions) -> None:
    """Join the cluster at `--address`, or start embedded Ray on this machine."""
    if ray.is_initialized():
        return
    check_address(options.address)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        if options.address:
            ray.init(address=options.address, log_to_driver=options.verbose > 1)
        else:
            ray.init(include_dashboard=False, log_to_driver=options.verbose > 1)
    except ConnectionError as err:
        raise SpuriousError(f"cannot connect to Ray at {options.address!r}: {err}") from None


def trial_resources(options: RunOptions) -> dict[str, float]:
    """Return per-trial resources; GPUs default to a quarter GPU when the cluster has any, else none."""
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = options.gpus_per_trial
    if gpus is None:
        gpus = 0.25 if cluster_gpus > 0 else 0.0
    if gpus > 0 and cluster_gpus == 0:
        raise SpuriousError(f"--gpus-per-trial {gpus} asked for GPUs but the cluster has none; use 0")
    if options.cpus_per_trial > ray.cluster_resources().get("CPU", 0):
        raise SpuriousError(f"--cpus-per-trial {options.cpus_per_trial} is more than the cluster's "
                            f"{ray.cluster_resources().get('CPU', 0):g} CPUs")
    return {"cpu": options.cpus_per_trial, "gpu": gpus}


def build_trainable(data: Mapping[str, datasets.Dataset], checkpoint_every: int, resources: dict,
                    bundled: bool = False):
    """Return the Tune trainable: data through the object store, resources per trial (per bundle)."""
    fn = train_bundle if bundled else train_classifier
    trainable = tune.with_parameters(fn, datasets=dict(data), checkpoint_every=checkpoint_every)
    return tune.with_resources(trainable, resources)


def bundle_space(configs: list[config_lib.TrainConfig], size: int, data: Mapping[str, datasets.Dataset]) -> dict:
    """Return a param space with one grid point per bundle: compatible configs in chunks of `size`."""
    groups: dict[tuple, list] = {}
    for cfg in configs:
        groups.setdefault(bundle.compatible_key(cfg), []).append(cfg)
    chunks = [members[i:i + size] for members in groups.values() for i in range(0, len(members), size)]
    for members in chunks:
        dataset = data[datasets.DATASETS.canonical(members[0].dataset)]
        bundle.check_bundlable(members[0], dataset.input_shape, dataset.num_classes)
    return {"bundle": tune.grid_search([[c.to_dict() for c in members] for members in chunks])}


def bundle_dirname(trial) -> str:
    """Return a short trial directory name for a bundle (its config is a long list of members)."""
    return f"bundle_{trial.trial_id}"


def run_config(options: RunOptions, name: str, callbacks: list | None = None) -> tune.RunConfig:
    """Return the RunConfig: storage, retries from the last checkpoint, checkpoints kept."""
    return tune.RunConfig(
        name=name, storage_path=options.storage_uri(), callbacks=callbacks or [], verbose=options.verbose,
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=options.keep_checkpoints))


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


def prepare(spec: StudySpec, options: RunOptions) -> Prepared:
    """Resolve the study and validate every trial config and the data; raise SpuriousError on bad input."""
    name = options.name or default_name(spec, options.smoke)
    target = Path(options.storage_uri()) / name
    if "://" not in options.storage_uri() and target.exists():
        raise SpuriousError(f"experiment {str(target)!r} already exists; continue it with `study resume "
                            f"{target}` or choose another --name")
    space = spec.resolved(options.smoke, options.overrides)
    data = load_datasets(dataset_names(space), options.data_dir)
    configs = validate(space, data)
    if options.bundle > 1:
        if spec.num_samples != 1:
            raise SpuriousError("--bundle needs a grid study (num_samples = 1): sampled configs cannot be grouped")
        space = bundle_space(configs, options.bundle, data)
    return Prepared(spec, space, configs, data, name)


def write_meta(path: str | Path, prepared: Prepared, options: RunOptions, resources: dict) -> None:
    """Record what `study resume` needs to rebuild the trainable."""
    meta = {"study": prepared.spec.name, "kind": prepared.spec.kind, "datasets": sorted(prepared.data),
            "data_dir": options.data_dir, "checkpoint_every": prepared.spec.checkpoint_every,
            "resources": resources, "trials": len(prepared.configs) * prepared.spec.num_samples,
            "smoke": options.smoke, "overrides": options.overrides, "max_failures": options.max_failures,
            "keep_checkpoints": options.keep_checkpoints, "max_concurrent": options.max_concurrent,
            "bundle": options.bundle}
    write_text(join(path, META_FILE), json.dumps(meta, indent=2, default=str))


def join(base: str | Path, name: str) -> str | Path:
    """Return `base/name` for a local path (a Path) or a URI such as s3://bucket/dir (a string)."""
    return f"{str(base).rstrip('/')}/{name}" if "://" in str(base) else Path(base) / name


def location(path: str | Path) -> str | Path:
    """Return an experiment location as given on the command line: a URI as is, a local path resolved."""
    return str(path) if "://" in str(path) else Path(path).resolve()


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


def read_meta(path: str | Path) -> dict:
    """Return the study metadata stored in an experiment directory (local or URI)."""
    try:
        return json.loads(read_text(join(path, META_FILE)))
    except FileNotFoundError:
        raise SpuriousError(f"{str(path)!r} is not a study experiment directory (no {META_FILE})") from None


def run(prepared: Prepared, options: RunOptions, callbacks: list | None = None) -> tune.ResultGrid:
    """Run a prepared study through a Tuner and return its ResultGrid."""
    start_ray(options)
    resources = trial_resources(options)
    cluster.check_storage(options.storage_uri())
    _fresh_experiment_state(len(prepared.configs) * prepared.spec.num_samples)
    exp_path = join(options.storage_uri(), prepared.name)
    write_meta(exp_path, prepared, options, resources)
    tuner = tune.Tuner(
        build_trainable(prepared.data, prepared.spec.checkpoint_every, resources, options.bundle > 1),
        param_space=prepared.space,
        tune_config=tune.TuneConfig(num_samples=prepared.spec.num_samples,
                                    max_concurrent_trials=options.max_concurrent, reuse_actors=True,
                                    trial_dirname_creator=bundle_dirname if options.bundle > 1 else None),
        run_config=run_config(options, prepared.name, callbacks))
    return tuner.fit()


def _fresh_experiment_state(trials: int) -> None:
    """Save Tune's experiment state every 2 s for studies of up to 1,000 trials (Tune's default is every
    10 s or more), so a killed driver loses at most 2 s of trial bookkeeping; larger studies keep Tune's
    adaptive period because saving their state costs more."""
    if trials <= 1000:
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")


def resume(path: str | Path, retry_errored: bool = False, options: RunOptions | None = None,
           callbacks: list | None = None) -> tune.ResultGrid:
    """Continue an interrupted study: finished trials stay finished, unfinished ones restart from checkpoints."""
    path = location(path)
    meta = read_meta(path)
    if not tune.Tuner.can_restore(str(path)):
        raise SpuriousError(f"{str(path)!r} holds no restorable Tune experiment")
    options = options or RunOptions()
    start_ray(options)
    _fresh_experiment_state(int(meta.get("trials", 0)))
    data = load_datasets(meta["datasets"], meta.get("data_dir"))
    trainable = build_trainable(data, meta["checkpoint_every"], trial_resources(resume_options(options, meta)),
                                meta.get("bundle", 1) > 1)
    tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                               resume_errored=retry_errored)
    return tuner.fit()


def resume_options(options: RunOptions, meta: dict) -> RunOptions:
    """Return the per-trial resources a study was launched with (from its study.json) as RunOptions."""
    res = meta.get("resources", {})
    return RunOptions(cpus_per_trial=res.get("cpu", options.cpus_per_trial), gpus_per_trial=res.get("gpu"))
