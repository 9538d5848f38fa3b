"""Bundled training against separate Engine runs: equality, compatibility, checkpoints, resume, divergence.

With one member per pass (vmap_chunk=1) a bundle is bit-identical to separate runs, and the tests assert
that. Passes of several members (batched matmuls, the CPU default; vmap, the GPU default) change float
rounding only: per-epoch metrics within ATOL, parameters within PARAM_ATOL. Observed on CPU (torch 2.14,
3 epochs, both kinds of pass): metrics within 5e-7, parameters within 3e-8 (SGD) and 7e-6 (Adam).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spurious import bench, bundle, checkpoint, metrics, models, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from spurious.planted import plant, plant_config
from spurious.stacked_mlp import StackedMLP, linear_layers
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
@pytest.mark.parametrize("chunk,batched,atol,param_atol", [(1, None, 0, 0), (3, True, ATOL, PARAM_ATOL),
                                                           (3, False, ATOL, PARAM_ATOL)],
                         ids=["one-member-passes", "batched-matmuls", "vmap"])
def test_bundle_matches_separate_runs(tiny_data, optimizer, lr_scale, chunk, batched, atol, param_atol):
    cfgs = [cfg(**{**m, "optimizer": optimizer, "lr": m.get("lr", 0.05) * lr_scale}) for m in MEMBERS]
    engine = bundle.BundleEngine(cfgs, [planted(tiny_data, c) for c in cfgs], vmap_chunk=chunk, batched=batched)
    assert (engine.stack is not None) == bool(batched)
    assert_close(engine.fit(), separate(tiny_data, cfgs), atol, param_atol)


@pytest.mark.parametrize("optimizer,lr_scale", [("sgd", 1.0), ("adam", 0.02)])
def test_cpu_default_batches_members_and_matches_separate_runs(tiny_data, optimizer, lr_scale):
    """No clipping: SGD adds the gradients straight into the momentum buffers; per-member lr, l2 and noise;
    three members in passes of two, the last one alone and batched all the same."""
    members = [{key: v for key, v in m.items() if key != "grad_clip"} for m in MEMBERS]
    cfgs = [cfg(**{**m, "optimizer": optimizer, "lr": m.get("lr", 0.05) * lr_scale}) for m in members]
    engine = bundle.BundleEngine(cfgs, [planted(tiny_data, c) for c in cfgs], vmap_chunk=2)
    assert engine.stack is not None and [(p.index, p.module) for p in engine.passes] == [(slice(0, 2), None),
                                                                                         (slice(2, 3), None)]
    assert engine._fuses_momentum(engine.passes[0], engine._hyper(engine.passes[0])[2]) == (optimizer == "sgd")
    assert_close(engine.fit(), separate(tiny_data, cfgs))
    assert bundle.BundleEngine(cfgs * 3, [planted(tiny_data, c) for c in cfgs] * 3).chunk == bundle.CPU_CHUNK


def test_batched_members_with_equal_hyperparameters_match_separate_runs(tiny_data):
    """Members that agree on lr, l2 and clip take the optimisers' scalar paths (here with L2 and clipping)."""
    cfgs = [cfg(data_seed=s, seed=s, l2=1e-3, grad_clip=0.5 if s < 2 else 0.0, noise_sigma=0.05)
            for s in range(4)]
    bundled = bundle.train_bundle(cfgs, bundle.plant_members(cfgs, tiny_data), vmap_chunk=2)
    assert_close(bundled, separate(tiny_data, cfgs))


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


@pytest.mark.parametrize("optimizer,lr_scale,clip", [("sgd", 1.0, False), ("sgd", 1.0, True), ("adam", 0.02, True)])
def test_batched_bundle_resumed_mid_way_from_engine_snapshots_matches_separate_runs(tiny_data, optimizer, lr_scale,
                                                                                      clip):
    members = MEMBERS if clip else [{key: v for key, v in m.items() if key != "grad_clip"} for m in MEMBERS]
    cfgs = [cfg(**{**m, "optimizer": optimizer, "lr": m.get("lr", 0.05) * lr_scale, "epochs": 3}) for m in members]
    datas = [planted(tiny_data, c) for c in cfgs]
    states = []
    for c, d in zip(cfgs, datas):
        engine = train.Engine(c, d)
        engine.step()
        states.append(engine.snapshot())
    resumed = bundle.train_bundle(cfgs, datas, resume=states, vmap_chunk=3)
    assert [len(r.history) for r in resumed] == [3] * 3
    assert_close(resumed, separate(tiny_data, cfgs))


