"""`study tune-mitigation`: Optuna (through Ray Tune's OptunaSearch) finds the L2 / input-noise settings that
remove a rare spurious correlation at the least clean-accuracy cost.

Layout of an experiment directory `<storage>/<name>/`:

- `study.json`        what `study resume` needs (kind `tune-mitigation`, the base config, the tuning options);
- `baseline/`         a Tune experiment with one trial: the unmitigated setting (l2 = 0, σ = 0), run first;
- `search/`           the Tune experiment of the search (one trial per proposed setting);
- `confirm/`          a Tune experiment run last: the baseline and the recommended setting (with
                      `--confirm-pareto` every Pareto setting) retrained on fresh seeds and scored on test;
- `optuna.journal`    the Optuna study (journal file storage: survives restarts, safe with concurrent
                      writers; `optuna-dashboard optuna.journal` opens it);
- `tuning.json`, `pareto.csv`, `tradeoff.png`: the result.

Selection reads only the validation split (protocol §10.3): every training holds out `val_size` training
images (`--val-size`, ≥ 1), and the objectives, the constraint, ASHA, the Pareto set and the recommendation
read the `val_*` metrics. `pareto` minimises the validation spurious score and maximises validation accuracy
(multi-objective TPE or NSGA-II) and reports the Pareto set; `constrained` minimises the validation score
subject to validation accuracy ≥ baseline − D (Optuna constraints), and an ASHA scheduler stops settings
whose penalised objective lags at the same epoch. Both recommend the lowest-validation-score setting whose
validation accuracy is within D of the baseline's. The search's trials use data seeds data_seed …
data_seed+K−1; the confirmation retrains with the next `--confirm-seeds` data seeds, which the search never
saw, and only its test metrics are the result (training seed = data seed throughout).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray import tune
from ray.tune.search.optuna import OptunaSearch

import search_spaces as ss
from analysis import tuning as tuning_analysis
from spurious import config as config_lib, dp
from spurious.planted import plant_config
from spurious.errors import SpuriousError, check
from study import runner, space as space_lib, wandb_setup
from study.catalog import StudySpec
from trainables import tune_mitigation as trainable_lib
from trainables.common import dataset_for
from trainables.tune_mitigation import tune_mitigation

OBJECTIVES = ("pareto", "constrained")
# The training settings tune-mitigation owns: off in the baseline, searched or off in the search.
MITIGATION_KEYS = ("l2", "noise_sigma", "dp_noise_multiplier", "dp_max_grad_norm")
SAMPLERS = ("tpe", "nsga2")
JOURNAL = "optuna.journal"


@dataclass(frozen=True)
class TuningOptions:
    """What to search and how: trials, objective, accuracy budget D (a fraction of the images), seeds per
    trial, sampler, bounds, the validation split (`val_size` training images held out of every training) and
    the confirmation (`confirm_seeds` fresh seeds per confirmed setting; `confirm_pareto`: every Pareto
    setting, not only the recommended one)."""

    trials: int = 20
    objective: str = "pareto"
    max_acc_drop: float = 0.02
    seeds: int = 3
    sampler: str = "tpe"
    l2_low: float = 1e-6
    l2_high: float = 1e-1
    sigma_max: float = ss.NOISE_SIGMA_MAX
    tune_lr: bool = False
    sampler_seed: int = 0
    val_size: int = 5000
    confirm_seeds: int = 3
    confirm_pareto: bool = False
    mitigations: tuple = ("l2", "noise")
    dp_noise_low: float = ss.DP_NOISE_RANGE[0]
    dp_noise_high: float = ss.DP_NOISE_RANGE[1]
    dp_clip_low: float = ss.DP_CLIP_RANGE[0]
    dp_clip_high: float = ss.DP_CLIP_RANGE[1]
    max_epsilon: float = 0.0

    def __post_init__(self) -> None:
        config_lib.check_types(self, "tuning option")
        object.__setattr__(self, "mitigations", tuple(self.mitigations))
        unknown = [m for m in self.mitigations if m not in ss.MITIGATIONS]
        checks = [
            (self.objective in OBJECTIVES, f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}"),
            (self.sampler in SAMPLERS, f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}"),
            (0 <= self.max_acc_drop <= 1, f"--max-acc-drop must be in [0, 1], got {self.max_acc_drop}"),
            (self.trials >= 1, f"--trials must be >= 1, got {self.trials}"),
            (self.seeds >= 1, f"--seeds must be >= 1, got {self.seeds}"),
            (self.val_size >= 1, f"--val-size must be >= 1 (tuning selects on a validation split held out of "
                                 f"training), got {self.val_size}"),
            (self.confirm_seeds >= 1, f"--confirm-seeds must be >= 1, got {self.confirm_seeds}"),
            (0 < self.l2_low < self.l2_high, f"l2 bounds must satisfy 0 < low < high, got "
                                             f"[{self.l2_low}, {self.l2_high}]"),
            (self.sigma_max >= 0 and math.isfinite(self.sigma_max),
             f"--sigma-max must be a finite number >= 0, got {self.sigma_max}"),
            (not unknown and len(self.mitigations) > 0,
             f"--mitigations {','.join(map(str, unknown or self.mitigations)) or '(none)'} is not a list of "
             f"{', '.join(ss.MITIGATIONS)}"),
            (len(set(self.mitigations)) == len(self.mitigations), f"--mitigations names one twice: "
                                                                   f"{','.join(self.mitigations)}"),
            (0 < self.dp_noise_low < self.dp_noise_high < math.inf,
             f"--dp-noise-range must satisfy 0 < low < high, got [{self.dp_noise_low}, {self.dp_noise_high}]"),
            (0 < self.dp_clip_low < self.dp_clip_high < math.inf,
             f"--dp-clip-range must satisfy 0 < low < high, got [{self.dp_clip_low}, {self.dp_clip_high}]"),
            (self.max_epsilon >= 0 and math.isfinite(self.max_epsilon),
             f"--max-epsilon must be a finite number > 0 (0 = no budget), got {self.max_epsilon}"),
            (self.max_epsilon == 0 or "dp" in self.mitigations,
             f"--max-epsilon {self.max_epsilon} needs DP-SGD in the search: add dp to --mitigations"),
        ]
        # a bound of a mitigation that is not searched would be recorded but never used: refuse it
        defaults = TuningOptions.__dataclass_fields__
        for mitigation, keys, flag in (("dp", ("dp_noise_low", "dp_noise_high"), "--dp-noise-range"),
                                       ("dp", ("dp_clip_low", "dp_clip_high"), "--dp-clip-range"),
                                       ("l2", ("l2_low", "l2_high"), "--l2-range"),
                                       ("noise", ("sigma_max",), "--sigma-max")):
            changed = any(getattr(self, k) != defaults[k].default for k in keys)
            checks.append((mitigation in self.mitigations or not changed,
                           f"{flag} bounds the {mitigation} search, which --mitigations "
                           f"{','.join(self.mitigations)} leaves out: add {mitigation} or drop {flag}"))
        check(checks)

    @property
    def epsilon_objective(self) -> bool:
        """Whether ε is a third objective of the Pareto search: DP is searched and no --max-epsilon is set."""
        return "dp" in self.mitigations and self.max_epsilon == 0 and self.objective == "pareto"

    def search_seeds(self, data_seed: int) -> list[int]:
        """Return the data seeds (= training seeds) of every search and baseline trial."""
        return list(range(data_seed, data_seed + self.seeds))

    def confirm_seeds_from(self, data_seed: int) -> list[int]:
        """Return the fresh data seeds (= training seeds) of the confirmation: the next ones after the search's."""
        return list(range(data_seed + self.seeds, data_seed + self.seeds + self.confirm_seeds))

    def space(self, base_lr: float, dp_noise_floor: float = 0.0) -> dict:
        """Return the Tune search space (converted to Optuna distributions by OptunaSearch): the searched
        mitigations' spaces (`search_spaces`), the others fixed off (l2 = 0, σ = 0, no DP). `dp_noise_floor`
        raises the noise multiplier's lower bound (the σ that meets --max-epsilon, `dp_noise_floor`)."""
        space: dict = {"l2": 0.0, "noise_sigma": 0.0, "dp_noise_multiplier": 0.0}
        if "l2" in self.mitigations:
            space.update(ss.l2_space((self.l2_low, self.l2_high)))
        if "noise" in self.mitigations:
            space.update(ss.noise_space((0.0, self.sigma_max)))
        if "dp" in self.mitigations:
            space.update(ss.dp_space((max(self.dp_noise_low, dp_noise_floor), self.dp_noise_high),
                                     (self.dp_clip_low, self.dp_clip_high)))
        if self.tune_lr:
            space["lr"] = {"loguniform": [base_lr / 10, base_lr * 10]}
        return space_lib.to_tune(space)


