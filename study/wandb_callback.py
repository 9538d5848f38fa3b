"""The Tune callback behind `--wandb`: one W&B run per trial, written from the driver process.

Ray's WandbLoggerCallback gives each trial two Ray actors (a queue and a logger, each a fresh worker process
that imports Ray, the logger W&B too, and starts its own W&B service): on 2 CPU cores that added 42 % to the
demo study's wall time. This callback keeps the runs Ray's made (id = trial id, name = trial name, group,
flat config, history at step = training_iteration, Tune's bookkeeping in the config) but writes every run
from the driver through its one W&B service (`wandb.init(reinit="create_new")` keeps several open), on one
background thread, so a slow online handshake never holds up Tune's event loop.

Example::

    study run demo                  # no API key: offline runs under results/demo-…/wandb/
"""
from __future__ import annotations

import logging
import queue
import threading
from numbers import Number
from typing import Any, Callable, Mapping, Sequence

from ray.tune.logger import LoggerCallback

from spurious import config as config_lib
from study import wandb_runs

log = logging.getLogger(__name__)

# Result keys that never reach a run's history: Tune's flags, and the config (the run's config holds it).
SKIPPED_KEYS = ("done", "should_checkpoint", "config")
# Tune's bookkeeping: to the run's config, not its history (as Ray's callback does).
CONFIG_KEYS = ("trial_id", "experiment_tag", "node_ip", "experiment_id", "hostname", "pid", "date")
CONFIG_FIELDS = frozenset(config_lib.field_names())  # a training config's keys
_STOP = object()