@pytest.mark.parametrize("optimizer,clip", [("sgd", True), ("sgd", False), ("adam", True)])
def test_bundle_resume_equals_uninterrupted_bundle(tiny_data, tmp_path, optimizer, clip):
    members = MEMBERS if clip else [{key: v for key, v in m.items() if key != "grad_clip"} for m in MEMBERS]
    cfgs = [cfg(**{**m, "optimizer": optimizer, "epochs": 3}) for m in members]
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


@pytest.mark.parametrize("momentum,chunk", [(0.0, None), (0.9, None), (0.9, 1)])
def test_a_diverging_member_is_dropped_and_the_others_go_on(tiny_data, momentum, chunk):
    cfgs = [cfg(momentum=momentum), cfg(lr=1e12, momentum=momentum, seed=1), cfg(momentum=momentum, seed=2)]
    kept = [cfgs[0], cfgs[2]]
    with pytest.raises(train.TrainingError):
        separate(tiny_data, [cfgs[1]])
    rows = []
    engine = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, tiny_data), chunk)
    results = engine.fit(lambda r, snapshot: rows.append(r))
    assert [r[1] for r in rows] == [None] * cfgs[0].epochs
    assert "training loss became" in engine.failed[1] and "lower the learning rate" in engine.failed[1]
    assert_close([results[0], results[2]], separate(tiny_data, kept))
    with pytest.raises(train.TrainingError, match="every bundle member diverged"):
        bundle.train_bundle([cfgs[1]], bundle.plant_members([cfgs[1]], tiny_data))


def test_batched_bundle_reports_validation_metrics_like_engine(tiny_data):
    cfgs = [cfg(n_spurious=n, data_seed=s, seed=s, val_size=60) for n, s in ((10, 0), (0, 1))]
    engine = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, tiny_data))
    assert engine.stack is not None and engine.chunk == 2
    for _ in range(2):
        rows = engine.step()
    for c, row in zip(cfgs, rows):
        alone = train.Engine(c, plant_config(tiny_data, c))
        for _ in range(2):
            expected = alone.step()
        assert set(metrics.VAL_KEYS) <= set(expected) and set(row) == set(expected)
        for key in set(expected) - {"epoch_time_s"}:
            assert row[key] == pytest.approx(expected[key], abs=ATOL), key


def test_linear_layers_recognises_only_flatten_linear_relu_models():
    assert linear_layers(models.build("mlp", (1, 28, 28))) == [("layers.1.weight", "layers.1.bias"),
                                                               ("layers.3.weight", "layers.3.bias")]
    assert linear_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))) == [
        ("1.weight", "1.bias"), ("3.weight", "3.bias")]
    others = [nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
              nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False)), nn.Sequential(nn.Flatten(2), nn.Linear(4, 3)),
              nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU()), models.build("cnn002", (1, 28, 28))]
    for other in others:
        assert linear_layers(other) is None, other


def test_stacked_mlp_gives_each_members_loss_gradients_and_logits():
    torch.manual_seed(0)
    nets = [models.build("large_mlp", (1, 6, 5), 4) for _ in range(3)]
    stack = StackedMLP(linear_layers(nets[0]))
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in nets])
              for n, _ in nets[0].named_parameters()}
    x, y, x_test = torch.rand(3, 16, 1, 6, 5), torch.randint(0, 4, (3, 16)), torch.rand(40, 1, 6, 5)
    loss, hits, grads = stack.loss_and_grads(params, x, y)
    buffers = {n: torch.ones_like(p) for n, p in params.items()}
    stack.loss_and_grads(params, x, y, buffers, beta=0.5)
    for k, net in enumerate(nets):
        out = net(x[k])
        expected = F.cross_entropy(out, y[k])
        expected.backward()
        assert loss[k] == pytest.approx(expected.item(), abs=1e-6) and hits[k] == (out.argmax(1) == y[k]).sum()
        for name, p in net.named_parameters():
            assert torch.allclose(grads[name][k], p.grad, atol=1e-6), name
            assert torch.allclose(buffers[name][k], 0.5 + p.grad, atol=1e-6), name
        assert torch.allclose(stack.logits(params, x_test)[k], net(x_test), atol=1e-6)