def constraint_of(trial) -> list[float]:
    """Optuna constraints function: the reported validation-accuracy shortfall (≤ 0 is feasible)."""
    return [float(trial.user_attrs.get("constraint", 0.0))]


def make_searcher(options: TuningOptions, journal: Path, study_name: str):
    """Return the OptunaSearch for the objective (validation metrics only), with a journal-file Optuna storage."""
    constrained = options.objective == "constrained"
    sampler_kwargs = {"seed": options.sampler_seed, "constraints_func": constraint_of if constrained else None}
    if options.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(population_size=max(4, min(50, options.trials // 2)),
                                                **sampler_kwargs)
    else:
        sampler = optuna.samplers.TPESampler(n_startup_trials=max(3, min(10, options.trials // 3)),
                                             **sampler_kwargs)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    score, acc = trainable_lib.SELECTION_SCORE, trainable_lib.SELECTION_ACC
    metric, mode = ((score, "min") if constrained else ([score, acc], ["min", "max"]))
    if options.epsilon_objective:  # ε is known before training, but a third objective lets Optuna trade it
        metric, mode = [*metric, trainable_lib.EPSILON], [*mode, "min"]
    return ConstrainedOptunaSearch(metric=metric, mode=mode, sampler=sampler, storage=storage,
                                   study_name=study_name)


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that hands a trial's reported `constraint` to Optuna before telling its result."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and "constraint" in result and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("constraint", float(result["constraint"]))
        super().on_trial_complete(trial_id, result, error)


def base_config(spec: StudySpec, smoke: bool, overrides: dict, val_size: int = 0,
                mitigations: tuple = ()) -> dict:
    """Return the fixed training settings of the tuning study, with `val_size` held-out training images when
    it is ≥ 1; grid axes are not allowed here, nor a `val_size` of the study that differs from `val_size`."""
    space = spec.resolved(smoke, overrides)
    for key, value in space.items():
        if isinstance(value, dict):
            raise SpuriousError(f"tune-mitigation needs one value for {key!r}, got a search axis; "
                                f"set it with --set {key}=VALUE")
    owned = [k for k in MITIGATION_KEYS if k in space and space[k] != getattr(config_lib.TrainConfig, k)]
    if owned:
        raise SpuriousError(f"tune-mitigation sets {owned[0]} itself (off in the baseline; searched or off in the "
                            f"search, see --mitigations): drop {owned[0]}={space[owned[0]]!r} from the study or --set")
    for key in MITIGATION_KEYS:
        space.pop(key, None)
    if "dp" in mitigations and space.get("grad_clip", 0.0):
        raise SpuriousError(f"grad_clip={space['grad_clip']!r} (element-wise clipping of the batch gradient) cannot "
                            "train with DP-SGD's per-example clipping: drop it to search --mitigations dp")
    if val_size:
        if space.get("val_size", val_size) != val_size:
            raise SpuriousError(f"tune-mitigation sets val_size with --val-size ({val_size}); "
                                f"drop val_size={space['val_size']!r} from the study or --set")
        space["val_size"] = val_size
    return config_lib.from_dict(space).to_dict()


def dp_noise_floor(base: dict, tuning: TuningOptions, data) -> float:
    """Return the smallest DP noise multiplier whose ε after the study's epochs is at most --max-epsilon
    (`spurious.dp.noise_for_epsilon`; N the training images after the validation split, q = batch_size / N,
    δ the configured one or 1/N), 0 without a budget. Raises a one-line SpuriousError when that floor is
    not below the search's upper bound (no setting could meet the budget)."""
    if tuning.max_epsilon == 0:
        return 0.0
    cfg = config_lib.from_dict(base)
    n = len(plant_config(dataset_for(data, cfg.dataset), cfg).y_train)
    q, steps, target_delta = dp.sample_rate(cfg, n), cfg.epochs * dp.steps_per_epoch(cfg, n), dp.delta(cfg, n)
    top = dp.epsilon(tuning.dp_noise_high, q, steps, target_delta)
    if top > tuning.max_epsilon:
        raise SpuriousError(f"--max-epsilon {tuning.max_epsilon} is unreachable: even --dp-noise-range's upper bound "
                            f"{tuning.dp_noise_high} gives ε = {top:.3g} after {cfg.epochs} epochs of batch "
                            f"{cfg.batch_size}; raise that bound, or train fewer epochs or smaller batches")
    return dp.noise_for_epsilon(tuning.max_epsilon, q, steps, target_delta)


def _trainable(data, seeds: int, checkpoint_every: int, resources: dict, min_acc: float | None):
    trainable = tune.with_parameters(tune_mitigation, datasets=dict(data), seeds=seeds,
                                     checkpoint_every=checkpoint_every, min_acc=min_acc)
    return tune.with_resources(trainable, resources)


def _scheduler(options: TuningOptions, epochs: int):
    if options.objective != "constrained" or epochs < 3:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", metric="objective", mode="min", max_t=epochs,
                         grace_period=max(1, epochs // 3), reduction_factor=2)


def run_baseline(root: Path, base: dict, tuning: TuningOptions, data, resources: dict, checkpoint_every: int,
                 options: runner.RunOptions, logging: wandb_setup.Logging) -> dict:
    """Run (or finish) the unmitigated baseline on the search's seeds and return its seed-averaged final
    validation metrics (val_spurious_score, val_acc and their s.e.): selection compares with these."""
    path = root / "baseline"
    trainable = _trainable(data, tuning.seeds, checkpoint_every, resources, None)
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space={**base, "l2": 0.0, "noise_sigma": 0.0},
                           run_config=runner.run_config(options, "baseline", logging.callbacks(root, root.name),
                                                        storage_path=str(root)))
    grid = tuner.fit()
    stop_if_interrupted(grid, 1, "baseline", root)
    result = grid[0]
    if result.error or not result.metrics or result.metrics.get("epoch") != base["epochs"]:
        raise SpuriousError(f"the unmitigated baseline did not finish: {result.error}")
    return {k: result.metrics[k] for k in tuning_analysis.SELECTION_KEYS}


def stop_if_interrupted(grid: tune.ResultGrid, planned: int, phase: str, root: Path) -> None:
    """Raise KeyboardInterrupt (the CLI prints its one line and exits 130) when fewer than `planned` trials of a
    phase finished (TERMINATED or ERROR): Tune returns from a fit stopped by Ctrl+C, and the next
    phase must not run on a partial search, nor the confirmation report on test as if it were the result."""
    finished = grid.num_terminated + grid.num_errors
    if finished < planned:
        raise KeyboardInterrupt(f"interrupted in the {phase}: {planned - finished} of {planned} trials did not "
                                f"finish; `study resume {root}` continues the study")


def run_search(root: Path, base: dict, tuning: TuningOptions, data, resources: dict, checkpoint_every: int,
               options: runner.RunOptions, baseline: dict, logging: wandb_setup.Logging,
               retry_errored: bool = False, noise_floor: float = 0.0) -> tune.ResultGrid:
    """Run (or continue) the Optuna search over mitigation settings (the constraint: validation accuracy ≥ the
    baseline's validation accuracy − D); `noise_floor` is `dp_noise_floor`'s, computed once at launch."""
    path = root / "search"
    min_acc = (baseline[trainable_lib.SELECTION_ACC] - tuning.max_acc_drop if tuning.objective == "constrained"
               else None)
    trainable = _trainable(data, tuning.seeds, checkpoint_every, resources, min_acc)
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_errored)
        return tuner.fit()
    searcher = make_searcher(tuning, root / JOURNAL, root.name)
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(tuning, base["epochs"]),
                                  num_samples=tuning.trials, max_concurrent_trials=options.max_concurrent)
    space = tuning.space(base["lr"], noise_floor)
    tuner = tune.Tuner(trainable, param_space={**base, **space}, tune_config=tune_config,
                       run_config=runner.run_config(options, "search", logging.callbacks(root, root.name),
                                                    storage_path=str(root)))
    return tuner.fit()


def run_confirm(root: Path, base: dict, tuning: TuningOptions, settings: list[dict], data, resources: dict,
                checkpoint_every: int, options: runner.RunOptions, logging: wandb_setup.Logging,
                retry_errored: bool = False) -> tune.ResultGrid:
    """Run (or continue) the confirmation: one trial per setting of `settings` (dicts of l2, noise_sigma, lr, as
    `analysis.tuning.confirm_settings` returns them; other keys are dropped), a plain grid, each trial training
    `confirm_seeds` replicates on the fresh data seeds `TuningOptions.confirm_seeds_from` (training seed = data
    seed). Its test metrics are the study's result; nothing selects on them."""
    path = root / "confirm"
    trainable = _trainable(data, tuning.confirm_seeds, checkpoint_every, resources, None)
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_errored)
        return tuner.fit()
    if path.exists():  # killed before Tune first saved its state: nothing there can be restored
        shutil.rmtree(path)
    fixed = {k: v for k, v in base.items() if k not in tuning_analysis.SETTING_KEYS}
    grid = space_lib.grid([{k: setting[k] for k in tuning_analysis.SETTING_KEYS} for setting in settings])
    param_space = {**fixed, "data_seed": tuning.confirm_seeds_from(base["data_seed"])[0], "setting": grid}
    tuner = tune.Tuner(trainable, param_space=param_space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=options.max_concurrent),
                       run_config=runner.run_config(options, "confirm", logging.callbacks(root, root.name),
                                                    storage_path=str(root)))
    return tuner.fit()


