"""DP-SGD (spurious/dp.py): per-example gradients against opacus' GradSampleModule, ε against opacus' RDP
accountant stepped one step at a time, bundles equal separate DP runs, σ = 0 is the non-DP recipe, bad input;
ghost norms (Linear-only models) against vmap and opacus, and the vmap path where ghost norms do not apply."""
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spurious import bundle, dp, stacked_mlp, train
from spurious.config import TrainConfig
from spurious.errors import SpuriousError
from spurious.planted import plant_config
from tests.conftest import synthetic_dataset



def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def test_per_example_gradients_and_clipping_equal_opacus():
    from opacus import GradSampleModule

    model, x, y = tiny(), torch.randn(9, 1, 3, 4), torch.randint(0, 3, (9,))
    grads, losses, logits = dp.per_example_grads(model, x, y)
    wrapped = GradSampleModule(tiny(), loss_reduction="sum")
    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    for (name, p) in wrapped.named_parameters():
        key = name.removeprefix("_module.")
        torch.testing.assert_close(grads[key], p.grad_sample, rtol=1e-5, atol=1e-6)
    assert torch.allclose(losses, F.cross_entropy(model(x), y, reduction="none"), atol=1e-6)
    summed, norms = dp.clipped_sum(grads, 0.5)
    flat = torch.cat([p.grad_sample.reshape(9, -1) for p in wrapped.parameters()], 1)
    assert torch.allclose(norms, flat.norm(dim=1), rtol=1e-5)
    clipped = flat * (0.5 / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None]
    assert torch.allclose(torch.cat([v.reshape(-1) for v in summed.values()]), clipped.sum(0), atol=1e-6)


