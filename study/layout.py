"""The trial layout `study run` uses when the user does not choose one: CPUs (torch threads) per trial and
bundling (how many compatible models one trial trains in lock-step, `spurious.bundle`).

`study bench` (its `layout` section) times one epoch of the LargeMLP Fashion-MNIST trial for the engine and
for bundles, at 1 thread and at all of this machine's cores, and saves what it measured as a profile in the
cache ($SPURIOUS_CACHE or ~/.cache/rare-spurious-study, file `layout.json`), keyed by the machine (CPU model,
logical cores, torch version, GPU). `study run` on embedded Ray then picks the candidate with the most
models per hour per core: trials run side by side, one per `cpus_per_trial` cores, so a layout's
throughput is (cores / threads) × its models per hour (this assumes side-by-side trials do not slow each
other down, which holds for the small models bundling serves; the bench measures one trial at a time).
Without a profile for this machine the built-in rule applies: 1 thread per trial and bundles of
`BUILTIN_BUNDLE` (what `study bench` measured on a 2-core machine, README "Speed"). Either way:

- bundling is used only for grid studies whose model can be bundled (the MLPs), and K is capped so that
  every core still gets a trial: K ≤ ⌈trainings / concurrent trials⌉ (cores // threads, or
  `--max-concurrent` if lower);
- on a GPU, or on a cluster (`--address`), nothing is picked: 1 CPU per trial and no bundling, as before
  (choose `--bundle` and `--gpus-per-trial` from `scripts/gpu-bench.sh` / `study bench`);
- `--cpus-per-trial` and `--bundle`, when given, are used as given.

Bundled members give the results of separate runs within float tolerance (tests/test_bundle.py), so the
layout changes wall time, not numbers beyond rounding.
"""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

PROFILE_FILE = "layout.json"
BUILTIN_BUNDLE = 8
BUILTIN_THREADS = 1


