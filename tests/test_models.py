"""Tests for spurious.models: every registered architecture builds, runs and has the paper's size."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn

from spurious import models
from spurious.errors import SpuriousError

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
MNIST_MODELS = {"mlp", "mlp_v2", "large_mlp", "large_mlp_v2", "cnn002"}

# Protocol §5.1, 10 classes; MLP family and CNN002 on MNIST, ResNets and VGG16 on CIFAR.
PARAM_COUNTS = {
    "mlp": 203_530,
    "mlp_v2": 269_322,
    "large_mlp": 335_114,
    "large_mlp_v2": 932_362,
    "cnn002": 312_202,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet110": 1_727_962,
    "vgg16": 134_301_514,
}

REFERENCE_STRINGS = [
    ("ce-tor-LargeMLP", "large_mlp", None),
    ("ce-tor-MLP", "mlp", None),
    ("ce-tor-MLPv2", "mlp_v2", None),
    ("ce-tor-LargeMLPv2-hyper", "large_mlp_v2", None),
    ("ce-tor-CNN002", "cnn002", None),
    ("aug01-ce-tor-altResNet20Norm02", "resnet20", "aug01"),
    ("aug01-ce-tor-altResNet32Norm02", "resnet32", "aug01"),
    ("aug01-ce-tor-altResNet110Norm02-hyper", "resnet110", "aug01"),
    ("aug01-ce-tor-Vgg16Norm02", "vgg16", "aug01"),
    ("large_mlp", "large_mlp", None),
    ("altResNet20", "resnet20", None),
]


def example_shape(name: str) -> tuple[int, int, int]:
    """Return the input shape the paper uses for model `name`."""
    return MNIST if name in MNIST_MODELS else CIFAR


@lru_cache(maxsize=None)
def built(name: str) -> nn.Module:
    """Return one shared instance of `name` on its paper input shape (VGG16 is slow to initialise)."""
    torch.manual_seed(0)
    return models.build(name, example_shape(name)).eval()


def count_params(model: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())


def test_every_model_has_a_param_count() -> None:
    assert set(models.names()) == set(PARAM_COUNTS)


@pytest.mark.parametrize("name", models.names())
def test_forward_shape_and_finite(name: str) -> None:
    x = torch.rand(2, *example_shape(name))
    with torch.no_grad():
        out = built(name)(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(set(models.names()) - {"vgg16"}))
def test_num_classes_and_train_mode(name: str) -> None:
    model = models.build(name, example_shape(name), num_classes=3).train()
    out = model(torch.rand(2, *example_shape(name)))
    out.sum().backward()
    assert out.shape == (2, 3)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", models.names())
def test_param_counts(name: str) -> None:
    assert count_params(built(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", ["mlp", "large_mlp"])
def test_mlp_counts_do_not_depend_on_layout_but_on_pixels(name: str) -> None:
    extra = 3 * 32 * 32 - 28 * 28
    assert count_params(models.build(name, CIFAR)) == PARAM_COUNTS[name] + extra * 256


@pytest.mark.parametrize("string, arch, aug", REFERENCE_STRINGS)
def test_reference_strings_parse(string: str, arch: str, aug: str | None) -> None:
    assert models.parse_model_name(string) == models.ModelSpec(arch=arch, augmentation=aug, loss="ce")


@pytest.mark.parametrize("name", models.names())
def test_aliases_resolve_to_the_same_arch(name: str) -> None:
    for alias in [name, *models.MODELS.aliases(name)]:
        assert models.parse_model_name(alias).arch == name
        assert models.parse_model_name(f"aug01-ce-tor-{alias}-hyper").arch == name


BUILD_CASES = [("ce-tor-LargeMLP", "large_mlp"), ("aug01-ce-tor-altResNet20Norm02", "resnet20")]


@pytest.mark.parametrize("string, arch", BUILD_CASES)
def test_reference_strings_build_the_same_arch(string: str, arch: str) -> None:
    model = models.build(string, example_shape(arch))
    assert type(model) is type(built(arch))
    assert count_params(model) == PARAM_COUNTS[arch]


@pytest.mark.parametrize("string, bad", [("resnet99", "resnet99"), ("ce-tor-NoSuchNet", "NoSuchNet")])
def test_unknown_model_raises_naming_it(string: str, bad: str) -> None:
    with pytest.raises(SpuriousError, match=bad) as info:
        models.build(string, CIFAR)
    assert "resnet20" in str(info.value)


@pytest.mark.parametrize("string, bad", [("mse-tor-LargeMLP", "mse"), ("aug01-kld-tor-altResNet20", "kld")])
def test_unknown_loss_raises_naming_it(string: str, bad: str) -> None:
    with pytest.raises(SpuriousError, match=f"'{bad}'.*allowed: ce"):
        models.parse_model_name(string)


def test_cnn002_rejects_cifar_size() -> None:
    with pytest.raises(SpuriousError, match="28x28"):
        models.build("cnn002", CIFAR)


def test_cnn002_output_layer_starts_at_zero() -> None:
    assert torch.equal(built("cnn002")(torch.rand(2, *MNIST)), torch.zeros(2, 10))


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_normalised_models_need_rgb(name: str) -> None:
    with pytest.raises(SpuriousError, match="3-channel"):
        models.build(name, MNIST)


@pytest.mark.parametrize("shape", [(0, 28, 28), (28, 28), (1, 28.5, 28)])
def test_bad_input_shape_raises(shape: tuple) -> None:
    with pytest.raises(SpuriousError, match="input_shape"):
        models.build("mlp", shape)


def test_bn_and_normalisation_buffers_are_not_parameters() -> None:
    model = built("resnet20")
    buffers = dict(model.named_buffers())
    assert "normalize.mean" in buffers and "stem.1.running_var" in buffers
    assert not any("normalize" in n or "running" in n for n, _ in model.named_parameters())
    assert sum(b.numel() for b in buffers.values()) > 0


def test_cifar_normalize_maps_mean_to_zero() -> None:
    mean = torch.tensor(models.CIFAR_MEAN).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert torch.allclose(models.CifarNormalize()(mean), torch.zeros(1, 3, 4, 4), atol=1e-6)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    block = models.BasicBlock(16, 32, stride=2)
    x = torch.rand(1, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_first_layer_weight_map(shape: tuple[int, int, int]) -> None:
    model = models.build("large_mlp", shape)
    expected = model.first_layer.weight.max(dim=0).values.reshape(shape).amax(dim=0)
    weight_map = models.first_layer_weight_map(model, shape)
    assert weight_map.shape == shape[1:]
    assert torch.equal(weight_map, expected)
    assert torch.equal(models.first_layer_weight_map(model), weight_map)


def test_weight_map_rejects_non_mlp_and_wrong_shape() -> None:
    with pytest.raises(SpuriousError, match="MLP"):
        models.first_layer_weight_map(built("cnn002"), MNIST)
    with pytest.raises(SpuriousError, match="does not match"):
        models.first_layer_weight_map(built("mlp"), CIFAR)