def test_epsilon_equals_opacus_accountant_stepped_one_step_at_a_time():
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(234 * 3):
        accountant.step(noise_multiplier=1.1, sample_rate=128 / 60000)
    assert dp.epsilon(1.1, 128 / 60000, 234 * 3, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert dp.epsilon(0.0, 0.1, 10, 1e-5) == math.inf and dp.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert dp.group_epsilon(0.5, 1e-5, 3) == (1.5, pytest.approx(3 * math.exp(1.0) * 1e-5))
    assert dp.group_epsilon(9.0, 1e-5, 100) == (900.0, 1.0)  # e^{99·9} overflows a float: capped, not raised
    assert dp.group_epsilon(math.inf, 1e-5, 3) == (math.inf, 1.0)


def cfg(**changes):
    base = dict(dataset="fashion", model="mlp", pattern="s3", n_spurious=10, epochs=2, batch_size=64, lr=0.05,
                dp_noise_multiplier=1.0, dp_max_grad_norm=1.0, device="cpu")
    return TrainConfig(**{**base, **changes})


def test_a_dp_run_reports_epsilon_every_epoch_and_is_reproducible(tiny_data):
    c = cfg()
    rows = train.train(c, plant_config(tiny_data, c)).history
    again = train.train(c, plant_config(tiny_data, c)).history
    assert [r["dp_epsilon"] for r in rows] == [r["dp_epsilon"] for r in again]
    n = len(tiny_data.y_train)
    expected = [dp.epsilon(1.0, 64 / n, e * (n // 64), 1 / n) for e in (1, 2)]
    assert [r["dp_epsilon"] for r in rows] == pytest.approx(expected)
    assert rows[0]["train_loss"] == again[0]["train_loss"] and np.isfinite(rows[-1]["train_loss"])
    last = rows[-1]  # group privacy for the 10 planted images: (10ε, 10·e^{9ε}·δ), capped at 1
    assert last["dp_delta_used"] == pytest.approx(1 / n) and last["dp_group_epsilon"] == pytest.approx(10 * expected[1])
    assert last["dp_group_delta"] == pytest.approx(min(1.0, 10 * math.exp(9 * expected[1]) / n))


def test_noise_multiplier_zero_is_the_non_dp_recipe(tiny_data):
    off = cfg(dp_noise_multiplier=0.0)
    plain = cfg(dp_noise_multiplier=0.0, dp_max_grad_norm=5.0)  # DP settings are inert without noise
    a, b = (train.train(c, plant_config(tiny_data, c)).history for c in (off, plain))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b] and "dp_epsilon" not in a[0]


def test_a_bundle_with_dp_equals_separate_dp_runs(tiny_data):
    cfgs = [cfg(seed=s, data_seed=s) for s in (0, 1)]
    engine = bundle.lockstep(cfgs, tiny_data)
    assert isinstance(engine, bundle.BundleEngine)  # an MLP on the CPU: batched
    train.fit(engine)
    for k, c in enumerate(cfgs):
        alone = train.train(c, plant_config(tiny_data, c)).history
        assert [r["train_loss"] for r in engine.histories[k]] == pytest.approx([r["train_loss"] for r in alone],
                                                                                rel=1e-5)
        assert [r["dp_epsilon"] for r in engine.histories[k]] == [r["dp_epsilon"] for r in alone]


def _engines_equal_bundle(data, cfgs, **engine_kwargs):
    engine = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, data), **engine_kwargs)
    assert engine.stack is not None
    results = engine.fit()
    for k, c in enumerate(cfgs):
        alone = train.train(c, plant_config(data, c))
        for mine, theirs in zip(engine.histories[k], alone.history, strict=True):
            for key in ("train_loss", "train_acc", "test_acc", "spurious_score"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (k, key)
            for key in ("dp_epsilon", "dp_delta_used", "dp_group_epsilon", "dp_group_delta"):
                assert mine[key] == theirs[key], (k, key)
        for name, p in alone.model.named_parameters():
            torch.testing.assert_close(results[k].model.get_parameter(name), p, rtol=1e-4, atol=1e-5)
        assert results[k].state["rng"]["generator"].equal(alone.state["rng"]["generator"])  # same draws


@pytest.mark.parametrize("members", [
    [dict(seed=0, data_seed=0), dict(seed=1, data_seed=1, n_spurious=0), dict(seed=2, data_seed=3, lr=0.1)],
    [dict(seed=5, data_seed=2)],
])
def test_a_batched_dp_bundle_equals_separate_dp_engines(tiny_data, members):
    _engines_equal_bundle(tiny_data, [cfg(**m) for m in members])


def test_a_batched_dp_bundle_with_adam_input_noise_and_member_clip_norms(tiny_data):
    cfgs = [cfg(seed=s, data_seed=s, optimizer="adam", lr=1e-3, noise_sigma=0.1 * s, dp_max_grad_norm=0.5 + s)
            for s in range(3)]
    _engines_equal_bundle(tiny_data, cfgs, vmap_chunk=2)


def test_padding_and_empty_batches_contribute_nothing():
    torch.manual_seed(0)
    models = [tiny() for _ in range(3)]
    for m in models[1:]:
        for p in m.parameters():
            p.data.normal_()
    stack = stacked_mlp.StackedMLP(stacked_mlp.linear_layers(models[0]))
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n, _ in
              models[0].named_parameters()}
    sizes, width = (5, 0, 2), 7
    x, y = torch.randn(3, width, 1, 3, 4), torch.randint(0, 3, (3, width))
    mask = (torch.arange(width) < torch.tensor(sizes)[:, None]).float()
    sums, norms, losses, logits = stack.ghost_clipped_sum(params, x, y, mask, 0.7)
    for k, (model, size) in enumerate(zip(models, sizes)):
        if size:
            want, want_norms, want_losses, _ = dp.ghost_clipped_sum(model, x[k, :size], y[k, :size], 0.7)
            torch.testing.assert_close(norms[k, :size], want_norms)
            torch.testing.assert_close(losses[k, :size], want_losses)
        else:
            want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        assert (norms[k, size:] == 0).all() and (losses[k, size:] == 0).all()
        for name in want:
            torch.testing.assert_close(sums[name][k], want[name])
    empty = stack.ghost_clipped_sum(params, x[:, :0], y[:, :0], mask[:, :0], 0.7)[0]
    assert all((s == 0).all() and s.shape == params[n].shape for n, s in empty.items())


def test_a_dp_bundle_with_empty_batches_equals_separate_engines(tiny_data):
    # batch 4 of 600 rows: q = 1/150, so some steps of some members are empty and sizes differ every step
    assert sum(not len(b) for b in dp.poisson_batches(600, 4 / 600, 150, torch.Generator().manual_seed(0)))
    _engines_equal_bundle(tiny_data, [cfg(seed=s, data_seed=s, batch_size=4, epochs=1) for s in range(3)])


def test_a_dp_bundle_resumes_from_its_snapshot(tiny_data):
    cfgs = [cfg(seed=s, data_seed=s, optimizer="adam", lr=1e-3) for s in range(2)]
    whole = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, tiny_data))
    whole.fit()
    first = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, tiny_data))
    first.step()
    resumed = bundle.BundleEngine(cfgs, bundle.plant_members(cfgs, tiny_data))
    resumed.restore(first.snapshot())
    assert resumed.steps == first.steps == 600 // 64  # DP epochs take ⌊N/B⌋ steps (Adam's step count)
    resumed.fit()
    assert [[r["train_loss"] for r in h] for h in resumed.histories] == [[r["train_loss"] for r in h]
                                                                         for h in whole.histories]


