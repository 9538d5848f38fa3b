"""The training engine without Ray: determinism, resume equality, augmentation, noise, divergence."""
import numpy as np
import pytest
import torch

from spurious import checkpoint, metrics, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from spurious.planted import plant
from tests.conftest import requires_fashion

METRIC_KEYS = {"epoch", "epoch_lr", "train_loss", "train_acc", "test_loss", "test_acc", "spurious_score",
               "spurious_score_nontarget", "patterned_acc", "patterned_target_rate", "epoch_time_s"}


def cfg(**kw):
    base = dict(dataset="fashion", model="large_mlp", pattern="s3", n_spurious=20, target=0, epochs=3, lr=0.05,
                batch_size=64, device="cpu")
    return TrainConfig(**{**base, **kw})


def fit(tiny_data, c, **kw):
    data = plant(tiny_data, c.pattern, c.n_spurious, c.target, c.data_seed)
    rows = []
    result = train.train(c, data, on_epoch=lambda m, snap: rows.append(m), **kw)
    return result, rows


def strip_time(rows):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def test_callback_sees_every_epoch_with_all_metrics(tiny_data):
    result, rows = fit(tiny_data, cfg())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == METRIC_KEYS
    assert rows[-1]["test_acc"] > 0.5, "the synthetic task is easy"
    assert result.final["epoch"] == 3 and len(result.history) == 3
    assert result.state["spurious_idx"].tolist() == plant(tiny_data, "s3", 20, 0, 0).spurious_idx.tolist()


def test_same_config_same_metrics_and_seed_changes_them(tiny_data):
    _, a = fit(tiny_data, cfg())
    _, b = fit(tiny_data, cfg())
    _, c = fit(tiny_data, cfg(seed=1))
    assert strip_time(a) == strip_time(b)
    assert strip_time(a) != strip_time(c)


@pytest.mark.parametrize("options", [
    dict(optimizer="sgd", noise_sigma=0.1, grad_clip=0.05),
    dict(optimizer="adam", lr=1e-3, l2=1e-4, epochs=4),
    dict(model="cnn002", optimizer="adam", lr=1e-3),  # dropout uses the global RNG
])
def test_resume_from_disk_checkpoint_equals_uninterrupted_run(tiny_data, tmp_path, options):
    c = cfg(**options)
    full, rows_full = fit(tiny_data, c)
    saved = {}

    def stop_after_two(m, snapshot):
        if m["epoch"] == 2:
            saved["path"] = checkpoint.save(snapshot(), tmp_path / "ckpt.pt")
            raise KeyboardInterrupt

    data = plant(tiny_data, c.pattern, c.n_spurious, c.target, c.data_seed)
    with pytest.raises(KeyboardInterrupt):
        train.train(c, data, on_epoch=stop_after_two)
    torch.manual_seed(12345)  # a fresh process would have a different global RNG state
    state = checkpoint.load(saved["path"])
    resumed = train.train(c, data, resume=state)
    assert strip_time(resumed.history) == strip_time(rows_full)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_checkpoint_loads_with_weights_only_and_rebuilds_model(tiny_data, tmp_path):
    result, _ = fit(tiny_data, cfg(epochs=1))
    path = checkpoint.save(result.state, tmp_path / "a" / "final.pt")
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and state["config"]["pattern"] == "s3"
    model = checkpoint.model_from_checkpoint(state, (1, 28, 28))
    x = tiny_data.x_test[:50]
    assert torch.allclose(model(x), result.model.eval()(x))


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SpuriousError, match="cannot be read"):
        checkpoint.load(bad)
    with pytest.raises(SpuriousError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_divergence_raises_training_error(tiny_data):
    with pytest.raises(train.TrainingError, match="training loss became"):
        fit(tiny_data, cfg(lr=1e12, momentum=0.0, epochs=2))


@pytest.mark.parametrize("epochs,expected", [(3, [15, 25]), (70, [40, 50, 60]), (140, [60, 100, 120]),
                                             (160, [40, 80, 120, 140]), (500, [60, 120])])
def test_milestone_table(epochs, expected):
    assert train.milestones(epochs) == expected


@pytest.mark.parametrize("epochs", [17, 70, 160])
def test_lr_at_is_multisteplr_exactly(epochs):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.037)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, train.milestones(epochs), 0.1)
    for done in range(epochs + 1):
        assert train.lr_at(cfg(lr=0.037, epochs=epochs), done) == opt.param_groups[0]["lr"]
        opt.step()
        sched.step()


