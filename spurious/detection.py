"""Detecting the planted images without knowing the pattern: suspicion scores per training image and the
metrics that compare them with the planted indices.

A practitioner holds the trained model (and its saved checkpoints) and the training set as trained, with the
pattern in it, but not the pattern nor which rows carry it. Each method scores the candidate rows
(`candidate_rows`: the target class's training images, or all of them), higher = more suspicious, from the
model and the data alone; the planted indices are only the ground truth of `detection_metrics`.

Directions (protocol §12.2). `loss`, `loss_trajectory`, `tracin` and `influence` measure how hard an image is
for the model, and take a `direction` (DIRECTED): `high` (default) flags the hardest images, the convention
of the sources, which hunt *mislabelled* examples (Han et al. 2018; Pruthi et al. 2020; Koh & Liang 2017);
`low` flags the easiest, as Anti-Backdoor Learning (Li et al. 2021) isolates backdoored examples, whose
trigger is learnt faster than the clean task. Neither is right everywhere: a planted image is hard while its
pattern is not yet learnt and easy once it is. On Fashion-MNIST with R3 (LargeMLP, SGD, 8 epochs) `high`
ranked n = 3 planted images above most of their class (loss AUROC 0.92) and `low` ranked n = 100 so (0.76);
`study detect` runs both. For one statistic, AUROC(low) = 1 − AUROC(high).
`spectral` and `activation_clustering` are outlier scores with one direction.

- `loss`: the cross-entropy at the final checkpoint (the small-loss criterion of noisy-label work);
- `loss_trajectory`: the mean loss over the checkpoints (Jiang et al. 2021's learning-speed proxy);
- `tracin`: TracIn self-influence Σ_t η_t ‖∇θ ℓ(z; θ_t)‖² (Pruthi et al. 2020), with captum's TracInCP;
- `spectral`: spectral signatures of the penultimate representations (Tran, Li & Madry 2018);
- `activation_clustering`: 2-means on the reduced penultimate activations (Chen et al. 2018);
- `influence`: self-influence gᵀ(H + λI)⁻¹g at the final checkpoint (Koh & Liang 2017), solved by CG.

    from spurious import detection
    snaps = [detection.Snapshot(model_at_epoch[e], e, lr_of_epoch[e]) for e in (2, 4, 6)]
    rows = detection.candidate_rows(data.y_train, [data.target], "class")
    result = detection.score("spectral", snaps, data.x_train, data.y_train, rows)
    planted = np.isin(rows, data.spurious_idx)
    detection.detection_metrics(result.scores, planted)["auroc"]
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spurious import influence, mia
from spurious.errors import SpuriousError, check

METHODS = ("loss", "loss_trajectory", "tracin", "spectral", "activation_clustering", "influence")
SCOPES = ("class", "all")
DIRECTIONS = ("low", "high")  # which end of a directed method's statistic is suspicious
DIRECTED = ("loss", "loss_trajectory", "tracin", "influence")  # the methods that take a direction
KMEANS_MAX_ITER = 300  # Lloyd iterations per restart (scikit-learn's default); 2-means converges in far fewer
# captum computes per-example gradients in one batched pass only for these layers (its sample-gradient hooks)
SAMPLE_WISE_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Snapshot:
    """One saved checkpoint of the source model: `model` (nn.Module in eval mode), `epoch` (epochs completed),
    `lr` (η_t, the learning rate of the epoch that ended at this checkpoint)."""

    model: nn.Module
    epoch: int
    lr: float


@dataclass(frozen=True)
class Scores:
    """A method's suspicion scores for the candidate rows (float64 (R,), higher = more suspicious), scalar
    diagnostics `extra` (reported as-is) and per-candidate `arrays` to save (leading axis or last axis R)."""

    scores: np.ndarray
    extra: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """The methods' settings (see `score`); validated on construction."""

    batch_size: int = 500
    seed: int = 0
    pca_dims: int = 10
    kmeans_restarts: int = 10
    influence_candidates: int = 50
    hessian_examples: int = 1000
    damping: float = 1.0
    cg_tol: float = influence.DEFAULT_TOL
    cg_max_iter: int = influence.DEFAULT_MAX_ITER
    direction: str = "high"

    def __post_init__(self) -> None:
        counts = ("batch_size", "pca_dims", "kmeans_restarts", "influence_candidates", "hessian_examples",
                  "cg_max_iter")
        check([(_is_int(getattr(self, k)) and getattr(self, k) >= 1,
                f"detection setting {k} must be an integer >= 1, got {getattr(self, k)!r}") for k in counts]
              + [(_is_int(self.seed) and self.seed >= 0, f"detection seed must be an integer >= 0, got {self.seed!r}"),
                 (_is_real(self.damping) and self.damping >= 0,
                  f"detection damping must be finite and >= 0, got {self.damping!r}"),
                 (_is_real(self.cg_tol) and self.cg_tol > 0,
                  f"detection cg_tol must be finite and > 0, got {self.cg_tol!r}"),
                 (self.direction in DIRECTIONS,
                  f"detection direction {self.direction!r} is not one of {', '.join(DIRECTIONS)}")])


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