def trial_budget(tuning: TuningOptions) -> int:
    """Return the most trials the three phases run: the baseline, the search, and the confirmation (the
    baseline and the recommended setting, or with `confirm_pareto` at most every search setting)."""
    return 1 + tuning.trials + 1 + (tuning.trials if tuning.confirm_pareto else 1)


def run(spec: StudySpec, options: runner.RunOptions, tuning: TuningOptions,
        logging: wandb_setup.Logging | None = None) -> Path:
    """Validate, run the baseline, the search, then the confirmation (W&B per `logging`); write and print the
    result.

    Returns the experiment directory.
    """
    logging = logging or wandb_setup.Logging()
    base = base_config(spec, options.smoke, options.overrides, tuning.val_size, tuning.mitigations)
    prepared = runner.prepare(StudySpec(spec.name, spec.description, base), options)
    root = Path(options.storage_uri()) / prepared.name
    if "://" in str(options.storage_uri()):
        raise SpuriousError("tune-mitigation keeps its Optuna journal next to the results: use a local or "
                            "shared-file-system --storage-path, not a URI")
    if "dp" in tuning.mitigations:  # a model DP-SGD cannot train (BatchNorm) is refused before anything runs
        runner.check_configs([config_lib.from_dict({**base, "dp_noise_multiplier": 1.0})], prepared.data)
    floor = dp_noise_floor(base, tuning, prepared.data)  # an unreachable --max-epsilon fails here, too
    resources = runner.begin(options)
    meta = runner.session_meta("tune-mitigation", spec.name, options, logging, resources, sorted(prepared.data)[:1],
                               trial_budget(tuning), base=base, tuning=asdict(tuning),
                               checkpoint_every=spec.checkpoint_every,
                               **({"dp_noise_floor": floor} if floor else {}))
    runner.write_meta(root, meta)
    logging = replace(logging, provenance=meta["provenance"])  # each W&B run's config carries it too
    print(f"tune-mitigation {spec.name}: baseline + {tuning.trials} settings of {'+'.join(tuning.mitigations)} × "
          f"{tuning.seeds} seeds, selected on "
          f"{tuning.val_size} validation images, confirmed on test with {tuning.confirm_seeds} fresh seeds -> {root}",
          flush=True)
    if floor:
        print(f"privacy budget ε <= {tuning.max_epsilon}: DP noise multiplier searched in [{floor:.4g}, "
              f"{tuning.dp_noise_high}] (the floor reaches ε <= {tuning.max_epsilon} after {base['epochs']} epochs)",
              flush=True)
    return _execute(root, base, tuning, prepared.data, resources, spec.checkpoint_every, options, logging,
                    noise_floor=floor)