@dataclass(frozen=True)
class Layout:
    """A study's trial layout: CPUs (= torch threads) per trial, bundle size, and where they came from."""

    cpus_per_trial: float
    bundle: int
    source: str  # "user", "bench" (this machine's profile), "builtin" or "fixed" (GPU or cluster)
    detail: str = ""
    user_set: tuple = ()  # the flags the user set when the rest was picked: "--cpus-per-trial", "--bundle"

    def describe(self, cores: Optional[int] = None, max_concurrent: Optional[int] = None) -> str:
        """Return one line: concurrent trials × threads, bundling, and why (for the banner and the run's end)."""
        threads = f"{self.cpus_per_trial:g} CPU thread{'s' if self.cpus_per_trial != 1 else ''}"
        at_once = ""
        if cores:
            slots = max(1, min(int(cores // self.cpus_per_trial), max_concurrent or cores))
            at_once = f"{slots} trial{'s' if slots != 1 else ''} at a time × "
        bundling = f"bundles of up to {self.bundle} models" if self.bundle > 1 else "one model per trial"
        why = {"user": "as set", "bench": f"auto: from `study bench` {self.detail}",
               "builtin": f"auto: built-in rule, {self.detail}", "fixed": f"defaults: {self.detail}"}[self.source]
        if self.user_set and self.source != "user":
            why = f"{' and '.join(self.user_set)} as set; the rest {why}"
        return f"layout: {at_once}{threads} each, {bundling} ({why})"

    def to_meta(self) -> dict:
        """Return the layout as recorded in study.json."""
        return asdict(self)


def cache_dir() -> Path:
    """Return the project's cache folder ($SPURIOUS_CACHE or ~/.cache/rare-spurious-study)."""
    return Path(os.environ.get("SPURIOUS_CACHE") or "~/.cache/rare-spurious-study").expanduser()


def profile_path() -> Path:
    """Return the path of this machine's layout profile."""
    return cache_dir() / PROFILE_FILE


def cpu_model() -> str:
    """Return the CPU's model name (from /proc/cpuinfo on Linux, else `platform.processor()`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """Return what a profile is keyed by: CPU model, logical cores, torch version and GPU (name or None)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = torch.__version__
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "torch": torch_version, "gpu": gpu}


def save_profile(candidates: Sequence[dict], path: Optional[Path] = None, **measured: Any) -> Path:
    """Save the bench's candidates ({"threads", "bundle", "models_per_hour"} each) for this machine; return
    the path. Profiles of other machines in the same file are kept; `measured` adds how (epochs timed...)."""
    path = path or profile_path()
    profiles = _read(path)
    me = machine()
    profiles = [p for p in profiles if p.get("machine") != me]
    profiles.append({"machine": me, "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "candidates": [dict(c) for c in candidates], **measured})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profiles, indent=2))
    tmp.replace(path)
    return path


def _read(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def load_profile(path: Optional[Path] = None) -> Optional[dict]:
    """Return this machine's saved profile, or None (none saved, another machine's, or unreadable)."""
    me = machine()
    for profile in _read(path or profile_path()):
        if profile.get("machine") == me and profile.get("candidates"):
            return profile
    return None


def best_candidate(candidates: Sequence[dict], cores: int, bundling: bool) -> dict:
    """Return the candidate with the most models per hour for the whole machine: (cores // threads) trials
    side by side, each at its measured models per hour. Bundles count only when `bundling` is allowed."""
    allowed = [c for c in candidates if c["threads"] <= cores and (bundling or c["bundle"] == 1)]
    if not allowed:
        return {"threads": BUILTIN_THREADS, "bundle": 1}
    return max(allowed, key=lambda c: max(1, cores // c["threads"]) * c["models_per_hour"])


def choose(user_cpus: Optional[float], user_bundle: Optional[int], *, trainings: int, grid: bool,
           bundlable: bool, cores: int, gpu: bool, cluster: bool, profile: Optional[dict] = None,
           max_concurrent: Optional[int] = None) -> Layout:
    """Return the layout of a training study (see the module docstring for the rule).

    `trainings`: distinct models the study trains; `grid`: its cells are known before it runs (bundling needs
    that); `bundlable`: its model has no dropout, BatchNorm or buffers; `cores`: this machine's logical
    CPUs; `gpu`/`cluster`: a local GPU or `--address` (nothing is picked then); `profile`: `load_profile()`;
    `max_concurrent`: the user's cap on trials at once (it lowers the number of side-by-side trials).
    """
    if user_cpus is not None and user_bundle is not None:
        return Layout(user_cpus, user_bundle, "user")
    if gpu or cluster:
        where = "a GPU" if gpu else "a cluster"
        return Layout(user_cpus or 1.0, user_bundle or 1, "fixed",
                      f"nothing is picked on {where}; see `study bench` and scripts/gpu-bench.sh")
    bundling = grid and bundlable and user_bundle is None
    if profile is not None:
        best = best_candidate(profile["candidates"], cores, bundling)
        source, detail = "bench", f"of {profile.get('measured', '?')}"
    else:
        best = {"threads": BUILTIN_THREADS, "bundle": BUILTIN_BUNDLE if bundling else 1}
        source, detail = "builtin", "no usable `study bench` profile for this machine"
    if profile is not None and user_cpus is not None:  # the best bundle measured at the user's thread count
        at = [c for c in profile["candidates"] if c["threads"] == max(1, int(user_cpus))]
        best = best_candidate(at, cores, bundling) if at else {"threads": user_cpus, "bundle": 1}
    cpus = float(user_cpus if user_cpus is not None else best["threads"])
    bundle = user_bundle if user_bundle is not None else int(best["bundle"])
    if user_bundle is None and bundle > 1:
        slots = max(1, min(int(cores // cpus), max_concurrent or cores))
        bundle = max(1, min(bundle, math.ceil(trainings / slots)))
    user_set = tuple(flag for flag, value in (("--cpus-per-trial", user_cpus), ("--bundle", user_bundle))
                     if value is not None)
    return Layout(cpus, bundle, source, detail, user_set)
