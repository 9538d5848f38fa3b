"""The study kinds, one registry: how each kind's trainable is rebuilt from study.json, how it resumes and what
it prints at the end.

Every kind runs through the one runner (study/runner.py: `launch` for a new study, `reopen` + `resume` for an
interrupted one, in any shell). A kind adds only what is its own:

| kind              | trainable (from study.json)                       | end-of-run print                       |
|-------------------|---------------------------------------------------|----------------------------------------|
| `train`           | train_classifier, or train_bundle when bundle > 1 | spurious-score table (finish_training) |
| `delete`, `mia`,  | the post-hoc trainable with its source table      | deletion / attack / detection table    |
| `detect`          |                                                   | (posthoc.py)                           |
| `tune-mitigation` | Tune experiments baseline, search, confirm        | Pareto set, recommendation, test check |

A new kind registers here with the same three parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from analysis import frames, load
from spurious.patterns import short_name
from spurious.errors import SpuriousError
from spurious.registry import Registry
from study import mitigation, posthoc, runner


@dataclass(frozen=True)
class Kind:
    """A study kind: `trainable(meta, data, resources)` builds its Tune trainable from study.json (None for a
    kind that is not one Tune experiment), `finish(experiment_path) -> exit code` prints its result, and
    `resume(reopened, retry_errored) -> exit code` continues it (default: Tuner.restore, then finish)."""

    trainable: Callable[[dict, dict, dict], Any] | None
    finish: Callable[[str], int]
    resume: Callable[[runner.Reopened, bool], int] | None = None


def finish_training(experiment_path: str) -> int:
    """Print the spurious-score table and the experiment path; return 130 when trials are left unfinished (an
    interrupted run: `study resume` continues it), 1 if any trial errored, else 0."""
    if "://" in str(experiment_path):
        print(f"\nexperiment: {experiment_path}\n(copy it to a local folder and run `study report` on it for "
              f"tables and figures)")
        return 0
    df = load(experiment_path)
    print()
    # rows by the paper's pattern labels (S3, R3, …; canonical names are in the records): protocol §2.1
    print(frames.score_table(df.assign(pattern=df["pattern"].map(short_name)) if "pattern" in df else df))
    errored = frames.errored(df)
    for line in errored:
        print(f"errored: {line}")
    meta = _recorded_meta(experiment_path)
    layout = (meta.get("layout") or {}).get("line")  # absent for studies run before layouts were recorded
    if layout:
        print(f"\n{layout}")
    print(f"\nexperiment: {experiment_path}")
    if runner.print_unfinished(df, int(meta.get("trials", 0)), experiment_path):
        return 130
    return 1 if errored else 0


def _recorded_meta(experiment_path: str) -> dict:
    """Return the experiment's study.json record, or {} where it has none (nothing to add to the table)."""
    try:
        return runner.read_meta(experiment_path)
    except SpuriousError:
        return {}


def _resume_tuner(kind: Kind) -> Callable[[runner.Reopened, bool], int]:
    def resume(again: runner.Reopened, retry_errored: bool) -> int:
        return kind.finish(runner.resume(again, kind.trainable, retry_errored).experiment_path)
    return resume


def _resume_tuning(again: runner.Reopened, retry_errored: bool) -> int:
    return mitigation.exit_code(mitigation.resume(again, retry_errored))


KINDS: Registry[Kind] = Registry("study kind")
KINDS.register("train", Kind(runner.train_trainable, finish_training))
KINDS.register("delete", Kind(posthoc.trainable_of, lambda path: posthoc.finish(path, "delete")))
KINDS.register("mia", Kind(posthoc.trainable_of, lambda path: posthoc.finish(path, "mia")))
KINDS.register("detect", Kind(posthoc.trainable_of, lambda path: posthoc.finish(path, "detect")))
KINDS.register("tune-mitigation", Kind(None, lambda path: 0, _resume_tuning))


def resume(again: runner.Reopened, retry_errored: bool = False) -> int:
    """Continue a reopened study of any kind and print its result; return the exit code (1: a trial errored)."""
    kind = KINDS.get(again.meta.get("kind", "train"))
    code = (kind.resume or _resume_tuner(kind))(again, retry_errored)
    again.logging.print_sync_hint(again.path)
    return code
