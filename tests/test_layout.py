"""`study run`'s automatic trial layout (study/layout.py): the rule, the bench profile, and what a user sees."""
import json
import os
import subprocess
import sys

import pytest

from study import layout
from tests.conftest import requires_fashion


def pick(profile=None, **kw):
    args = {"trainings": 100, "grid": True, "bundlable": True, "cores": 2, "gpu": False, "cluster": False}
    args.update(kw)
    user_cpus, user_bundle = args.pop("user_cpus", None), args.pop("user_bundle", None)
    return layout.choose(user_cpus, user_bundle, profile=profile, **args)


def profile_of(*rows):
    return {"measured": "2026-11-30 12:00 UTC",
            "candidates": [{"threads": t, "bundle": k, "models_per_hour": m} for t, k, m in rows]}


def test_builtin_rule_bundles_bundlable_grid_studies_on_one_thread_per_trial():
    got = pick()
    assert (got.cpus_per_trial, got.bundle, got.source) == (1.0, layout.BUILTIN_BUNDLE, "builtin")
    assert "2 trials at a time × 1 CPU thread each, bundles of up to 8 models" in got.describe(2)
    assert "no usable `study bench` profile" in got.describe(2)


@pytest.mark.parametrize("kw", [{"grid": False}, {"bundlable": False}])
def test_no_bundling_for_sampled_studies_or_models_that_cannot_be_bundled(kw):
    assert pick(**kw).bundle == 1


def test_bundle_size_leaves_every_core_a_trial():
    assert pick(trainings=16).bundle == 8  # 2 bundles of 8 side by side
    assert pick(trainings=6).bundle == 3
    assert pick(trainings=2).bundle == 1
    assert pick(trainings=16, max_concurrent=1).bundle == 8
    assert pick(trainings=4, max_concurrent=1).bundle == 4
    assert "1 trial at a time" in pick(max_concurrent=1).describe(2, 1)


def test_gpu_and_cluster_keep_the_old_defaults_and_say_why():
    for kw in ({"gpu": True}, {"cluster": True}):
        got = pick(**kw)
        assert (got.cpus_per_trial, got.bundle, got.source) == (1.0, 1, "fixed")
        assert "nothing is picked" in got.describe()


def test_what_the_user_sets_wins():
    got = pick(user_cpus=2.0, user_bundle=1, profile=profile_of((1, 32, 1e6)))
    assert (got.cpus_per_trial, got.bundle, got.source) == (2.0, 1, "user")
    assert pick(user_bundle=4, trainings=2).bundle == 4  # a user's K is not capped
    assert pick(user_cpus=2.0).cpus_per_trial == 2.0
    # a layout the user set in part says which part
    assert "(--cpus-per-trial as set; the rest auto: built-in rule" in pick(user_cpus=1.0).describe(2)
    assert "(--bundle as set; the rest auto" in pick(user_bundle=2).describe(2)
    # with a profile, the bundle is the best measured at the user's thread count
    prof = profile_of((1, 1, 100.0), (1, 8, 180.0), (2, 1, 150.0), (2, 32, 500.0))
    assert pick(prof, user_cpus=1.0).bundle == 8 and pick(prof, user_cpus=2.0).bundle == 32


def test_profile_picks_the_most_models_per_hour_for_the_whole_machine():
    # 1 thread: 100/h per trial, two side by side = 200/h; 2 threads: 150/h alone; bundle 8 at 1 thread: 180/h
    prof = profile_of((1, 1, 100.0), (2, 1, 150.0), (1, 8, 180.0), (2, 8, 300.0))
    got = pick(prof)
    assert (got.cpus_per_trial, got.bundle, got.source) == (1.0, 8, "bench")  # 2 × 180 > 300 > 200
    assert "from `study bench` of 2026-11-30 12:00 UTC" in got.describe(2)
    # two threads win when one trial on both cores beats two side by side
    assert pick(profile_of((1, 1, 100.0), (2, 1, 250.0))).cpus_per_trial == 2.0
    # a sampled study cannot bundle: the best unbundled candidate (2 × 100 > 150)
    got = pick(prof, grid=False)
    assert (got.cpus_per_trial, got.bundle) == (1.0, 1)
    # measured on more cores than this machine has: ignored
    assert pick(profile_of((1, 1, 100.0), (4, 1, 1000.0))).cpus_per_trial == 1.0