def test_lr_schedule_decays_at_milestones(tiny_data):
    _, rows = fit(tiny_data, cfg(epochs=17, lr=0.01))
    lrs = [r["epoch_lr"] for r in rows]
    assert lrs[14] == pytest.approx(0.01) and lrs[15] == pytest.approx(0.001)


def test_aug01_is_a_shifted_possibly_flipped_copy():
    x = torch.rand(64, 3, 32, 32)
    out = train.aug01(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        candidates = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)
    assert not torch.equal(out, x)


def test_reference_model_string_turns_on_aug01():
    c = TrainConfig(dataset="cifar10", model="aug01-ce-tor-altResNet20Norm02")
    assert train.augmentation_of(c) == "aug01"
    assert train.augmentation_of(TrainConfig(model="ce-tor-LargeMLP")) == "none"
    with pytest.raises(SpuriousError, match="augmentation 'aug07'"):
        train.validate_names(TrainConfig(model="aug07-ce-tor-LargeMLP"))


def test_noise_sigma_changes_training_but_not_test_data(tiny_data):
    _, clean = fit(tiny_data, cfg(epochs=1))
    _, noisy = fit(tiny_data, cfg(epochs=1, noise_sigma=0.5))
    assert clean[0]["train_loss"] != noisy[0]["train_loss"]


def test_unknown_names_fail_before_training():
    for key, value in [("dataset", "svhn"), ("model", "resnet9000"), ("pattern", "v99")]:
        with pytest.raises(SpuriousError, match=repr(value)):
            train.validate_names(cfg(**{key: value}))


def test_cuda_device_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SpuriousError, match="no CUDA GPU"):
        train.resolve_device("cuda")
    assert train.resolve_device("auto").type == "cpu"


@pytest.mark.slow
@requires_fashion
def test_learns_the_planted_pattern_on_real_fashion_mnist():
    """n = 2000 planted S3 squares must give a clearly higher spurious score than n = 0 (the paper's claim)."""
    scores = {}
    for n in (0, 2000):
        c = TrainConfig(dataset="fashion", pattern="s3", n_spurious=n, target=0, epochs=2, device="cpu")
        scores[n] = train.run(c).final
    assert scores[2000]["spurious_score"] > scores[0]["spurious_score"] + 0.2
    assert scores[2000]["patterned_target_rate"] > 0.5
    assert scores[0]["test_acc"] > 0.8


def test_welch_greater():
    assert metrics.welch_greater([0.5, 0.6, 0.55], [0.1, 0.12, 0.09]) < 0.01
    assert metrics.welch_greater([0.1, 0.12, 0.09], [0.5, 0.6, 0.55]) > 0.99
    assert np.isnan(metrics.welch_greater([0.3], [0.1, 0.2]))
    assert metrics.welch_greater([1, 1], [0, 0]) == 0.0


def test_a_checkpoint_with_the_old_scheduler_state_resumes_the_same(tiny_data):
    """Checkpoints written before issue 12 also hold MultiStepLR's state; the epoch alone sets the rate."""
    c = cfg(epochs=17, lr=0.01)
    data = plant(tiny_data, c.pattern, c.n_spurious, c.target, c.data_seed)
    engine = train.Engine(c, data)
    for _ in range(15):
        engine.step()
    state = engine.snapshot()
    old = {**state, "scheduler": {"last_epoch": 15, "base_lrs": [0.01], "_last_lr": [0.001]},
           "optimizer": {**state["optimizer"], "param_groups": [{**g, "initial_lr": 0.01}
                                                                for g in state["optimizer"]["param_groups"]]}}
    resumed = train.train(c, data, resume=old)
    assert [r["epoch_lr"] for r in resumed.history[15:]] == [pytest.approx(0.001, rel=1e-12)] * 2
    assert strip_time(resumed.history) == strip_time(train.train(c, data).history)