def _execute(root: Path, base: dict, tuning: TuningOptions, data, resources: dict, checkpoint_every: int,
             options: runner.RunOptions, logging: wandb_setup.Logging, retry_errored: bool = False,
             noise_floor: float = 0.0) -> Path:
    if base.get("val_size", 0) != tuning.val_size:
        raise SpuriousError(f"{str(root)!r} trains with val_size={base.get('val_size', 0)} but its tuning options say "
                            f"{tuning.val_size}: it predates validation-based selection; start the study again")
    runner.save_state_often(trial_budget(tuning))
    baseline = run_baseline(root, base, tuning, data, resources, checkpoint_every, options, logging)
    search = run_search(root, base, tuning, data, resources, checkpoint_every, options, baseline, logging,
                        retry_errored, noise_floor)
    stop_if_interrupted(search, tuning.trials, "search", root)
    selection = tuning_analysis.select(root, baseline, tuning.max_acc_drop, tuning.epsilon_objective,
                                       tuning.max_epsilon)
    settings = tuning_analysis.confirm_settings(selection, base["lr"], tuning.confirm_pareto)
    confirm = run_confirm(root, base, tuning, settings, data, resources, checkpoint_every, options, logging,
                          retry_errored)
    stop_if_interrupted(confirm, len(settings), "confirmation", root)
    summary = tuning_analysis.write_summary(
        root, baseline, tuning.max_acc_drop, tuning.objective, val_size=tuning.val_size,
        search_seeds=tuning.search_seeds(base["data_seed"]), confirm_seeds=tuning.confirm_seeds_from(base["data_seed"]),
        settings=settings, epsilon_objective=tuning.epsilon_objective, max_epsilon=tuning.max_epsilon)
    print()
    print(tuning_analysis.format_summary(summary))
    print(f"\nOptuna study: optuna-dashboard {root / JOURNAL}")
    print(f"experiment: {root}")
    return root


def exit_code(root: str | Path) -> int:
    """Return the exit code of a finished tune-mitigation study: 1 when a trial errored (tuning.json), else 0."""
    summary = json.loads((Path(root) / "tuning.json").read_text())
    return 1 if summary.get("errored") else 0


def resume(again: "runner.Reopened", retry_errored: bool) -> Path:
    """Continue a tune-mitigation study killed in any phase: finish the baseline if needed, then the search with
    its history, then the confirmation; phases not started yet get the study's W&B callbacks."""
    meta = again.meta
    tuning = config_lib.from_values(TuningOptions, meta["tuning"], "tuning option")
    return _execute(Path(again.path), meta["base"], tuning, again.data, again.resources,
                    meta["checkpoint_every"], again.options, again.logging, retry_errored,
                    noise_floor=meta.get("dp_noise_floor", 0.0))  # recorded at launch whenever it is not 0
