"""Network architectures of the paper (protocol §5) behind one registry, plus the model-name parser.

    python -c "from spurious import models; print(models.names())"
    python -c "from spurious import models; print(models.build('ce-tor-LargeMLP', (1, 28, 28)))"

Every model takes NCHW float tensors in [0, 1]. MLPs flatten inside; ResNets and VGG16 apply the CIFAR
mean/std normalisation inside `forward` (the reference `Norm02` variants), so data never needs reshaping
or normalising outside the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spurious import reference_names
from spurious.errors import SpuriousError
from spurious.registry import Registry

Shape = tuple[int, int, int]
ModelFactory = Callable[[Shape, int], nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
LOSSES = ("ce",)

@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: canonical architecture, training augmentation and loss token."""

    arch: str
    augmentation: str | None = None
    loss: str = "ce"


def parse_model_name(name: str) -> ModelSpec:
    """Return the spec of a model name, alias or reference string like `aug01-ce-tor-altResNet20Norm02`."""
    parts = reference_names.parse_model_string(name)
    if parts is None:
        return ModelSpec(arch=MODELS.canonical(name))
    if parts.loss not in LOSSES:
        allowed = ", ".join(LOSSES)
        raise SpuriousError(f"unsupported loss {parts.loss!r} in model name {name!r}; allowed: {allowed}")
    try:
        arch = MODELS.canonical(parts.arch)
    except SpuriousError as err:
        raise SpuriousError(f"in model name {name!r}: {err}") from None
    return ModelSpec(arch=arch, augmentation=parts.augmentation, loss=parts.loss)


def build(name: str, input_shape: Shape, num_classes: int = 10) -> nn.Module:
    """Return a freshly initialised model `name` (name, alias or reference string) for (C, H, W) input."""
    _check_shape(input_shape, num_classes)
    return MODELS.get(parse_model_name(name).arch)(tuple(input_shape), num_classes)


def names() -> list[str]:
    """Return the canonical model names in registration order."""
    return MODELS.names()


def first_layer_weight_map(model: nn.Module, image_shape: Shape | None = None) -> torch.Tensor:
    """Return the (H, W) max of first-layer MLP weights over hidden units and channels (protocol §4.5)."""
    if not isinstance(model, MLP):
        raise SpuriousError(f"first_layer_weight_map needs an MLP, got {type(model).__name__}")
    shape = tuple(image_shape or model.input_shape)
    weight = model.first_layer.weight.detach()
    if len(shape) != 3 or weight.shape[1] != shape[0] * shape[1] * shape[2]:
        raise SpuriousError(f"image shape {shape} does not match the MLP's {weight.shape[1]} inputs")
    return weight.max(dim=0).values.reshape(shape).amax(dim=0)