@pytest.mark.parametrize("changes, message", [
    ({"dp_noise_multiplier": -1.0}, "dp_noise_multiplier must be >= 0"),
    ({"dp_max_grad_norm": 0.0}, "dp_max_grad_norm must be > 0"),
    ({"dp_delta": 1.0}, "dp_delta must be in [0, 1)"),
    ({"dp_sampling": "shuffle"}, "dp_sampling 'shuffle' is not one of poisson"),
    ({"grad_clip": 0.1}, "grad_clip (element-wise clipping of the batch gradient) and DP-SGD's per-example"),
])
def test_bad_dp_settings_are_one_line(changes, message):
    with pytest.raises(SpuriousError) as err:
        cfg(**changes)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dp_with_batchnorm_is_refused_in_one_line():
    data = synthetic_dataset(n_train=64, n_test=32, shape=(3, 32, 32))
    c = cfg(model="resnet20", epochs=1, n_spurious=3)
    with pytest.raises(SpuriousError, match="model 'resnet20' has BatchNorm2d layers, which mix the examples"):
        train.Engine(c, plant_config(data, c))


@pytest.mark.slow
@pytest.mark.ray
def test_a_dp_study_runs_from_the_cli_and_reports_epsilon(tmp_path):
    """`study run demo --smoke --set dp_noise_multiplier=1.0` on real Fashion-MNIST, as the README says."""
    import subprocess
    import sys

    from analysis import load
    from tests.conftest import FASHION_DIR

    if not FASHION_DIR.exists():
        pytest.skip("real Fashion-MNIST not installed")
    # --wandb off -v 0: this test is about the DP setting, not W&B or Tune's output; batch 512: fewer DP steps
    done = subprocess.run([sys.executable, "-m", "study.cli", "run", "demo", "--smoke", "--set",
                           "dp_noise_multiplier=1.0", "--set", "batch_size=512", "--name", "dp", "--storage-path",
                           str(tmp_path), "--wandb", "off",
                           "-v", "0"], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    df = load(tmp_path / "dp")
    n = 60000
    expected = dp.epsilon(1.0, 512 / n, n // 512, 1 / n)
    assert (df["dp_noise_multiplier"] == 1.0).all() and df["dp_epsilon"].to_numpy() == pytest.approx(expected)


# ------------------------------------------------------------------ ghost norms (the fast path for Linear-only models)


def project_model(name):
    torch.manual_seed(0)
    from spurious import models

    return models.build(name, (1, 28, 28))


def batch(n, shape, classes=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=gen), torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("name", ["tiny", "mlp", "large_mlp"])
def test_ghost_norms_and_clipped_sum_equal_vmap_and_opacus(name):
    from opacus import GradSampleModule

    model = tiny() if name == "tiny" else project_model(name)
    x, y = batch(12, (1, 3, 4), 3) if name == "tiny" else batch(12, (1, 28, 28))
    assert dp.ghost_supported(model)
    grads, losses, logits = dp.per_example_grads(model, x, y)
    norms = dp.clipped_sum(grads, 1.0)[1]
    max_norm = float(norms.median())  # about half the examples are clipped
    vmap_sum, _ = dp.clipped_sum(grads, max_norm)
    ghost_sum, ghost_norms, ghost_losses, ghost_logits = dp.ghost_clipped_sum(model, x, y, max_norm)
    assert 0 < int((norms > max_norm).sum()) < len(y)
    torch.testing.assert_close(ghost_norms, norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghost_losses, losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghost_logits, logits, rtol=1e-5, atol=1e-6)
    assert list(ghost_sum) == list(vmap_sum)
    for key in vmap_sum:
        torch.testing.assert_close(ghost_sum[key], vmap_sum[key], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated in `.grad`
    wrapped = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    flat = torch.cat([p.grad_sample.reshape(len(y), -1) for p in wrapped.parameters()], 1)
    torch.testing.assert_close(ghost_norms, flat.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_ghost_counts_only_trainable_parameters():
    model, (x, y) = tiny(), batch(7, (1, 3, 4), 3)
    model[1].bias.requires_grad_(False)
    model[3].weight.requires_grad_(False)
    grads = dp.per_example_grads(model, x, y)[0]
    summed, norms = dp.clipped_sum(grads, 0.05)
    ghost_sum, ghost_norms = dp.ghost_clipped_sum(model, x, y, 0.05)[:2]
    assert list(ghost_sum) == list(summed) == ["1.weight", "3.bias"]
    torch.testing.assert_close(ghost_norms, norms, rtol=1e-5, atol=1e-6)
    for key in summed:
        torch.testing.assert_close(ghost_sum[key], summed[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "large_mlp"])
def test_noisy_gradient_by_ghost_and_by_vmap_are_the_same_step(name):
    x, y = batch(20, (1, 3, 4), 3) if name == "tiny" else batch(20, (1, 28, 28))
    results = {}
    for method in ("ghost", "vmap", "auto"):
        model = tiny() if name == "tiny" else project_model(name)
        gen = torch.Generator().manual_seed(5)
        losses, logits = dp.noisy_gradient(model, x, y, 0.7, 0.1, 16.0, gen, method=method)
        results[method] = ([p.grad for p in model.parameters()], losses, logits, gen.get_state())
    for method in ("vmap", "auto"):
        for a, b in zip(results["ghost"][0], results[method][0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results["ghost"][1], results[method][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results["ghost"][2], results[method][2], rtol=1e-5, atol=1e-6)
        assert torch.equal(results["ghost"][3], results[method][3])  # the same number of noise draws


def test_models_with_other_layers_take_the_vmap_path():
    model = project_model("cnn002")
    assert not dp.ghost_supported(model) and dp.ghost_supported(project_model("mlp_v2"))
    x, y = batch(4, (1, 28, 28))
    model.eval()  # no dropout: the vmap path's draws are then deterministic
    gen = torch.Generator().manual_seed(0)
    losses, logits = dp.noisy_gradient(model, x, y, 0.0, 1.0, 4.0, gen)  # auto
    expected = dp.clipped_sum(dp.per_example_grads(model, x, y)[0], 1.0)[0]
    assert losses.shape == (4,) and logits.shape == (4, 10)
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[key] / 4.0, rtol=1e-5, atol=1e-7)
    with pytest.raises(dp.GhostUnsupported, match="every trainable parameter in an nn.Linear"):
        dp.noisy_gradient(model, x, y, 1.0, 1.0, 4.0, gen, method="ghost")
    with pytest.raises(SpuriousError, match="DP method 'fast' is not one of auto, ghost, vmap"):
        dp.noisy_gradient(model, x, y, 1.0, 1.0, 4.0, gen, method="fast")


class TwiceLinear(nn.Module):
    """A Linear applied to (B, 2, 4) input: 3-D, which ghost norms do not cover."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.out = nn.Linear(4, 4), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.inner(x.reshape(len(x), 2, 4)).flatten(1))


class Reused(nn.Module):
    """One Linear applied twice: its per-example gradient is a sum of two outer products."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.inner(torch.relu(self.inner(x.flatten(1)))))


def inplace_relu():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))


@pytest.mark.parametrize("make, message", [(TwiceLinear, "saw input of shape (5, 2, 4)"), (Reused, "ran 2 times"),
                                           (inplace_relu, "changed in place")])
def test_layers_ghost_norms_do_not_cover_fall_back_to_vmap_or_raise(make, message):
    x, y = batch(5, (1, 2, 4), 3)
    assert dp.ghost_supported(make())
    with pytest.raises(dp.GhostUnsupported, match=re.escape(message)):
        dp.ghost_clipped_sum(make(), x, y, 1.0)
    with pytest.raises(dp.GhostUnsupported, match=re.escape(message)):
        dp.noisy_gradient(make(), x, y, 1.0, 1.0, 5.0, torch.Generator().manual_seed(0), method="ghost")
    grads, warned = {}, {}
    for method in ("auto", "vmap"):
        model = make()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dp.noisy_gradient(model, x, y, 1.0, 0.1, 5.0, torch.Generator().manual_seed(0), method=method)
        grads[method], warned[method] = [p.grad for p in model.parameters()], [str(w.message) for w in caught]
    assert len(warned["auto"]) == 1 and message in warned["auto"][0] and warned["vmap"] == []
    for a, b in zip(grads["auto"], grads["vmap"]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", dp.METHODS)
def test_an_empty_batch_gives_noise_only(method):
    model, x, y = tiny(), torch.zeros((0, 1, 3, 4)), torch.zeros(0, dtype=torch.long)
    losses, logits = dp.noisy_gradient(model, x, y, 2.0, 0.5, 4.0, torch.Generator().manual_seed(3), method=method)
    gen = torch.Generator().manual_seed(3)
    assert losses.shape == (0,) and len(logits) == 0
    for p in model.parameters():
        expected = 2.0 * 0.5 * torch.randn(p.shape, generator=gen) / 4.0
        torch.testing.assert_close(p.grad, expected)


def test_a_dp_run_by_ghost_norms_equals_the_same_run_by_vmap(tiny_data, monkeypatch):
    c = cfg(epochs=1)
    ghost = train.train(c, plant_config(tiny_data, c))
    monkeypatch.setattr(dp, "ghost_supported", lambda model: False)
    vmap = train.train(c, plant_config(tiny_data, c))
    assert ghost.history[0]["train_loss"] == pytest.approx(vmap.history[0]["train_loss"], rel=1e-5)
    for a, b in zip(ghost.model.parameters(), vmap.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_dp_study_of_a_batchnorm_model_is_refused_before_any_trial():
    from study import runner

    data = {"cifar10": synthetic_dataset(n_train=300, n_test=50, shape=(3, 32, 32), name="cifar10")}
    plain = TrainConfig(dataset="cifar10", model="resnet20", n_spurious=3)
    assert runner.check_configs([plain], data) == [plain]
    with pytest.raises(SpuriousError, match="model 'resnet20' has BatchNorm2d layers"):
        runner.check_configs([plain, plain.replace(dp_noise_multiplier=1.0)], data)