def test_epoch_flops_count_the_matmuls_of_training_and_evaluation():
    shapes = bench.linear_shapes("large_mlp", (1, 28, 28))
    assert shapes == [(784, 256), (256, 256), (256, 256), (256, 10)]
    assert [name for name, *_ in bench.step_matmuls(shapes, 128)[:4]] == [
        "layer0.forward", "layer0.weight_grad", "layer1.forward", "layer1.weight_grad"]
    forward = 2 * (784 * 256 + 2 * 256 * 256 + 256 * 10)
    flops = bench.epoch_flops(shapes, 60000, 20000)
    assert flops["eval"] == 20000 * forward == pytest.approx(13.37e9, rel=1e-3)
    assert flops["train"] == 60000 * (2 * forward + 2 * (2 * 256 * 256 + 256 * 10)) == pytest.approx(96.28e9, rel=1e-3)
    assert flops["total"] == flops["train"] + flops["eval"]
    with pytest.raises(SpuriousError, match="not made of Flatten, Linear and ReLU"):
        bench.linear_shapes("cnn002", (1, 28, 28))


@pytest.mark.parametrize("k,shape", [(1, "16x20 @ 20x8"), (3, "3x16x20 @ 3x20x8")])
def test_matmul_limit_times_every_product_of_a_step(k, shape):
    out = bench.matmul_limit([(20, 8), (8, 3)], batch=16, k=k, repeats=2)
    assert [r["name"] for r in out["rows"]] == ["layer0.forward", "layer0.weight_grad", "layer1.forward",
                                                "layer1.weight_grad", "layer1.input_grad"]
    assert out["rows"][0]["shape"] == shape and out["k"] == k and out["batch"] == 16
    assert out["gflops"] > 0 and all(r["gflops"] > 0 for r in out["rows"])


def test_bundle_throughput_reports_every_setting(tiny_data):
    out = bench.bundle_throughput(cfg(epochs=70), tiny_data, ks=(1, 2), epochs=1, train_subset=256)
    assert [r["setting"] for r in out["rows"]] == ["reference", "engine", "bundle_1", "bundle_2"]
    assert all(r["models_per_hour"] > 0 and r["epoch_s"] > 0 for r in out["rows"])
    reference, engine = out["rows"][0], out["rows"][1]
    for row in out["rows"]:  # models per hour of 70-epoch trainings from the fastest epoch, K models at once
        assert row["models_per_hour"] == pytest.approx(row["k"] * 3600.0 / (row["epoch_s"] * 70))
        assert row["vs_reference"] == pytest.approx(row["models_per_hour"] / reference["models_per_hour"])
        assert row["vs_engine"] == pytest.approx(row["models_per_hour"] / engine["models_per_hour"])
        assert row["epoch_s"] <= row["epoch_s_median"]
    shapes = bench.linear_shapes("large_mlp", (1, 28, 28))
    for row, evaluated in zip(out["rows"], (200, 400, 400, 400)):  # the reference scores the clean test set only
        flops = row["k"] * bench.epoch_flops(shapes, 256, evaluated)["total"]
        assert row["gflops"] == pytest.approx(flops / row["epoch_s"] / 1e9)
        assert row["limit_gflops"] > 0 and row["limit_pct"] == pytest.approx(100 * row["gflops"] / row["limit_gflops"])
    best = max(out["rows"][1:], key=lambda r: r["models_per_hour"])
    assert out["best"] == best["setting"] and out["recommendation"].startswith(best["setting"] + ":")