def test_profile_round_trip_is_per_machine_and_survives_a_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SPURIOUS_CACHE", str(tmp_path))
    assert layout.load_profile() is None
    path = layout.save_profile([{"threads": 1, "bundle": 8, "models_per_hour": 5.0}])
    assert path == tmp_path / layout.PROFILE_FILE
    assert layout.load_profile()["candidates"][0]["bundle"] == 8
    other = json.loads(path.read_text()) + [{"machine": {"cpu": "other"}, "candidates": [{"threads": 1}]}]
    path.write_text(json.dumps(other))
    layout.save_profile([{"threads": 1, "bundle": 32, "models_per_hour": 6.0}])
    saved = json.loads(path.read_text())
    assert len(saved) == 2 and layout.load_profile()["candidates"][0]["bundle"] == 32
    path.write_text("{not json")
    assert layout.load_profile() is None


@pytest.mark.parametrize("argv, message", [
    (["--cpus-per-trial", "nan"], "--cpus-per-trial must be at least 0.0001"),
    (["--cpus-per-trial", "1e-9"], "--cpus-per-trial must be at least 0.0001"),
    (["--gpus-per-trial", "nan"], "--gpus-per-trial must be >= 0, got nan"),
])
def test_bad_resource_values_are_one_line(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "-m", "study.cli", "run", "demo", "--smoke", "--storage-path", str(tmp_path),
                           *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_bundle_is_refused_for_tuning_studies(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "study.cli", "run", "mitigation", "--smoke", "--bundle", "2",
                           "--storage-path", str(tmp_path)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 2 and "--bundle 2 applies to training studies" in proc.stderr
    assert not list(tmp_path.iterdir())


@requires_fashion
@pytest.mark.slow
@pytest.mark.ray
def test_study_run_uses_this_machines_bench_profile_and_says_so(tmp_path):
    """A user who ran `study bench` gets its layout: here a profile where bundles of 2 are best and one trial
    at a time, so the smoke demo's 2 trainings become one bundle. Default verbosity and W&B."""
    cache = tmp_path / "cache"
    env = {**os.environ, "SPURIOUS_CACHE": str(cache)}
    subprocess.run([sys.executable, "-c", "from study import layout; layout.save_profile(["
                    "{'threads': 1, 'bundle': 1, 'models_per_hour': 10.0},"
                    "{'threads': 1, 'bundle': 2, 'models_per_hour': 30.0}])"], env=env, check=True)
    proc = subprocess.run([sys.executable, "-m", "study.cli", "run", "demo", "--smoke", "--storage-path",
                           str(tmp_path), "--name", "auto", "--max-concurrent", "1"], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = "layout: 1 trial at a time × 1 CPU thread each, bundles of up to 2 models (auto: from `study bench` of"
    assert proc.stdout.count(line) == 2  # the banner and the end of the run
    meta = json.loads((tmp_path / "auto" / "study.json").read_text())
    assert (meta["bundle"], meta["resources"]["cpu"], meta["layout"]["source"]) == (2, 1.0, "bench")
    assert meta["trials"] == 1
    # the user's flags win over the profile
    proc = subprocess.run([sys.executable, "-m", "study.cli", "run", "demo", "--smoke", "--storage-path",
                           str(tmp_path), "--name", "mine", "--bundle", "1", "--cpus-per-trial", "1", "--wandb", "off",
                           "-v", "0"], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # (--wandb off -v 0: not the subject here)
    assert "one model per trial (as set)" in proc.stdout
    assert json.loads((tmp_path / "mine" / "study.json").read_text())["trials"] == 2