# ---------------------------------------------------------------- candidates and the entry point

def candidate_rows(y_train: torch.Tensor, targets: Sequence[int], scope: str) -> np.ndarray:
    """Return the candidate rows (int64, ascending) of the training set: scope "class" = rows whose label is in
    `targets`, "all" = every row (`targets` then only needs to be valid)."""
    if scope not in SCOPES:
        raise SpuriousError(f"detection scope {scope!r} is not one of {', '.join(SCOPES)}")
    labels = torch.as_tensor(y_train).detach().cpu().numpy()
    targets = list(targets)
    if not targets or not all(_is_int(t) and t >= 0 for t in targets):
        raise SpuriousError(f"detection targets must be one or more class numbers >= 0, got {targets!r}")
    if scope == "all":
        return np.arange(len(labels), dtype=np.int64)
    return np.flatnonzero(np.isin(labels, targets)).astype(np.int64)


def score(method: str, snapshots: Sequence[Snapshot], x: torch.Tensor, y: torch.Tensor, rows: np.ndarray,
          *, batch_size: int = 500, seed: int = 0, pca_dims: int = 10, kmeans_restarts: int = 10,
          influence_candidates: int = 50, hessian_examples: int = 1000, damping: float = 1.0,
          cg_tol: float = influence.DEFAULT_TOL, cg_max_iter: int = influence.DEFAULT_MAX_ITER,
          direction: str = "high") -> Scores:
    """Return `method`'s suspicion Scores for the training rows `rows` (higher = more suspicious).

    x (N, C, H, W): the patterned training set exactly as trained; y (N,): its labels; rows: candidate rows
    (`candidate_rows`). `snapshots`: the saved checkpoints sorted by epoch, the last the final model (methods
    of one checkpoint use it). `batch_size`: examples per forward/gradient pass; `seed`: the k-means
    initialisation and the Hessian subsample; `pca_dims`, `kmeans_restarts`: activation clustering's;
    `influence_candidates`, `hessian_examples`, `damping` (λ), `cg_tol`, `cg_max_iter`: influence's;
    `direction` (DIRECTED methods only): `high` scores the statistic itself (the hardest images are suspicious),
    `low` −statistic (module docstring); the statistic is saved as `arrays["statistic"]`. Models
    are put in eval mode. Raises a one-line SpuriousError for an unknown method, no snapshots, snapshots out
    of epoch order, empty or out-of-range rows, mismatched x and y, or settings out of range.
    """
    if method not in METHODS:
        raise SpuriousError(f"detection method {method!r} is not one of {', '.join(METHODS)}")
    settings = Settings(batch_size, seed, pca_dims, kmeans_restarts, influence_candidates, hessian_examples,
                        damping, cg_tol, cg_max_iter, direction)
    snapshots = _checked_snapshots(snapshots)
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise SpuriousError(f"detection needs x (N, ...) and labels y (N,), got shapes {tuple(x.shape)}, "
                            f"{tuple(y.shape)}")
    rows = _checked_rows(rows, len(y))
    result = _SCORERS[method](snapshots, x, y, rows, settings)
    if method not in DIRECTED or method == "influence":  # influence applies the direction to its subset itself
        return result
    sign = -1.0 if direction == "low" else 1.0
    return Scores(sign * result.scores, result.extra, {**result.arrays, "statistic": result.scores})


def _checked_snapshots(snapshots: Sequence[Snapshot]) -> list[Snapshot]:
    snapshots = list(snapshots)
    if not snapshots:
        raise SpuriousError("detection needs at least one snapshot of the model, got none")
    epochs = [s.epoch for s in snapshots]
    if any(a >= b for a, b in zip(epochs, epochs[1:])):
        raise SpuriousError(f"detection snapshots must be sorted by strictly increasing epoch, got epochs {epochs}")
    bad = [s.lr for s in snapshots if not (_is_real(s.lr) and s.lr >= 0)]
    if bad:
        raise SpuriousError(f"snapshot learning rates must be finite and >= 0, got {bad[0]!r}")
    for s in snapshots:
        s.model.eval()
    return snapshots