def _flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, item in value.items():
        if isinstance(item, Mapping):
            out.update(_flatten(item, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = item
    return out


def _excluded(key: str, excludes: Sequence[str]) -> bool:
    return any(key == name or key.startswith(name + "/") for name in excludes)


def split_result(result: Mapping[str, Any], excludes: Sequence[str] = (),
                 to_config: Sequence[str] = ()) -> tuple[dict, dict]:
    """Return (history row, config update) of a Tune result: nested dicts flattened with "/", Tune's
    bookkeeping (CONFIG_KEYS) and the `to_config` keys to the config, the `excludes` and SKIPPED_KEYS dropped,
    and of the rest numbers only."""
    row, config = {}, {}
    for key, value in _flatten(result).items():
        if key in CONFIG_KEYS or key in to_config:
            config[key] = value
        elif _excluded(key, (*SKIPPED_KEYS, *excludes)):
            continue
        elif isinstance(value, Number):
            row[key] = value
    return row, config


class TrialRuns(LoggerCallback):
    """One W&B run per Tune trial, opened, logged and finished from the driver on one background thread.

    `init` holds the wandb.init arguments every run shares (mode, dir, project, group, settings, …); each
    run adds the trial's id, name, flat config and tags. A trial retried within a session continues its run;
    a trial restarted by `study resume` gets a new offline run that replaces its earlier one
    (`wandb_runs.supersede_runs`) and first receives the trial's earlier results. A W&B failure is logged as
    a warning and never stops the study.
    """

    def __init__(self, init: Mapping[str, Any], excludes: Sequence[str] = (), finish_timeout: float = 1800):
        """`excludes`: result keys left out of the history (the training config every result carries); those a
        trial's own config lacks (a post-hoc trial reports its source model's config) go to its run's config,
        so W&B can filter and group post-hoc runs by pattern, n_spurious, seeds."""
        self.init = dict(init)
        self.excludes = tuple(excludes)
        self.finish_timeout = finish_timeout
        self._reset()

    def _reset(self) -> None:
        self._open: set[str] = set()  # the driver's view: trials whose run is open
        self._replay: set[str] = set()  # restarted trials whose earlier results go to their new run first
        self._runs: dict[str, Any] = {}  # trial id -> wandb Run, touched by the worker thread only
        self._to_config: dict[str, tuple[str, ...]] = {}  # trial id -> excluded result keys its config lacks
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks into tuner.pkl: the settings, never a thread or an open run
        return {"init": self.init, "excludes": self.excludes, "finish_timeout": self.finish_timeout}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def init_kwargs(self, trial) -> dict:
        """Return the wandb.init arguments of a trial's run."""
        config = wandb_runs.flat_config(trial.config, trial.trainable_name)
        kwargs = {**self.init, "id": trial.trial_id, "name": str(trial), "tags": wandb_runs.run_tags(config),
                  "group": self.init.get("group") or trial.experiment_dir_name,
                  "config": {**self.init.get("config", {}), **config,
                             "trial_log_path": getattr(trial, "local_path", None)},
                  "reinit": "create_new", "allow_val_change": True}
        if kwargs.get("mode") == "online":
            kwargs["resume"] = "allow"  # a restarted trial continues its W&B run on the server
        return kwargs

    def log_trial_start(self, trial) -> None:
        if trial.trial_id in self._open:
            return  # a trial retried after a fault continues its run
        self._open.add(trial.trial_id)
        kwargs = self.init_kwargs(trial)
        if kwargs.get("mode") != "online" and wandb_runs.supersede_runs(kwargs.get("dir"), trial.trial_id):
            self._replay.add(trial.trial_id)
        self._submit(self._start, trial.trial_id, kwargs)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial.trial_id not in self._open:
            self.log_trial_start(trial)
        if trial.trial_id in self._replay:
            self._replay.discard(trial.trial_id)
            for old in wandb_runs.earlier_results(trial, result.get("training_iteration", iteration)):
                self._log(trial, old)
        self._log(trial, result)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial.trial_id in self._open:
            self._open.discard(trial.trial_id)
            self._submit(self._finish, trial.trial_id, failed)

    def on_experiment_end(self, trials: list, **info) -> None:
        """Finish every open run and W&B's service; wait at most `finish_timeout` seconds for them."""
        for trial_id in sorted(self._open):
            self._submit(self._finish, trial_id, False)
        self._open.clear()
        if self._worker is None:
            return
        self._submit(self._teardown)
        self._jobs.put(_STOP)
        self._worker.join(self.finish_timeout)
        if self._worker.is_alive():
            log.warning("W&B: runs still not finished after %g s; leaving them", self.finish_timeout)
        self._worker = None

    def _log(self, trial, result: Mapping[str, Any]) -> None:
        if trial.trial_id not in self._to_config:
            own = wandb_runs.flat_config(trial.config, trial.trainable_name)
            self._to_config[trial.trial_id] = tuple(k for k in self.excludes if k not in own and k in CONFIG_FIELDS)
        row, config = split_result(result, self.excludes, self._to_config[trial.trial_id])
        self._submit(self._write, trial.trial_id, row, config)

    def _submit(self, job: Callable, *args) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._serve, name="wandb-runs", daemon=True)
            self._worker.start()
        self._jobs.put((job, args))

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not _STOP:
            job, args = item
            try:
                job(*args)
            except Exception as err:  # W&B trouble must not stop the study
                log.warning("W&B: %s failed: %s", job.__name__.strip("_"), err)

    def _start(self, trial_id: str, kwargs: dict) -> None:
        import wandb

        self._runs[trial_id] = wandb.init(**kwargs)

    def _write(self, trial_id: str, row: dict, config: dict) -> None:
        run = self._runs.get(trial_id)
        if run is None:
            return  # its start failed (warned once)
        if config:
            run.config.update(config, allow_val_change=True)
        run.log(row, step=row.get("training_iteration"))

    def _finish(self, trial_id: str, failed: bool) -> None:
        run = self._runs.pop(trial_id, None)
        if run is not None:
            run.finish(exit_code=1 if failed else 0)

    def _teardown(self) -> None:
        import wandb

        wandb.teardown()  # returns once W&B's service has written every run file completely
