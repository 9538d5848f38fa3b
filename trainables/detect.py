"""`detect`: can the planted examples be found? One detection method on one source model, as a Ray Tune
trainable (protocol §12).

One trial per (source model, method). The trial reads the source model's checkpoints through Ray's storage
(a local or shared path, or a URI), rebuilds the patterned training set it was trained on with the same
`plant` call, and scores every candidate training image for suspicion with `spurious.detection` — the
training images of the target class (`scope=class`, default) or all of them (`scope=all`). No method sees
the pattern or the planted indices: those are only the ground truth of the metrics (AUROC, average
precision, precision and recall at k = n and at k = 1 %, the rank of the best-hidden planted image). An
n = 0 source model is a control: it has nothing planted, so only its score summaries are reported (what a
clean model's most suspicious images score: the false-positive reference).

Methods and the checkpoints they read: `loss`, `spectral`, `activation_clustering` and `influence` read
the final checkpoint; `loss_trajectory` and `tracin` read every checkpoint the source trial kept (a
training study keeps the latest `--keep-checkpoints` of those written every `--checkpoint-every` epochs:
launch it with `--checkpoint-every 1 --keep-checkpoints 0` for every epoch; `detect-demo` keeps every
second epoch). Each trial reports its metrics, the number and epochs of the checkpoints used, its wall
time, the method's diagnostics, `source_trial_id` and the source model's config and final spurious
score; its checkpoint holds the per-example scores (format SCORES_FORMAT: the candidate rows, their
scores, which were planted, the settings and the method's arrays).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch

from spurious import checkpoint, config as config_lib, detection, influence, mia, train
from spurious.errors import SpuriousError, check
from trainables.common import report, use_trial_threads
from trainables.sources import planted_data, read_checkpoint, source_columns

SCORES_FORMAT = "detection-scores-1"
TRAJECTORY_METHODS = ("loss_trajectory", "tracin")  # the methods that read every kept checkpoint


@dataclass(frozen=True)
class DetectSettings(detection.Settings):
    """One detection trial: `detection.Settings` (the method settings: batch size, seed, activation clustering's
    and influence's, direction; protocol §12.2), plus the method, the source model (`source_trial_id`, a
    source-table key), the `scope` (class: the target class's training images, or all) and `damping` None by
    default: the project's group-influence damping for the source's dataset (protocol §8.2)."""

    damping: float | None = None
    method: str = "loss"
    source_trial_id: str = ""
    scope: str = "class"

    def __post_init__(self) -> None:
        config_lib.check_types(self, "detection setting")
        check([
            (self.method in detection.METHODS, f"method {self.method!r} is not one of {', '.join(detection.METHODS)}"),
            (self.scope in detection.SCOPES, f"scope {self.scope!r} is not one of {', '.join(detection.SCOPES)}"),
            (0 < self.cg_tol < 1, f"cg_tol must be > 0 and < 1, got {self.cg_tol!r}"),
        ])
        self.scoring(1.0 if self.damping is None else self.damping)  # detection.Settings checks the rest

    def scoring(self, damping: float) -> detection.Settings:
        """Return the method settings `detection.score` takes, with `damping` resolved."""
        return detection.Settings(**{f.name: getattr(self, f.name) for f in fields(detection.Settings)
                                     if f.name != "damping"}, damping=damping)


# The settings each method reads (besides scope, batch_size); a `--set` of a setting no chosen method reads is
# refused by the CLI.
METHOD_KEYS = {"loss": ("direction",), "loss_trajectory": ("direction",), "tracin": ("direction",), "spectral": (),
               "activation_clustering": ("seed", "pca_dims", "kmeans_restarts"),
               "influence": ("direction", "seed", "influence_candidates", "hessian_examples", "damping", "cg_tol",
                             "cg_max_iter")}
COMMON_KEYS = ("scope", "batch_size")


def settings(config: Mapping[str, Any]) -> DetectSettings:
    """Return the validated settings of a detection trial's config (unknown keys and bad values raise one line);
    a `detector` entry ({"method", "direction"?}: the grid axis of `study detect`) is read as its keys."""
    flat = {k: v for k, v in config.items() if k != "detector"}
    return config_lib.from_values(DetectSettings, {**flat, **dict(config.get("detector") or {})}, "detection setting")


def checkpoint_states(entry: Mapping[str, Any], method: str) -> list[dict]:
    """Return the checkpoint states of a source-table entry that `method` reads (the final one, or every kept
    checkpoint for TRAJECTORY_METHODS), sorted by epoch, the final last; each read once. Raise a one-line
    SpuriousError when they disagree on the config or the planted examples (not one training run)."""
    dirs = list(entry.get("checkpoints") or [entry["checkpoint"]]) if method in TRAJECTORY_METHODS \
        else [entry["checkpoint"]]
    states = sorted((read_checkpoint(d, entry.get("file")) for d in dirs), key=lambda s: int(s.get("epoch", 0)))
    final = states[-1]
    cfg = config_lib.from_dict(final["config"])  # as configs, not dicts: older checkpoints lack newer keys
    planted = np.sort(np.asarray(final.get("spurious_idx", []), np.int64))
    for state in states[:-1]:
        if config_lib.from_dict(state["config"]) != cfg or not np.array_equal(
                np.sort(np.asarray(state.get("spurious_idx", []), np.int64)), planted):
            raise SpuriousError(f"the checkpoints of source {entry['checkpoint']!r} disagree on the config or the "
                                "planted examples; they are not one training run")
    return states


def snapshots(states: list[dict], cfg, data, device: torch.device) -> list[detection.Snapshot]:
    """Return the models of `states` as snapshots; each snapshot's `lr` is the rate the source trained its last
    epoch with (`train.lr_at(cfg, epoch − 1)`, protocol §6.2)."""
    out = []
    for state in states:
        epoch = int(state.get("epoch", 0))
        model = checkpoint.model_from_checkpoint(state, data.input_shape, data.num_classes).to(device).eval()
        out.append(detection.Snapshot(model, epoch, train.lr_at(cfg, max(epoch - 1, 0))))
    return out


def detect(config: Mapping[str, Any], datasets: Mapping[str, Any], sources: Mapping[str, dict]) -> None:
    """Score the candidates of source model `config['source_trial_id']` with `config['method']`; report the
    detection metrics and save the per-example scores.

    `sources` maps a source id to {"checkpoint": the final checkpoint directory (path or URI), "file": the
    model's file in it, "checkpoints": every kept checkpoint directory, "spurious_score": the source cell's
    final spurious score, "control_patterns": for an n = 0 model, the patterns of the cells it is the
    baseline of}; it and `datasets` come through `tune.with_parameters`.
    """
    s = settings(config)
    use_trial_threads()
    if s.source_trial_id not in sources:
        raise SpuriousError(f"source trial {s.source_trial_id!r} is not among this study's sources")
    entry = sources[s.source_trial_id]
    start = time.perf_counter()
    states = checkpoint_states(entry, s.method)
    cfg, data = planted_data(states[-1], datasets)
    device = train.resolve_device(cfg.device)
    snaps = snapshots(states, cfg, data, device)
    rows = detection.candidate_rows(data.y_train, cfg.targets or (cfg.target,), s.scope)
    damping = s.damping if s.damping is not None else \
        influence.defaults_for(cfg.dataset, max(cfg.n_spurious, 1))["damping"]
    scored = detection.score(s.method, snaps, data.x_train.to(device), data.y_train.to(device), rows,
                             **asdict(s.scoring(damping)))
    planted = np.isin(rows, np.asarray(data.spurious_idx, np.int64))
    metrics = detection.detection_metrics(scored.scores, planted)
    if "solved" in scored.arrays:  # influence: how the exact solve did on its own subset (protocol §12.2)
        solved = np.asarray(scored.arrays["solved"], bool)
        metrics.update(solved_planted=int(planted[solved].sum()),
                       solved_auroc=mia.roc_auc(scored.scores[solved], planted[solved]))
    wall = time.perf_counter() - start
    epochs = [snap.epoch for snap in snaps]
    row = {**metrics, **scored.extra, "method": s.method, "scope": s.scope,
           "direction": s.direction if s.method in detection.DIRECTED else "", "source_trial_id": s.source_trial_id,
           "source_member": int(entry.get("member", 0)), "source_training_id": str(entry.get("training_id", "")),
           "source_spurious_score": float(entry.get("spurious_score", float("nan"))),
           "control_patterns": str(entry.get("control_patterns", "")), "checkpoints": len(snaps),
           "checkpoint_epochs": ",".join(map(str, epochs)), "detect_wall_s": wall,
           **({"detect_damping": damping} if s.method == "influence" else {}), **source_columns(cfg)}
    saved = {"format": SCORES_FORMAT, "rows": torch.from_numpy(np.asarray(rows, np.int64)),
             "scores": torch.from_numpy(np.asarray(scored.scores, np.float64)), "planted": torch.from_numpy(planted),
             "settings": {k: v for k, v in asdict(s).items() if v is not None},
             **{k: torch.as_tensor(np.asarray(v)) for k, v in scored.arrays.items()}}
    report(row, saved)