def _check_shape(input_shape: Shape, num_classes: int) -> None:
    """Raise SpuriousError unless input_shape is three positive ints (C, H, W) and num_classes is positive."""
    if len(input_shape) != 3 or any(int(d) != d or d < 1 for d in input_shape):
        raise SpuriousError(f"input_shape must be (C, H, W) positive ints, got {tuple(input_shape)}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise SpuriousError(f"num_classes must be a positive int, got {num_classes!r}")


def _require_rgb(arch: str, input_shape: Shape) -> None:
    """Raise SpuriousError unless the input has 3 channels, which the built-in CIFAR normalisation needs."""
    if input_shape[0] != 3:
        raise SpuriousError(f"{arch} uses CIFAR normalisation and needs 3-channel input, got {input_shape}")


class CifarNormalize(nn.Module):
    """Subtracts the CIFAR-10 mean and divides by the std per channel; the constants are buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# ------------------------------------------------------------ MLPs (protocol §5.1: MLP, MLPv2, LargeMLP, LargeMLPv2)


class MLP(nn.Module):
    """Flatten → `depth` × (Linear(width) → ReLU) → Linear(num_classes), PyTorch default init."""

    def __init__(self, input_shape: Shape, num_classes: int = 10, width: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        sizes = [input_shape[0] * input_shape[1] * input_shape[2]] + [width] * depth
        hidden = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        self.layers = nn.Sequential(nn.Flatten(), *hidden, nn.Linear(sizes[-1], num_classes))

    @property
    def first_layer(self) -> nn.Linear:
        """Return the Linear layer that reads the pixels."""
        return self.layers[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@MODELS.register("mlp", aliases=("MLP",))
def mlp(input_shape: Shape, num_classes: int = 10) -> MLP:
    """Return the reference `MLP` ("small MLP"): one hidden layer of 256."""
    return MLP(input_shape, num_classes, width=256, depth=1)


@MODELS.register("mlp_v2", aliases=("MLPv2",))
def mlp_v2(input_shape: Shape, num_classes: int = 10) -> MLP:
    """Return the reference `MLPv2`: two hidden layers of 256."""
    return MLP(input_shape, num_classes, width=256, depth=2)


@MODELS.register("large_mlp", aliases=("LargeMLP",))
def large_mlp(input_shape: Shape, num_classes: int = 10) -> MLP:
    """Return the reference `LargeMLP` (the paper's main "MLP"): three hidden layers of 256."""
    return MLP(input_shape, num_classes, width=256, depth=3)


@MODELS.register("large_mlp_v2", aliases=("LargeMLPv2",))
def large_mlp_v2(input_shape: Shape, num_classes: int = 10) -> MLP:
    """Return the reference `LargeMLPv2` ("large MLP"): three hidden layers of 512."""
    return MLP(input_shape, num_classes, width=512, depth=3)


# ------------------------------------------------------------ CNN002 (TRADES small CNN)


class SmallCNN(nn.Module):
    """TRADES small CNN without padding (reference `CNN002`); only 28×28 input gives the 1024-d flatten."""

    def __init__(self, input_shape: Shape, num_classes: int = 10) -> None:
        super().__init__()
        if tuple(input_shape[1:]) != (28, 28):
            raise SpuriousError(f"cnn002 has no padding and only fits 28x28 input, got {tuple(input_shape)}")
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convs with zero bias; the output layer starts at exactly zero (as in TRADES)."""
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier[-1].weight)
        nn.init.zeros_(self.classifier[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS.register("cnn002", SmallCNN, aliases=("CNN002",))


# ------------------------------------------------------------ CIFAR ResNets (He et al., option-A shortcuts)


class BasicBlock(nn.Module):
    """conv3×3–BN–ReLU–conv3×3–BN plus a parameter-free option-A shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Return x subsampled by the stride and zero-padded to the block's channel count."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): stem 16 channels, three stages of n blocks at 16/32/64, global pool, linear."""

    def __init__(self, input_shape: Shape, num_classes: int = 10, blocks: int = 3) -> None:
        super().__init__()
        _require_rgb(f"resnet{6 * blocks + 2}", input_shape)
        self.normalize = CifarNormalize()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(
            *self._stage(16, 16, blocks, 1), *self._stage(16, 32, blocks, 2), *self._stage(32, 64, blocks, 2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> list[BasicBlock]:
        """Return `blocks` blocks; only the first changes stride and width."""
        first = BasicBlock(in_planes, planes, stride)
        return [first] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(self.normalize(x))))


@MODELS.register("resnet20", aliases=("altResNet20", "altResNet20Norm02", "ResNet20"))
def resnet20(input_shape: Shape, num_classes: int = 10) -> CifarResNet:
    """Return ResNet20 (n = 3 blocks per stage)."""
    return CifarResNet(input_shape, num_classes, blocks=3)


@MODELS.register("resnet32", aliases=("altResNet32", "altResNet32Norm02", "ResNet32"))
def resnet32(input_shape: Shape, num_classes: int = 10) -> CifarResNet:
    """Return ResNet32 (n = 5 blocks per stage)."""
    return CifarResNet(input_shape, num_classes, blocks=5)


@MODELS.register("resnet110", aliases=("altResNet110", "altResNet110Norm02", "ResNet110"))
def resnet110(input_shape: Shape, num_classes: int = 10) -> CifarResNet:
    """Return ResNet110 (n = 18 blocks per stage)."""
    return CifarResNet(input_shape, num_classes, blocks=18)


# ------------------------------------------------------------ VGG16 (torchvision config D, no BN)

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG16 without BN, 7×7 adaptive pool, 25088→4096→4096 classifier; CIFAR normalisation inside."""

    def __init__(self, input_shape: Shape, num_classes: int = 10) -> None:
        super().__init__()
        _require_rgb("vgg16", input_shape)
        self.normalize = CifarNormalize()
        self.features = nn.Sequential(*self._features(3))
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, num_classes),
        )
        self._init_weights()

    @staticmethod
    def _features(channels: int) -> list[nn.Module]:
        """Return the conv3×3/ReLU and max-pool layers of config D."""
        layers: list[nn.Module] = []
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        return layers

    def _init_weights(self) -> None:
        """Kaiming fan-out convs, N(0, 0.01) linears, zero biases (torchvision's VGG scheme)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(self.normalize(x))))


MODELS.register("vgg16", VGG16, aliases=("Vgg16Norm02", "VGG16", "Vgg16"))