def _checked_rows(rows: np.ndarray, n: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or not len(rows):
        raise SpuriousError(f"detection needs a non-empty 1-d array of candidate rows, got shape {rows.shape}")
    if not np.issubdtype(rows.dtype, np.integer) or rows.min() < 0 or rows.max() >= n:
        raise SpuriousError(f"candidate rows must be integers in [0, {n}), got {rows.dtype} from "
                            f"{rows.min()} to {rows.max()}")
    return rows.astype(np.int64)


def _epochs(snapshots: Sequence[Snapshot]) -> dict:
    return {"checkpoints": len(snapshots), "checkpoint_epochs": ",".join(str(s.epoch) for s in snapshots)}


def _take(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.from_numpy(rows).to(y.device)
    return x[idx], y[idx]


# ---------------------------------------------------------------- losses

@torch.no_grad()
def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Return the cross-entropy of every example (float64 (N,), nats) under `model` (logits out, eval mode)."""
    parts = [F.cross_entropy(model(x[s:s + batch_size]), y[s:s + batch_size], reduction="none")
             for s in range(0, len(y), batch_size)]
    return torch.cat(parts).double().cpu().numpy()


def ranks_within_class(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return each value's rank (int64, 1 = highest) among the values of its own label; ties share the best
    (smallest) rank of their group ("competition" ranking)."""
    ranks = np.empty(len(values), np.int64)
    for c in np.unique(labels):
        members = labels == c
        descending = np.sort(-values[members])
        ranks[members] = 1 + np.searchsorted(descending, -values[members], side="left")
    return ranks


def loss_scores(snapshots, x, y, rows, s: Settings) -> Scores:
    """Score = the candidate's cross-entropy at the final snapshot (the training loss, on the model's logits).

    High loss = suspicious: networks fit clean, typical examples first and atypical or mislabelled ones late,
    so noisy-label methods treat the small-loss examples as clean (Han et al. 2018, co-teaching; Arazo et al.
    2019). A planted image is atypical for its class until the pattern is learnt, after which it may be
    fitted as well as any: this is the baseline the other methods must beat. extra: "checkpoint_epoch";
    arrays: "rank_in_class" (`ranks_within_class` of the loss among the candidates of the same class,
    1 = highest loss).
    """
    xr, yr = _take(x, y, rows)
    losses = per_example_loss(snapshots[-1].model, xr, yr, s.batch_size)
    labels = yr.cpu().numpy()
    return Scores(losses, {"checkpoint_epoch": snapshots[-1].epoch},
                  {"rank_in_class": ranks_within_class(losses, labels)})


def loss_trajectory_scores(snapshots, x, y, rows, s: Settings) -> Scores:
    """Score = the candidate's mean cross-entropy over the snapshots (the area under its loss curve).

    Jiang et al. 2021 ("Characterizing Structural Regularities of Labeled Data in Overparameterized Models")
    find that how fast an example is learnt, measured by its loss (or confidence) accumulated over training,
    is a cheap proxy for its consistency score: examples unlike the rest of their class are learnt late, so
    a high cumulative loss = atypical = suspicious. The snapshots are weighted equally whatever their
    spacing. extra: "checkpoints" (T), "checkpoint_epochs" ("2,4,6"); arrays: "losses" (T, R).
    """
    xr, yr = _take(x, y, rows)
    losses = np.stack([per_example_loss(snap.model, xr, yr, s.batch_size) for snap in snapshots])
    return Scores(losses.mean(0), _epochs(snapshots), {"losses": losses})


# ---------------------------------------------------------------- TracIn (captum)

def _sample_wise_ok(model: nn.Module) -> bool:
    """Return whether every module that owns trainable parameters is one captum's batched trick supports."""
    return all(isinstance(m, SAMPLE_WISE_LAYERS) for m in model.modules()
               if any(p.requires_grad for p in m.parameters(recurse=False)))


def tracin_self_influence(snapshots: Sequence[Snapshot], x: torch.Tensor, y: torch.Tensor,
                          batch_size: int = 500) -> np.ndarray:
    """Return Σ_t η_t ‖∇θ ℓ(z; θ_t)‖² (float64 (N,)) for every example z of (x, y): TracInCP self-influence
    (Pruthi et al. 2020, TracInCP with z' = z), by captum's `TracInCP.self_influence`.

    θ: all trainable parameters; ℓ: cross-entropy on the logits; η_t: each snapshot's `lr`. captum's
    per-example gradients come from one batched pass (its sample-gradient hooks, loss with reduction "sum")
    when every parametrised module is Linear or Conv2d; otherwise (e.g. BatchNorm in the ResNets) from its
    per-example loop (reduction "none"), which is correct but slower. Snapshot states are loaded one by one
    into a copy of the final model, which the caller's models never see.
    """
    work = copy.deepcopy(snapshots[-1].model).eval()
    batched = _sample_wise_ok(work)

    def load(model: nn.Module, key: str) -> float:
        snap = snapshots[int(key)]
        model.load_state_dict(snap.model.state_dict())
        return float(snap.lr)

    from captum.influence import TracInCP  # a heavy import, needed by this method only
    tracin = TracInCP(work, torch.utils.data.TensorDataset(x, y), [str(i) for i in range(len(snapshots))],
                      checkpoints_load_func=load, batch_size=batch_size, sample_wise_grads_per_batch=batched,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum" if batched else "none"))
    with warnings.catch_warnings():
        # captum switches on requires_grad of the input batches (copies of x): expected, not a user problem
        warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")
        values = tracin.self_influence(outer_loop_by_checkpoints=True)
    return values.detach().double().cpu().numpy()


def tracin_scores(snapshots, x, y, rows, s: Settings) -> Scores:
    """Score = TracInCP self-influence Σ_t η_t ‖∇θ ℓ(z; θ_t)‖² over the snapshots (Pruthi et al. 2020).

    A large gradient norm along training = the model kept having to change to fit z: Pruthi et al. rank
    training data by self-influence to find mislabelled examples, the highest first. A planted image pulls
    the weights towards "pattern ⇒ class" until that is learnt. captum (`tracin_self_influence`) runs about
    as fast as a `torch.func` vmap + grad per-example norm on this project's MLPs (20.0 s vs 20.3 s for
    LargeMLP, 6,000 images × 5 checkpoints, 2 CPU cores), so the maintained library is used.
    extra: "checkpoints", "checkpoint_epochs", "lr_sum" (Σ η_t).
    """
    xr, yr = _take(x, y, rows)
    values = tracin_self_influence(snapshots, xr, yr, s.batch_size)
    return Scores(values, {**_epochs(snapshots), "lr_sum": float(sum(snap.lr for snap in snapshots))})


# ---------------------------------------------------------------- penultimate representations

def last_linear(model: nn.Module) -> nn.Linear:
    """Return the model's last registered nn.Linear (the classifier of every model in `spurious.models`)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SpuriousError(f"{type(model).__name__} has no nn.Linear layer to read representations from")
    return linears[-1]


@torch.no_grad()
def penultimate(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Return the input of the model's last nn.Linear for every example (float64 (N, D)), by a forward hook."""
    seen: list[torch.Tensor] = []
    hook = last_linear(model).register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].flatten(1)))
    try:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])
    finally:
        hook.remove()
    return torch.cat(seen).double().cpu().numpy()


