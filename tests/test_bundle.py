"""Bundled training against separate Engine runs: equality, compatibility, checkpoints, resume, divergence.

With one member per pass (vmap_chunk=1, the CPU default) a bundle is bit-identical to separate runs,
and the tests assert that. Batched passes (vmap_chunk > 1, the GPU default) change float rounding only:
per-epoch metrics within ATOL, parameters within PARAM_ATOL. Observed on CPU (torch 2.14, 3 epochs):
metrics within 5e-7, parameters within 2e-8 (SGD) and 3e-6 (Adam).
"""
import pytest
import torch

from spurious import bundle, checkpoint, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from spurious.planted import plant
from tests.conftest import synthetic_dataset
from tests.test_train import METRIC_KEYS, strip_time

ATOL, PARAM_ATOL = 1e-4, 1e-4


@pytest.fixture
def tiny_data():
    """400 training images (7 batches of 64, the last one partial), 200 test images."""
    return synthetic_dataset(n_train=400, n_test=200)


def cfg(**kw):
    base = dict(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=20, target=0, epochs=2, lr=0.05,
                batch_size=64, device="cpu")
    return TrainConfig(**{**base, **kw})


# Three members that differ in everything a member may own.
MEMBERS = [dict(), dict(data_seed=1, n_spurious=35, seed=3, lr=0.02, l2=1e-3, noise_sigma=0.1),
           dict(data_seed=2, n_spurious=0, seed=1, lr=0.08, grad_clip=0.05, pattern="r1", target=3, tau=0.2)]


def planted(tiny_data, c):
    return plant(tiny_data, c.pattern, c.n_spurious, c.target, c.data_seed, c.split)


def separate(tiny_data, cfgs):
    return [train.train(c, planted(tiny_data, c)) for c in cfgs]


def assert_close(bundled, separated, atol=ATOL, param_atol=PARAM_ATOL):
    for b, s in zip(bundled, separated):
        assert len(b.history) == len(s.history)
        for rb, rs in zip(b.history, s.history):
            assert set(rb) == METRIC_KEYS and rb["epoch"] == rs["epoch"] and rb["epoch_lr"] == rs["epoch_lr"]
            for key in METRIC_KEYS - {"epoch_time_s"}:
                assert rb[key] == pytest.approx(rs[key], abs=atol), key
        for name, value in s.model.state_dict().items():
            assert torch.allclose(b.model.state_dict()[name], value, atol=param_atol), name


@pytest.mark.parametrize("optimizer,lr_scale", [("sgd", 1.0), ("adam", 0.02)])
@pytest.mark.parametrize("chunk,atol,param_atol", [(1, 0, 0), (3, ATOL, PARAM_ATOL)])
def test_bundle_matches_separate_runs(tiny_data, optimizer, lr_scale, chunk, atol, param_atol):
    cfgs = [cfg(**{**m, "optimizer": optimizer, "lr": m.get("lr", 0.05) * lr_scale}) for m in MEMBERS]
    bundled = bundle.train_bundle(cfgs, [planted(tiny_data, c) for c in cfgs], vmap_chunk=chunk)
    assert_close(bundled, separate(tiny_data, cfgs), atol, param_atol)


def test_compact_member_data_trains_exactly_like_planted_data(tiny_data):
    cfgs = [cfg(**m) for m in MEMBERS]
    bundled = bundle.train_bundle(cfgs, bundle.plant_members(cfgs, tiny_data), vmap_chunk=1)
    assert_close(bundled, separate(tiny_data, cfgs), atol=0, param_atol=0)


def test_aug01_members_match_separate_runs(tiny_data):
    cfgs = [cfg(augmentation="aug01", data_seed=s, seed=s, noise_sigma=0.05 * s) for s in range(2)]
    bundled = bundle.train_bundle(cfgs, bundle.plant_members(cfgs, tiny_data))
    assert_close(bundled, separate(tiny_data, cfgs))


@pytest.mark.parametrize("options", [dict(), dict(pattern="r2", n_spurious=0, data_seed=4),
                                     dict(split="mia_target", data_seed=2, n_spurious=10), dict(split="mia_shadow")])
