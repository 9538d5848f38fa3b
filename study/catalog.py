"""The study catalog: named studies (small Python functions) and YAML study files with the same fields.

Each study is a param space for one trainable plus a smoke variant that runs in about a minute.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import yaml

import search_spaces as ss
from spurious.errors import SpuriousError
from spurious.registry import Registry
from study import space as space_lib

KINDS = ("train", "tune-mitigation")
# How replicates get their training seed (protocol §6.4): `replicate` sets it to the replicate's data seed (unless
# the study sets `seed`), so replicates differ in planted examples and initialisation; `reference` leaves it at
# the config's (0 unless set), as the paper's grids did.
SEED_POLICIES = ("replicate", "reference")


@dataclass(frozen=True)
class StudySpec:
    """A named study: a Tune param space, its smoke variant and how to run it."""

    name: str
    description: str
    space: dict
    smoke: dict = field(default_factory=dict)
    kind: str = "train"
    num_samples: int = 1
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    expected_time: str = ""
    tuning: dict = field(default_factory=dict)
    seed_policy: str = "replicate"

    def __post_init__(self) -> None:
        # search_spaces/ writes grids in the YAML vocabulary ({"grid": [...]}); keep the resolved form
        object.__setattr__(self, "space", space_lib.normalise(self.space))
        if self.seed_policy not in SEED_POLICIES:
            raise SpuriousError(f"seed_policy {self.seed_policy!r} is not one of {', '.join(SEED_POLICIES)}")
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0):
            raise SpuriousError(f"checkpoint_every must be an integer >= 0 (epochs; 0 = only the last), got "
                                f"{self.checkpoint_every!r}")
        if not (isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 0):
            raise SpuriousError(f"keep_checkpoints must be an integer >= 0 (0 = keep all), got "
                                f"{self.keep_checkpoints!r}")

    def with_checkpoints(self, every: int | None, keep: int | None) -> "StudySpec":
        """Return the study with `--checkpoint-every` / `--keep-checkpoints` applied (None: the study's own)."""
        return replace(self, checkpoint_every=self.checkpoint_every if every is None else every,
                       keep_checkpoints=self.keep_checkpoints if keep is None else keep)

    def with_seed_policy(self, policy: str | None) -> "StudySpec":
        """Return the study with its seed policy replaced (None: unchanged); SpuriousError for an unknown one."""
        return self if policy is None else replace(self, seed_policy=policy)

    def cells(self, smoke: bool = False, overrides: dict | None = None, canonical: bool = True) -> list:
        """Return the TrainConfig of every cell of a grid study (num_samples = 1), with the seed policy applied:
        under `replicate` a cell whose point does not set `seed` gets seed = data_seed. Names are made canonical
        unless `canonical` is False (that needs the model registry, hence torch). Raises SpuriousError (one
        line) for a bad config."""
        from spurious import config as config_lib

        out = []
        for point in space_lib.points(self.resolved(smoke, overrides)):
            flat = config_lib.flatten(point)
            if self.seed_policy == "replicate" and "seed" not in flat:
                flat["seed"] = flat.get("data_seed", config_lib.TrainConfig.data_seed)
            cfg = config_lib.from_dict(flat)
            out.append(config_lib.canonical(cfg) if canonical else cfg)
        return out

    def sampled_space(self, smoke: bool = False, overrides: dict | None = None) -> dict:
        """Return the param space of a sampled study (num_samples > 1): under `replicate`, a space that does not
        set `seed` samples one per trial, so samples are independent replicates."""
        space = self.resolved(smoke, overrides)
        if self.seed_policy == "replicate" and "seed" not in space:
            space["seed"] = {"randint": [0, 2**31 - 1]}
        return space

    def resolved(self, smoke: bool = False, overrides: dict | None = None) -> dict:
        """Return the param space with the smoke variant and `--set` overrides applied."""
        space = copy.deepcopy(self.space)
        if smoke:
            space = apply_overrides(space, self.smoke)
        return apply_overrides(space, overrides or {})

    def trial_count(self, smoke: bool = False, overrides: dict | None = None) -> int:
        """Return the number of trials the resolved study creates (a tuning study: settings + baseline)."""
        if self.kind == "tune-mitigation":
            return int({**self.tuning, **(self.smoke_tuning if smoke else {})}.get("trials", 20)) + 1
        return space_lib.count(self.resolved(smoke, overrides), self.num_samples)

    @property
    def smoke_tuning(self) -> dict:
        """Return the tuning options of the smoke variant."""
        return {"trials": 3, "seeds": 2}


STUDIES: Registry[Callable[[], StudySpec]] = Registry("study")


def study(name: str):
    """Register a study function; its docstring is the study's description."""
    def wrap(fn: Callable[[], StudySpec]) -> Callable[[], StudySpec]:
        STUDIES.register(name, fn)
        return fn
    return wrap


@study("demo")
def demo() -> StudySpec:
    """Rare S3/R3 patterns on real Fashion-MNIST with LargeMLP (the README's main job).

    Command: `study run demo` — 16 trials (2 patterns × n ∈ {0, 3, 10, 100} × 2 data seeds), 6 epochs,
    about 4 minutes on 2 CPU cores. Smoke: 2 trials, 1 epoch.
    """
    space = ss.merge({"dataset": "fashion", "model": "large_mlp", "optimizer": "sgd", "lr": 0.01,
                      "momentum": 0.9, "epochs": 6, "batch_size": 128},
                     ss.rarity_grid(["s3", "r3"], [0, 3, 10, 100], [0], [0, 1]))
    return StudySpec("demo", _doc(demo), space, smoke={"epochs": 1, "n_spurious": [0, 100], "pattern": "s3",
                                                        "data_seed": 0},
                     checkpoint_every=2, expected_time="~4 min on 2 CPUs")


@study("detect-demo")
def detect_demo() -> StudySpec:
    """The training half of the detection chain (protocol §12), checkpoints kept for `study detect`.

    S3 and R3 on real Fashion-MNIST with LargeMLP, every second epoch's checkpoint kept for the trajectory
    methods.

    Command: `study run detect-demo --name detect`, then `study detect --from results/detect --method all --yes`
    and `study report results/detect-detect`. 16 cells, 14 trainings (2 patterns × n ∈ {3, 10, 100} × 2 data
    seeds, and the n = 0 model of each seed, shared by both patterns), 8 epochs, checkpoints at epochs 2, 4,
    6 and 8, all kept; the detection step scores the 14 models with 6 methods, the 4 directed ones in both
    directions (140 trials). Smoke: S3, n ∈ {0, 100}, data seed 0, 4 epochs (checkpoints at epochs 2 and 4).
    """
    space = ss.merge({"dataset": "fashion", "model": "large_mlp", "optimizer": "sgd", "lr": 0.01,
                      "momentum": 0.9, "epochs": 8, "batch_size": 128},
                     ss.rarity_grid(["s3", "r3"], [0, 3, 10, 100], [0], [0, 1]))
    return StudySpec("detect-demo", _doc(detect_demo), space,
                     smoke={"epochs": 4, "n_spurious": [0, 100], "pattern": "s3", "data_seed": 0},
                     checkpoint_every=2, keep_checkpoints=0,
                     expected_time="~2 min on 2 CPUs, then ~15 min of `study detect --method all`")


@study("paper-mlp")
def paper_mlp() -> StudySpec:
    """Grid G1 of the paper (protocol §7.1): MNIST and Fashion-MNIST, LargeMLP and CNN002, 6 optimisers.

    Command: `study run paper-mlp --address auto --gpus-per-trial 0.25` — 13,440 trials of 70 epochs
    (2 datasets × 2 models × 6 optimisers × 7 patterns × 8 counts × 2 classes × 5 seeds; the n = 0
    baseline is trained once per pattern and seed). Hours on a GPU cluster. Smoke: Fashion, LargeMLP,
    SGD, S3, n ∈ {0, 100}, 1 epoch.
    """
    smoke = {"dataset": "fashion", "model": "large_mlp", "optim": [ss.G1_OPTIMIZERS[0]], "pattern": "s3",
             "n_spurious": [0, 100], "target": 0, "data_seed": 0, "epochs": 1}
    return StudySpec("paper-mlp", _doc(paper_mlp), ss.g1_space(), smoke=smoke, checkpoint_every=10,
                     expected_time="~13k trials; hours on a GPU cluster", seed_policy="reference")


@study("paper-fashion")
def paper_fashion() -> StudySpec:
    """The reference protocol on Fashion-MNIST (protocol §7.2): LargeMLP, SGD and Adam, classes 0 and 1.

    Command: `study run paper-fashion --address auto --gpus-per-trial 0.25 --bundle 8` — 1,120 cells
    (2 optimisers × 7 patterns × n ∈ {0, 3, 5, 10, 20, 100, 2000, 5000} × 2 classes × 5 data seeds) and
    982 trainings of 70 epochs (seed policy `reference`: training seed 0, so each optimiser's n = 0 cells
    are one model). For a GPU or a cluster. Smoke: SGD, S3, n ∈ {0, 100}, 1 epoch.
    """
    smoke = {"optim": [ss.FASHION_OPTIMIZERS[0]], "pattern": "s3", "n_spurious": [0, 100], "target": 0,
             "data_seed": 0, "epochs": 1}
    return StudySpec("paper-fashion", _doc(paper_fashion), ss.paper_fashion_space(), smoke=smoke,
                     checkpoint_every=10, expected_time="~1k trainings of 70 epochs; hours on one GPU",
                     seed_policy="reference")


@study("paper-fashion-short")
def paper_fashion_short() -> StudySpec:
    """The reference protocol on Fashion-MNIST, shortened to run on 2 CPU cores (protocol §7.2).

    Command: `study run paper-fashion-short --bundle 8` — 147 cells (7 patterns × n ∈ {0, 3, 5, 10, 20,
    100, 2000} × 3 data seeds), class 0, SGD (lr 0.01, momentum 0.9), LargeMLP, 8 epochs instead of 70,
    seed policy `reference`: 127 trainings, about 20 minutes on 2 CPU cores. Its report is in
    docs/results/paper-fashion-short/. Smoke: S3, n ∈ {0, 100}, 1 epoch.
    """
    space = ss.paper_fashion_space(counts=(0, 3, 5, 10, 20, 100, 2000), targets=(0,), data_seeds=(0, 1, 2),
                                   optimizers=ss.FASHION_OPTIMIZERS[:1], epochs=8)
    smoke = {"pattern": "s3", "n_spurious": [0, 100], "data_seed": 0, "epochs": 1}
    return StudySpec("paper-fashion-short", _doc(paper_fashion_short), space, smoke=smoke, checkpoint_every=4,
                     expected_time="~20 min on 2 CPUs with --bundle 8", seed_policy="reference")


@study("two-class")
def two_class() -> StudySpec:
    """Two-class plantings (protocol §3.2): S3 and R3 planted into n images of class 0 AND n of class 1.

    Command: `study run two-class` — 48 cells (2 patterns × n ∈ {0, 3, 10, 100} × 3 data seeds × scored for
    class 0 and class 1) and 21 trainings (each model is scored once per class), Fashion-MNIST, LargeMLP,
    SGD, 6 epochs; about 5 minutes on 2 CPUs. The reference's two-class datasets used MNIST, 70 epochs and
    training seed 0: `--set dataset=mnist --set epochs=70 --seed-policy reference`. Smoke: S3, n ∈ {0, 100},
    data seed 0, 1 epoch.
    """
    space = ss.merge({"dataset": "fashion", "model": "large_mlp", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                      "epochs": 6, "batch_size": 128}, ss.two_class_grid(["s3", "r3"], [0, 3, 10, 100],
                                                                          data_seeds=[0, 1, 2]))
    smoke = {"epochs": 1, "n_spurious": [0, 100], "pattern": "s3", "data_seed": 0}
    return StudySpec("two-class", _doc(two_class), space, smoke=smoke, checkpoint_every=2,
                     expected_time="~5 min on 2 CPUs")


@study("paper-cifar10")
def paper_cifar10() -> StudySpec:
    """Grid G3 of the paper (protocol §7.1): CIFAR-10, aug01 ResNet20, 4 optimisers, wd 1e-4.

    Command: `study run paper-cifar10 --address auto --gpus-per-trial 0.5` — 1,960 trials of 70 epochs
    (4 optimisers × 7 patterns × 7 counts × 2 classes × 5 seeds). Needs the CIFAR-10 python batches
    (`--data-dir`). Smoke: SGD, S3, n ∈ {0, 100}, 1 epoch.
    """
    smoke = {"optim": [ss.G3_OPTIMIZERS[0]], "pattern": "s3", "n_spurious": [0, 100], "target": 0,
             "data_seed": 0, "epochs": 1}
    return StudySpec("paper-cifar10", _doc(paper_cifar10), ss.g3_space(), smoke=smoke, checkpoint_every=10,
                     expected_time="~2k trials; a day on one GPU", seed_policy="reference")


@study("regularization")
def regularization() -> StudySpec:
    """The regularisation sweeps of protocol §10.2 on Fashion-MNIST: weight decay, clipping, input noise.

    Command: `study run regularization` — 665 trials (19 mitigation settings × 7 counts × 5 seeds), Adam
    0.01, S3, class 0, 70 epochs. The reference ran this on MNIST; `--set dataset=mnist` does that.
    Smoke: 3 settings (baseline, l2 1e-3, σ 0.5), n ∈ {0, 100}, 1 epoch.
    """
    smoke = {"mitigation": [{"l2": 0.0, "noise_sigma": 0.0, "grad_clip": 0.0},
                            {"l2": 1e-3, "noise_sigma": 0.0, "grad_clip": 0.0},
                            {"l2": 0.0, "noise_sigma": 0.5, "grad_clip": 0.0}],
             "n_spurious": [0, 100], "data_seed": 0, "epochs": 1}
    return StudySpec("regularization", _doc(regularization), ss.regularization_space("fashion"), smoke=smoke,
                     checkpoint_every=10, expected_time="~665 trials; ~2 h on one GPU")


@study("mitigation")
def mitigation() -> StudySpec:
    """Optuna search for the L2 / input-noise setting that removes S3 (n = 10, class 0) on Fashion-MNIST.

    Command: `study run mitigation` (same as `study tune-mitigation`) — the unmitigated baseline, then
    20 settings × 3 data seeds of LargeMLP (SGD 0.01, 5 epochs), Pareto objective, all selected on a
    5,000-image validation split (protocol §10.3); then the baseline and the recommended setting retrained
    on 3 fresh seeds and reported on the test split. About 20 minutes on 2 CPUs. Smoke: 3 settings × 2
    seeds, 1 epoch.
    """
    base = {"dataset": "fashion", "model": "large_mlp", "pattern": "s3", "n_spurious": 10, "target": 0,
            "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "epochs": 5, "batch_size": 128}
    return StudySpec("mitigation", _doc(mitigation), base, smoke={"epochs": 1}, kind="tune-mitigation",
                     checkpoint_every=2, expected_time="~15 min on 2 CPUs",
                     tuning={"trials": 20, "seeds": 3, "objective": "pareto"})


@study("mitigation-dp")
def mitigation_dp() -> StudySpec:
    """Optuna search of DP-SGD's noise multiplier and clip norm against R3 (n = 10, class 0) on Fashion-MNIST.

    Command: `study tune-mitigation --study mitigation-dp` — the unmitigated baseline, then 12 DP settings
    (noise multiplier 0.5–4, clip norm 0.1–10, both log-uniform) × 2 data seeds of LargeMLP (SGD 0.05 with
    momentum, batch 256, 4 epochs), Pareto on validation score, validation accuracy and ε (`--max-epsilon
    E` makes ε a budget instead; protocol §10.3 and §10.5), then the baseline and every Pareto setting on 2
    fresh seeds on test. The accuracy budget is D = 0.1: DP-SGD costs this model about 8 points of clean
    accuracy in 4 epochs, so with the default 0.02 no DP setting could be recommended. Sized for 2 CPUs (DP
    epochs by ghost norms). Smoke: 3 settings × 2 seeds, 1 epoch.
    """
    base = {"dataset": "fashion", "model": "large_mlp", "pattern": "r3", "n_spurious": 10, "target": 0,
            "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 4, "batch_size": 256}
    return StudySpec("mitigation-dp", _doc(mitigation_dp), base, smoke={"epochs": 1}, kind="tune-mitigation",
                     checkpoint_every=2, expected_time="~4 min on 2 CPUs (measured: docs/results/mitigation-dp)",
                     tuning={"trials": 12, "seeds": 2, "confirm_seeds": 2, "objective": "pareto",
                             "mitigations": ["dp"], "max_acc_drop": 0.1, "confirm_pareto": True})


@study("dp-compare")
def dp_compare() -> StudySpec:
    """DP-SGD against L2 and input noise at matched clean accuracy (protocol §10.5) on Fashion-MNIST.

    Command: `study run dp-compare` — S3 and R3 in class 0 at n ∈ {0, 3, 10, 100}, 3 data seeds, LargeMLP
    (SGD 0.05 with momentum, batch 256, 4 epochs), unmitigated and each of: DP-SGD at noise multiplier 0.5,
    1, 2 (clip norm 1), L2 3e-3, 1e-2, 2e-2, input noise σ 0.4, 0.7, 1.0. `study report` writes each DP
    setting's ε and the planted group's bound beside its score, and matches it with the L2 and noise
    settings of closest clean accuracy. Smoke: R3, n ∈ {0, 10}, one seed, 1 epoch, unmitigated, DP 1.0 and
    L2 1e-2.
    """
    smoke = {"pattern": "r3", "n_spurious": [0, 10], "data_seed": 0, "epochs": 1,
             "mitigation": [v for v in ss.dp_compare_space()["mitigation"]["grid"]
                            if (v["dp_noise_multiplier"], v["l2"], v["noise_sigma"]) in
                            ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1e-2, 0.0))]}
    return StudySpec("dp-compare", _doc(dp_compare), ss.dp_compare_space(), smoke=smoke, checkpoint_every=2,
                     expected_time="210 trainings; ~13 min on 2 CPUs (measured: docs/results/dp-compare)")


@study("mia-train")
def mia_train() -> StudySpec:
    """Target and shadow models for membership inference (protocol §9) on Fashion-MNIST, pattern R3 (v20).

    Command: `study run mia-train`, then `study mia --from results/<experiment>` — 33 trials: per data seed
    0–2 (it also seeds the membership split), a target model per n ∈ {1, 3, 5, 10, 20, 100, 1000} (R3
    planted in class 0 of the target-train quarter) and 4 clean offline shadow models (subset 0: the
    shadow quarter, as the reference; subsets 1–3: random halves of the shadow pool, so thresholds can be
    calibrated on a shadow's known members); LargeMLP, Adam 0.01 (the models the reference's notebook
    attacks), 20 epochs; about 10 minutes on 2 CPUs. Smoke: data seed 0, one target (n = 10) and two
    shadows, 1 epoch.
    """
    space = ss.merge({"dataset": "fashion", "model": "large_mlp", "pattern": "r3", "target": 0,
                      "optimizer": "adam", "lr": 0.01, "epochs": 20, "batch_size": 128}, ss.membership_grid())
    smoke = {"epochs": 1, "data_seed": 0,
             "role": ss.membership_grid([10], [0, 1], [0])["role"]}
    return StudySpec("mia-train", _doc(mia_train), space, smoke=smoke, checkpoint_every=5,
                     expected_time="~10 min on 2 CPUs")


@study("mia-online")
def mia_online() -> StudySpec:
    """Online membership inference (protocol §9.2, §9.7): targets, 32 online shadows per target, 4 offline shadows.

    Command: `study run mia-online --bundle 8`, then `study mia --from results/<experiment>` — per data seed
    0–1, a target model per n ∈ {3, 100} (R3 in class 0) with 32 online shadow models each (random halves
    of the target's pool: its members, planted examples included, and its non-members, so every example has
    about 16 IN and 16 OUT shadows), and 4 offline shadows; LargeMLP, Adam 0.01, 10 epochs; 140 models,
    about 15 minutes on 2 CPUs with `--bundle 8`. `study mia` then runs every attack, online LiRA and RMIA
    included, and reports the planted members' per-example vulnerability. Smoke: data seed 0, n = 10, the
    32 online shadows and 2 offline shadows, 1 epoch.
    """
    space = ss.merge({"dataset": "fashion", "model": "large_mlp", "pattern": "r3", "target": 0,
                      "optimizer": "adam", "lr": 0.01, "epochs": 10, "batch_size": 128},
                     ss.membership_grid([3, 100], data_seeds=[0, 1], online=32))
    smoke = {"epochs": 1, "data_seed": 0, "role": ss.membership_grid([10], [0, 1], [0], online=32)["role"]}
    return StudySpec("mia-online", _doc(mia_online), space, smoke=smoke, checkpoint_every=5,
                     expected_time="~15 min on 2 CPUs with --bundle 8")


@study("mia-paper")
def mia_paper() -> StudySpec:
    """Membership inference at the reference protocol (protocol §9.2, reference §10): 70 epochs, 10 seeds.

    Command: `study run mia-paper --bundle 8`, then `study mia --from results/<experiment> --attack shadow
    --attack lira`, and `study report` prints the reference's table (the rate at which spurious members are
    flagged, per n, mean ± s.e. over the 10 data seeds) — 110 models: per data seed 0–9, a target per n ∈
    {1, 3, 5, 10, 20, 100, 1000} (R3, class 0) and 4 offline shadows; LargeMLP, Adam 0.01, batch 128, 70
    epochs; about 1 hour on one GPU, several on 2 CPUs. Smoke: data seed 0, n = 10, two shadows, 1 epoch.
    """
    space = ss.merge({"dataset": "fashion", "model": "large_mlp", "pattern": "r3", "target": 0,
                      "optimizer": "adam", "lr": 0.01, "epochs": 70, "batch_size": 128},
                     ss.membership_grid(data_seeds=range(10)))
    smoke = {"epochs": 1, "data_seed": 0, "role": ss.membership_grid([10], [0, 1], [0])["role"]}
    return StudySpec("mia-paper", _doc(mia_paper), space, smoke=smoke, checkpoint_every=10,
                     expected_time="~1 h on one GPU; ~8 h on 2 CPUs")


def _doc(fn: Callable) -> str:
    return (fn.__doc__ or "").strip()


def names() -> list[str]:
    """Return the catalog's study names."""
    return STUDIES.names()


def get(name_or_path: str) -> StudySpec:
    """Return a catalog study by name, or load a YAML study file."""
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_yaml(name_or_path)
    return STUDIES.get(name_or_path)()


def apply_overrides(space: dict, overrides: dict) -> dict:
    """Return `space` with keys replaced; lists become grid axes; keys also drop out of variant dicts."""
    out = dict(space)
    for key, value in overrides.items():
        for axis, spec in list(out.items()):
            if space_lib.is_grid(spec) and all(isinstance(v, dict) for v in space_lib.grid_values(spec)):
                out[axis] = space_lib.grid(_dedupe([{k: v for k, v in variant.items() if k != key}
                                                    for variant in space_lib.grid_values(spec)]))
        out[key] = space_lib.from_yaml(value, key)
    return out


def _dedupe(items: list) -> list:
    out = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


YAML_KEYS = {"name", "description", "space", "smoke", "kind", "num_samples", "checkpoint_every", "keep_checkpoints",
             "expected_time", "base", "tuning", "seed_policy"}


def _inherited_smoke(base: StudySpec | None, own_space: dict) -> dict:
    """Return the base study's smoke settings minus the keys the file's own `space:` sets: `--smoke` makes a
    file's study smaller, it never swaps its pattern or counts for the base study's."""
    return {k: v for k, v in (base.smoke if base else {}).items() if k not in own_space}


def load_yaml(path: str | Path) -> StudySpec:
    """Load a YAML study file (fields as StudySpec; `base:` names a catalog study to start from)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SpuriousError(f"study file {str(path)!r} does not exist") from None
    except yaml.YAMLError as err:
        raise SpuriousError(f"study file {str(path)!r} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise SpuriousError(f"study file {str(path)!r} must be a mapping with keys {', '.join(sorted(YAML_KEYS))}")
    unknown = set(raw) - YAML_KEYS
    if unknown:
        raise SpuriousError(f"study file {str(path)!r} has unknown key(s) {', '.join(sorted(unknown))}; "
                            f"allowed: {', '.join(sorted(YAML_KEYS))}")
    base = STUDIES.get(raw["base"])() if "base" in raw else None
    space = apply_overrides(base.space if base else {}, raw.get("space") or {})
    if not space:
        raise SpuriousError(f"study file {str(path)!r} has an empty space (set `space:` or `base:`)")
    kind = raw.get("kind", base.kind if base else "train")
    if kind not in KINDS:
        raise SpuriousError(f"study kind {kind!r} is not one of {', '.join(KINDS)}")
    return StudySpec(name=str(raw.get("name", Path(path).stem)), description=str(raw.get("description", "")),
                     space=space, smoke=raw.get("smoke") or _inherited_smoke(base, raw.get("space") or {}), kind=kind,
                     num_samples=int(raw.get("num_samples", 1)),
                     checkpoint_every=raw.get("checkpoint_every", base.checkpoint_every if base else 5),
                     keep_checkpoints=raw.get("keep_checkpoints", base.keep_checkpoints if base else 2),
                     expected_time=str(raw.get("expected_time", "")),
                     tuning=dict(raw.get("tuning") or (base.tuning if base else {})),
                     seed_policy=str(raw.get("seed_policy", base.seed_policy if base else "replicate")))