def _per_class(labels: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Return fn applied to each class's positions (an index array), assembled into one (R,) array."""
    out = np.zeros(len(labels))
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        out[where] = fn(where)
    return out


def spectral_signature(reps: np.ndarray) -> np.ndarray:
    """Return ((r_i − r̄)·v)² (float64 (n,)) for rows r_i of `reps` (n, D), v the top right singular vector of
    the centred matrix (Tran, Li & Madry 2018, Algorithm 1); zeros if the rows are all equal."""
    centred = reps - reps.mean(0)
    if not np.any(centred):
        return np.zeros(len(reps))
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    return (centred @ top) ** 2


def spectral_scores(snapshots, x, y, rows, s: Settings) -> Scores:
    """Score = the spectral signature of the candidate's penultimate representation, within its class,
    divided by its class's mean signature (Tran, Li & Madry 2018).

    Representations are the input of the final model's last nn.Linear. Per class, Tran et al. centre the
    representations and take the squared projection on the top singular direction: a poisoned subpopulation
    shifts the class's mean along a direction of its own, which then dominates the covariance, and its
    examples project far out on it (they remove the highest scores). Dividing by the class's mean score
    (σ₁²/n_c) keeps the order within a class and makes classes comparable with scope "all", where each
    class would otherwise be on the scale of its own top singular value; a class with identical
    representations (or one candidate) scores 0. extra: "classes", "representation_dims", "checkpoint_epoch";
    arrays: "signature" (the raw squared projections).
    """
    xr, yr = _take(x, y, rows)
    reps, labels = penultimate(snapshots[-1].model, xr, s.batch_size), yr.cpu().numpy()
    raw = _per_class(labels, lambda where: spectral_signature(reps[where]))
    normalised = _per_class(labels, lambda where: _relative(raw[where]))
    return Scores(normalised, {"classes": len(np.unique(labels)), "representation_dims": reps.shape[1],
                               "checkpoint_epoch": snapshots[-1].epoch}, {"signature": raw})


def _relative(values: np.ndarray) -> np.ndarray:
    mean = values.mean()
    return values / mean if mean > 0 else np.zeros(len(values))


# ---------------------------------------------------------------- activation clustering

def pca(values: np.ndarray, dims: int) -> np.ndarray:
    """Return `values` (n, D) centred and projected on their top min(dims, D, n) principal axes (n, d)."""
    centred = values - values.mean(0)
    vt = np.linalg.svd(centred, full_matrices=False)[2]
    return centred @ vt[:dims].T


def kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Return k initial centres by k-means++ (Arthur & Vassilvitskii 2007): the first uniformly at random,
    each next with probability ∝ squared distance to the nearest chosen centre (uniform if all are 0)."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = ((points[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(points), 1 / len(points))
        centres.append(points[rng.choice(len(points), p=p)])
    return np.asarray(centres, np.float64)


def lloyd(points: np.ndarray, centres: np.ndarray,
          max_iter: int = KMEANS_MAX_ITER) -> tuple[np.ndarray, np.ndarray, float]:
    """Return (labels (n,), centres (k, d), inertia): Lloyd's iterations from `centres` until the assignment
    stops changing (a centre left without points stays where it was); inertia = Σ squared distances."""
    labels = None
    for _ in range(max_iter):
        d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
        new = d2.argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = np.array([points[labels == j].mean(0) if np.any(labels == j) else centres[j]
                            for j in range(len(centres))])
    d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
    return labels, centres, float(d2[np.arange(len(points)), labels].sum())


def kmeans(points: np.ndarray, k: int, restarts: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Return the (labels, centres, inertia) of lowest inertia over `restarts` runs of Lloyd from k-means++
    starts, drawn from numpy's Generator seeded by `seed` (the first run wins ties)."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        run = lloyd(points, kmeans_pp(points, k, rng))
        if best is None or run[2] < best[2]:
            best = run
    return best


def two_means_score(acts: np.ndarray, dims: int, restarts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (score (n,), in_small (n,) bool) of one class's activations `acts` (n, D): 2-means on their top
    `dims` principal components; score = (‖a − c_large‖ − ‖a − c_small‖)/w, w = √(inertia/n) the
    root-mean-square distance of the points to their own centre.

    The score is in units of the clusters' own spread, so it is scale-free and large only where the clusters
    are well apart: a point at the small centre scores ‖c_large − c_small‖/w, about 2.5 for a cluster 8σ away
    in 10 dimensions but under 1 for the two halves 2-means cuts a single Gaussian into. The small cluster is
    the one with fewer members (at equal sizes, the one without the class's first candidate). Fewer than two
    candidates, or all activations equal: scores 0, nobody in the small cluster.
    """
    reduced = pca(acts, dims) if len(acts) >= 2 else np.zeros((len(acts), 1))
    if not np.any(reduced):
        return np.zeros(len(acts)), np.zeros(len(acts), bool)
    labels, centres, inertia = kmeans(reduced, 2, restarts, seed)
    sizes = np.bincount(labels, minlength=2)
    small = int(sizes[1] < sizes[0] or (sizes[1] == sizes[0] and labels[0] == 0))
    spread = math.sqrt(inertia / len(acts))
    dist = np.linalg.norm(reduced[:, None, :] - centres[None], axis=-1)
    score = (dist[:, 1 - small] - dist[:, small]) / spread if spread > 0 else np.zeros(len(acts))
    return score, labels == small


def activation_clustering_scores(snapshots, x, y, rows, s: Settings) -> Scores:
    """Score = how much closer the candidate is to its class's small 2-means cluster than to the large one
    (Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering").

    Per class, the final model's penultimate activations (input of its last nn.Linear) are reduced to
    `pca_dims` dimensions and split by 2-means (`kmeans`: Lloyd, k-means++ starts, `kmeans_restarts`
    restarts, seeded by `seed` and the class); Chen et al. flag the smaller cluster as poisoned, since a
    backdoor's images activate the network for a reason of their own. They reduce with ICA to 10
    dimensions; this uses PCA, as IBM ART's ActivationDefence does by default (deterministic, no ICA
    convergence issues). The binary cluster label would give a step AUROC, so the score is the continuous
    `two_means_score`, in units of the class's within-cluster spread so that classes are comparable with
    scope "all" (a clean class split in two scores lower than a class with a separate small cluster).
    extra: "small_cluster_size" (summed over classes), "small_cluster_fraction" (of all candidates),
    "small_cluster_fraction_min" (the smallest per class: Chen et al.'s relative-size test),
    "checkpoint_epoch"; arrays: "in_small_cluster" (bool).
    """
    xr, yr = _take(x, y, rows)
    acts, labels = penultimate(snapshots[-1].model, xr, s.batch_size), yr.cpu().numpy()
    scores, in_small, fractions = np.zeros(len(rows)), np.zeros(len(rows), bool), []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        scores[where], in_small[where] = two_means_score(acts[where], s.pca_dims, s.kmeans_restarts,
                                                         _class_seed(s.seed, c))
        fractions.append(in_small[where].mean())
    extra = {"small_cluster_size": int(in_small.sum()), "small_cluster_fraction": float(in_small.mean()),
             "small_cluster_fraction_min": float(min(fractions)), "checkpoint_epoch": snapshots[-1].epoch}
    return Scores(scores, extra, {"in_small_cluster": in_small})


def _class_seed(seed: int, label: int) -> int:
    """Return a per-class k-means seed derived from `seed` (distinct classes, distinct streams)."""
    return int(np.random.SeedSequence([seed, int(label)]).generate_state(1)[0])


# ---------------------------------------------------------------- influence

def hessian_rows(n: int, examples: int, seed: int) -> torch.Tensor:
    """Return the first min(examples, n) of a permutation of range(n) drawn on the CPU from `seed`: the fixed
    subsample whose mean cross-entropy Hessian H the influence method uses."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:examples]


def subset_order(grad_sq: np.ndarray, k: int, direction: str = "high") -> np.ndarray:
    """Return the positions of the k largest (`high`) or smallest (`low`) values of `grad_sq`, the most
    suspicious first (ties: lower position first)."""
    return np.argsort(-grad_sq if direction == "high" else grad_sq, kind="stable")[:k]


def fill_unsolved(grad_sq: np.ndarray, solved: np.ndarray, exact: np.ndarray, direction: str = "high") -> np.ndarray:
    """Return suspicion scores: ±`exact` self-influence at the positions `solved` (+ for `high`, − for `low`),
    and every unsolved candidate below every solved one, in the order of ±‖g‖².

    The λ → ∞ limit ‖g‖²/λ of the self-influence is proportional to ‖g‖², so an unsolved candidate's
    self-influence is extrapolated from the solved one nearest it in ‖g‖², with a margin of 2:
    - `high` (the largest ‖g‖² were solved): s_j = ½·s_min·‖g_j‖²/q_min, s_min the lowest exact score and
      q_min the lowest ‖g‖² among the solved, so s_j ∈ [0, ½·s_min], strictly below every exact score when
      s_min > 0;
    - `low` (the smallest ‖g‖² were solved): s_j = 2·s_max·‖g_j‖²/q_max, s_max the highest exact score and
      q_max the highest solved ‖g‖², so s_j ≥ 2·s_max, and its suspicion −s_j lies strictly below.
    If the extrapolation is degenerate (a zero exact score or gradient), the unsolved candidates get the lowest
    solved suspicion − 1 − their rank by ±‖g‖² scaled into [0, 1).
    """
    sign = 1.0 if direction == "high" else -1.0
    scores = np.empty(len(grad_sq))
    scores[solved] = sign * exact
    rest = np.setdiff1d(np.arange(len(grad_sq)), solved)
    if not len(rest):
        return scores
    if direction == "high":
        s_ref, q_ref, factor = float(exact.min()), float(grad_sq[solved].min()), 0.5
    else:
        s_ref, q_ref, factor = float(exact.max()), float(grad_sq[solved].max()), 2.0
    if s_ref > 0 and q_ref > 0:
        scores[rest] = sign * factor * s_ref * grad_sq[rest] / q_ref
    else:
        order = np.argsort(np.argsort(sign * grad_sq[rest], kind="stable"), kind="stable")  # 0 = least suspicious
        scores[rest] = float(scores[solved].min()) - 1.0 - (len(rest) - 1 - order) / len(rest)
    return scores


def influence_scores(snapshots, x, y, rows, s: Settings) -> Scores:
    """Score = ± self-influence g(z)ᵀ(H + λI)⁻¹g(z) at the final snapshot (− for direction `low`), for the
    `influence_candidates` candidates of largest (`high`) or smallest (`low`) ‖g(z)‖²; the others rank below
    them in order of ±‖g(z)‖² (`fill_unsolved`).

    g(z) = ∇θ ℓ(z), θ all trainable parameters; H the mean cross-entropy Hessian on `hessian_examples` rows
    of (x, y) drawn by `hessian_rows(seed)` (a fixed subsample, to bound the cost); λ = `damping`. Koh &
    Liang (2017) use the self-influence −I_up,loss(z, z) = gᵀH⁻¹g to find mislabelled training points, the
    largest first: removing z would raise its own loss most, i.e. the model fits z by memorising it. Each
    score is one `influence.cg_inverse_hvp` solve (tolerance `cg_tol`, at most `cg_max_iter` products), so
    only a subset is solved: as λ → ∞ the score tends to ‖g‖²/λ, so ‖g‖² (from `tracin_self_influence`
    with one checkpoint and η = 1) picks the subset. extra: "candidates_solved", "hessian_examples",
    "checkpoint_epoch", "cg_iterations_mean", "cg_iterations_max", "cg_converged" (all of them),
    "cg_residual_max"; arrays: "grad_norm_sq" (R,), "solved" (bool (R,)), "statistic" (R,: the exact
    self-influence of the solved, NaN elsewhere).
    """
    model = snapshots[-1].model
    xr, yr = _take(x, y, rows)
    grad_sq = tracin_self_influence([Snapshot(model, snapshots[-1].epoch, 1.0)], xr, yr, s.batch_size)
    solved = subset_order(grad_sq, s.influence_candidates, s.direction)
    hess = hessian_rows(len(y), s.hessian_examples, s.seed).to(y.device)
    xh, yh = x[hess], y[hess]
    exact, stats = zip(*(self_influence(model, xr[pos:pos + 1], yr[pos:pos + 1], xh, yh, s) for pos in solved))
    iterations = [info["cg_iterations"] for info in stats]
    extra = {"candidates_solved": len(solved), "hessian_examples": len(hess),
             "checkpoint_epoch": snapshots[-1].epoch, "cg_iterations_mean": float(np.mean(iterations)),
             "cg_iterations_max": int(max(iterations)),
             "cg_converged": all(info["cg_converged"] for info in stats),
             "cg_residual_max": float(max(info["cg_residual"] for info in stats))}
    in_subset = np.zeros(len(rows), bool)
    in_subset[solved] = True
    statistic = np.full(len(rows), np.nan)
    statistic[solved] = exact
    return Scores(fill_unsolved(grad_sq, solved, np.array(exact), s.direction), extra,
                  {"grad_norm_sq": grad_sq, "solved": in_subset, "statistic": statistic})


def self_influence(model: nn.Module, xz: torch.Tensor, yz: torch.Tensor, xh: torch.Tensor, yh: torch.Tensor,
                   s: Settings) -> tuple[float, dict]:
    """Return (gᵀh, CG stats) for the one example (xz, yz): g = ∇θ ℓ(z), h = (H + λI)⁻¹g by
    `influence.cg_inverse_hvp` with H the mean cross-entropy Hessian on (xh, yh)."""
    g = influence.summed_gradient(model, xz, yz)
    h, info = influence.cg_inverse_hvp(model, xh, yh, g, s.damping, s.cg_tol, s.cg_max_iter, chunk=s.batch_size)
    return float(g.double() @ h.double()), info


_SCORERS = {"loss": loss_scores, "loss_trajectory": loss_trajectory_scores, "tracin": tracin_scores,
            "spectral": spectral_scores, "activation_clustering": activation_clustering_scores,
            "influence": influence_scores}


# ---------------------------------------------------------------- metrics

def average_precision(scores: np.ndarray, planted: np.ndarray) -> float:
    """Return AP = Σ_n (R_n − R_{n−1})·P_n over thresholds at the distinct scores, highest first (scikit-learn's
    `average_precision_score`: tied scores enter together); NaN without a planted example."""
    n_pos = int(planted.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], planted[order]
    last_of_group = np.r_[ordered[1:] != ordered[:-1], True]
    tp = np.cumsum(hits)[last_of_group]
    seen = np.flatnonzero(last_of_group) + 1
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tp / seen))


def expected_hits_at(scores: np.ndarray, planted: np.ndarray, k: int) -> float:
    """Return the expected number of planted examples among the top k, ties at the cut-off in random order:
    all of those above the k-th highest score, plus the tied group's planted share of the remaining places."""
    kth = np.sort(scores)[::-1][k - 1]
    above, tied = scores > kth, scores == kth
    return float(planted[above].sum() + (k - above.sum()) * planted[tied].sum() / tied.sum())


def top_k(n: int, fraction: float) -> int:
    """Return ceil(fraction·n), at least 1 and at most n (the product rounded to 9 decimals first, so that
    0.01·700 is 7, not 8)."""
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


def planted_ranks(scores: np.ndarray, planted: np.ndarray) -> tuple[float, float]:
    """Return (worst, best) number of candidates to inspect from the top to have found every planted one.

    worst (ties pessimistic): the candidates with score ≥ the lowest planted score. best (ties optimistic):
    those with a higher score plus the planted ones at it (the tie broken in favour of the planted).
    """
    lowest = scores[planted].min()
    return float((scores >= lowest).sum()), float((scores > lowest).sum() + (scores[planted] == lowest).sum())


def detection_metrics(scores: np.ndarray, planted: np.ndarray, k_fraction: float = 0.01) -> dict[str, float]:
    """Return how well `scores` (R,) find the `planted` (bool (R,)) candidates, as floats (module docstring).

    n_candidates, n_planted; auroc (`mia.roc_auc`, ties count ½); average_precision (`average_precision`);
    precision/recall among the top k_n = n_planted (`precision_at_n`, `recall_at_n`) and the top
    k_1pct = `top_k`(R, k_fraction) (`precision_at_1pct`, `recall_at_1pct`), expected values under a random
    order of the scores tied at the cut-off (`expected_hits_at`); worst_planted_rank and best_planted_rank
    (`planted_ranks`); score_top1, score_at_1pct (the k_1pct-th highest score), score_median; the planted
    scores' min, median and max. Without planted candidates (the n = 0 controls) the ranking metrics are
    NaN and the score summaries stay (the false-positive reference). Raises a SpuriousError for empty,
    mismatched or non-finite scores, or k_fraction outside (0, 1].
    """
    scores, planted = np.asarray(scores, np.float64), np.asarray(planted)
    if scores.ndim != 1 or planted.shape != scores.shape or not len(scores):
        raise SpuriousError(f"detection metrics need scores (R ≥ 1,) and planted (R,) of the same length, got "
                            f"{scores.shape} and {planted.shape}")
    if planted.dtype != bool or not np.isfinite(scores).all():
        raise SpuriousError("detection metrics need finite scores and a bool planted mask")
    if not (_is_real(k_fraction) and 0 < k_fraction <= 1):
        raise SpuriousError(f"k_fraction must be in (0, 1], got {k_fraction!r}")
    n, n_pos = len(scores), int(planted.sum())
    k_1pct = top_k(n, k_fraction)
    summary = {"score_top1": float(scores.max()), "score_at_1pct": float(np.sort(scores)[::-1][k_1pct - 1]),
               "score_median": float(np.median(scores))}
    if n_pos == 0:
        nan = float("nan")
        return {"n_candidates": float(n), "n_planted": 0.0, "auroc": nan, "average_precision": nan, "k_n": 0.0,
                "precision_at_n": nan, "recall_at_n": nan, "k_1pct": float(k_1pct), "precision_at_1pct": nan,
                "recall_at_1pct": nan, "worst_planted_rank": nan, "best_planted_rank": nan, **summary,
                "planted_score_min": nan, "planted_score_median": nan, "planted_score_max": nan}
    hits_n, hits_1pct = expected_hits_at(scores, planted, n_pos), expected_hits_at(scores, planted, k_1pct)
    worst, best = planted_ranks(scores, planted)
    return {"n_candidates": float(n), "n_planted": float(n_pos), "auroc": mia.roc_auc(scores, planted),
            "average_precision": average_precision(scores, planted), "k_n": float(n_pos),
            "precision_at_n": hits_n / n_pos, "recall_at_n": hits_n / n_pos, "k_1pct": float(k_1pct),
            "precision_at_1pct": hits_1pct / k_1pct, "recall_at_1pct": hits_1pct / n_pos,
            "worst_planted_rank": worst, "best_planted_rank": best, **summary,
            "planted_score_min": float(scores[planted].min()),
            "planted_score_median": float(np.median(scores[planted])),
            "planted_score_max": float(scores[planted].max())}