def test_plant_members_reproduces_plant(tiny_data, options):
    c = cfg(**options)
    member, full = bundle.plant_members([c], tiny_data)[0], planted(tiny_data, c)
    got = member.materialize()
    for key in ("x_train", "y_train", "x_test", "y_test", "x_test_patterned"):
        assert torch.equal(getattr(got, key), getattr(full, key)), key
    assert got.spurious_idx.tolist() == full.spurious_idx.tolist()


def test_members_share_one_base_and_store_only_planted_rows(tiny_data):
    cfgs = [cfg(data_seed=s, n_spurious=10 + s) for s in range(4)]
    for datas in (bundle.plant_members(cfgs, tiny_data), [planted(tiny_data, c) for c in cfgs]):
        engine = bundle.BundleEngine(cfgs, datas)
        assert len(engine.pool.x) == len(tiny_data.y_train) + sum(c.n_spurious for c in cfgs)
        assert len(engine.tests) == 2, "one clean and one patterned test set: S3 ignores the data seed"


@pytest.mark.parametrize("key,value", [("model", "mlp"), ("epochs", 4), ("batch_size", 32), ("optimizer", "adam"),
                                       ("momentum", 0.5), ("augmentation", "aug01"), ("dataset", "mnist"),
                                       ("split", "mia_target"), ("eval_batch_size", 100)])
def test_incompatible_configs_raise_naming_the_key(tiny_data, key, value):
    cfgs = [cfg(), cfg(**{key: value})]
    with pytest.raises(SpuriousError, match=f"member 1 has {key}="):
        bundle.BundleEngine(cfgs, [planted(tiny_data, cfgs[0])] * 2)
    assert bundle.compatible_key(cfgs[0]) != bundle.compatible_key(cfgs[1])


def test_compatible_key_ignores_member_keys_and_aliases():
    a = cfg(optimizer="adam", momentum=0.9, model="large_mlp")
    b = cfg(optimizer="adam", momentum=0.1, model="ce-tor-LargeMLP", lr=0.3, l2=1e-4, seed=7, data_seed=9,
            n_spurious=100, pattern="r3", target=5, noise_sigma=0.2, grad_clip=1.0, tau=0.3)
    assert bundle.compatible_key(a) == bundle.compatible_key(b)
    assert dict(bundle.compatible_key(a))["momentum"] is None, "Adam ignores momentum"


def test_incompatible_data_and_models_raise(tiny_data):
    cfgs = [cfg(), cfg(data_seed=1)]
    data = planted(tiny_data, cfgs[0])
    with pytest.raises(SpuriousError, match="training-set size"):
        bundle.BundleEngine(cfgs, [data, data.without_spurious()])
    with pytest.raises(SpuriousError, match="one data per config"):
        bundle.BundleEngine(cfgs, [data])
    cnn = [cfg(model="cnn002"), cfg(model="cnn002", seed=1)]
    with pytest.raises(SpuriousError, match="Dropout.*only models without dropout"):
        bundle.BundleEngine(cnn, [data, data])


def test_snapshot_has_engine_format_and_loads_as_a_single_model(tiny_data, tmp_path):
    cfgs = [cfg(**m) for m in MEMBERS[:2]]
    datas = [planted(tiny_data, c) for c in cfgs]
    engine = bundle.BundleEngine(cfgs, datas)
    for _ in range(2):
        engine.step()
    for c, d, state in zip(cfgs, datas, engine.snapshot()):
        single = train.Engine(c, d)
        for _ in range(2):
            single.step()
        expected = single.snapshot()
        assert set(state) == set(expected)
        assert state["epoch"] == expected["epoch"] == 2 and state["config"] == expected["config"]
        assert "scheduler" not in state, "the schedule is a function of the epoch (train.lr_at)"
        assert state["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
        assert state["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
        assert torch.equal(state["spurious_idx"], expected["spurious_idx"])
        for got, want in zip(strip_time(state["history"]), strip_time(expected["history"])):
            assert got == pytest.approx(want, abs=ATOL)
        loaded = checkpoint.load(checkpoint.save(state, tmp_path / "member.pt"))
        model = checkpoint.model_from_checkpoint(loaded, d.input_shape)
        assert torch.allclose(model(d.x_test[:50]), single.model.eval()(d.x_test[:50]), atol=PARAM_ATOL)


def test_engine_resumes_a_member_from_a_bundle_snapshot(tiny_data, tmp_path):
    cfgs = [cfg(optimizer="adam", lr=1e-3, data_seed=s, seed=s, epochs=3) for s in range(2)]
    datas = [planted(tiny_data, c) for c in cfgs]
    engine = bundle.BundleEngine(cfgs, datas)
    for _ in range(2):
        engine.step()
    state = checkpoint.load(checkpoint.save(engine.snapshot()[1], tmp_path / "m1.pt"))
    resumed = train.train(cfgs[1], datas[1], resume=state)
    assert_close([resumed], separate(tiny_data, cfgs[1:]))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bundle_resume_equals_uninterrupted_bundle(tiny_data, tmp_path, optimizer):
    cfgs = [cfg(**{**m, "optimizer": optimizer, "epochs": 3}) for m in MEMBERS]
    datas = bundle.plant_members(cfgs, tiny_data)
    full = bundle.train_bundle(cfgs, datas)
    saved = {}

    def stop_after_two(rows, snapshot):
        if rows[0]["epoch"] == 2:
            saved["states"] = [checkpoint.save(s, tmp_path / f"{k}.pt") for k, s in enumerate(snapshot())]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bundle.train_bundle(cfgs, datas, on_epoch=stop_after_two)
    torch.manual_seed(12345)  # a fresh process would have a different global RNG state
    resumed = bundle.train_bundle(cfgs, datas, resume=[checkpoint.load(p) for p in saved["states"]])
    for a, b in zip(full, resumed):
        assert strip_time(a.history) == strip_time(b.history)
        for name, value in a.model.state_dict().items():
            assert torch.equal(value, b.model.state_dict()[name]), name


def test_restore_rejects_mismatched_checkpoints(tiny_data):
    cfgs = [cfg(), cfg(data_seed=1)]
    engine = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, tiny_data))
    states = engine.snapshot()
    with pytest.raises(SpuriousError, match="config differs on data_seed"):
        engine.restore(states[::-1])
    with pytest.raises(SpuriousError, match="needs 2 member checkpoints"):
        engine.restore(states[:1])


def test_a_diverging_member_is_dropped_and_the_others_go_on(tiny_data):
    cfgs = [cfg(momentum=0.0), cfg(lr=1e12, momentum=0.0, seed=1), cfg(momentum=0.0, seed=2)]
    kept = [cfgs[0], cfgs[2]]
    with pytest.raises(train.TrainingError):
        separate(tiny_data, [cfgs[1]])
    rows = []
    engine = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, tiny_data))
    results = engine.fit(lambda r, snapshot: rows.append(r))
    assert [r[1] for r in rows] == [None] * cfgs[0].epochs
    assert "training loss became" in engine.failed[1] and "lower the learning rate" in engine.failed[1]
    assert_close([results[0], results[2]], separate(tiny_data, kept))
    with pytest.raises(train.TrainingError, match="every bundle member diverged"):
        bundle.train_bundle([cfgs[1]], bundle.plant_members([cfgs[1]], tiny_data))


def test_bundle_throughput_reports_every_setting(tiny_data):
    from spurious import bench

    out = bench.bundle_throughput(cfg(epochs=70), tiny_data, ks=(1, 2), epochs=1, train_subset=256)
    assert [r["setting"] for r in out["rows"]] == ["reference", "engine", "bundle_1", "bundle_2"]
    assert all(r["models_per_hour"] > 0 and r["epoch_s"] > 0 for r in out["rows"])
    reference, engine = out["rows"][0], out["rows"][1]
    for row in out["rows"]:  # models per hour of 70-epoch trainings from the fastest epoch, K models at once
        assert row["models_per_hour"] == pytest.approx(row["k"] * 3600.0 / (row["epoch_s"] * 70))
        assert row["vs_reference"] == pytest.approx(row["models_per_hour"] / reference["models_per_hour"])
        assert row["vs_engine"] == pytest.approx(row["models_per_hour"] / engine["models_per_hour"])
        assert row["epoch_s"] <= row["epoch_s_median"]
    best = max(out["rows"][1:], key=lambda r: r["models_per_hour"])
    assert out["best"] == best["setting"] and out["recommendation"].startswith(best["setting"] + ":")
