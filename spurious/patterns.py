"""Spurious patterns planted into images (protocol §2).

Every pattern maps a batch `x` of shape (N, C, H, W) in [0, 1] to a new batch; the input is never
modified. Random patterns draw one noise image per data seed exactly as the reference does,
`RandomState(seed).rand(H, W, C)` (NHWC draw order), moved to CHW, added and clipped to [0, 1].

Names: descriptive registered names (`corner_square_5`), the paper's names (`s3`) and the reference
codes (`v8`) as aliases, and keyword specs built on the fly: `square(size=7)`, `noise(scale=0.3)`,
`bar(top=3, bottom=25, left=13, right=16)`. Users add their own with `register(name, pattern)` or
`register_image(name, "logo.png")`.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import torch

from spurious.errors import SpuriousError
from spurious.registry import Registry


class Pattern(Protocol):
    """Anything with `apply(x, seed) -> Tensor`."""

    def apply(self, x: torch.Tensor, seed: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class Patch:
    """Set the rectangle rows [top, bottom) × columns [left, right) to `value` on all channels."""

    top: int
    bottom: int
    left: int
    right: int
    value: float = 1.0

    def apply(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        _check_batch(x)
        if self.bottom > x.shape[2] or self.right > x.shape[3]:
            raise SpuriousError(f"pattern {self} does not fit images of size {tuple(x.shape[2:])}")
        out = x.clone()
        out[:, :, self.top:self.bottom, self.left:self.right] = self.value
        return out


@dataclass(frozen=True)
class UniformNoise:
    """Add `scale`·U[0,1) noise, one fixed draw per data seed (reference order), then clip to [0, 1]."""

    scale: float

    def apply(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        _check_batch(x)
        noise = noise_image(seed, tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
        return (x + self.scale * noise).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class ImagePattern:
    """A user image (C, H, W) in [0, 1]: `add` adds and clips; `replace` overwrites where `mask` is set."""

    image: torch.Tensor
    mask: torch.Tensor
    mode: str = "replace"

    def apply(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        _check_batch(x)
        if tuple(self.image.shape[1:]) != tuple(x.shape[2:]):
            raise SpuriousError(
                f"pattern image is {tuple(self.image.shape[1:])} but images are {tuple(x.shape[2:])}")
        image = self.image.to(x.device, x.dtype).expand(x.shape[1], -1, -1)
        if self.mode == "add":
            return (x + image).clamp_(0.0, 1.0)
        return torch.where(self.mask.to(x.device), image, x)


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise SpuriousError(f"patterns take a batch of shape (N, C, H, W), got shape {tuple(x.shape)}")


@lru_cache(maxsize=64)
def _noise_numpy(seed: int, shape_chw: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape_chw
    return np.random.RandomState(seed).rand(h, w, c).astype(np.float32).transpose(2, 0, 1).copy()


def noise_image(seed: int, shape_chw: tuple[int, int, int]) -> torch.Tensor:
    """Return the reference's noise image for `seed` as a (C, H, W) float32 tensor (protocol §2.2)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpuriousError(f"pattern seed must be a non-negative integer, got {seed!r}")
    return torch.from_numpy(_noise_numpy(int(seed), tuple(int(s) for s in shape_chw)))


def square(size: int = 5, value: float = 1.0) -> Patch:
    """Return a white top-left `size`×`size` square (S1/S2/S3 are sizes 1/3/5)."""
    if not isinstance(size, int) or size < 1:
        raise SpuriousError(f"square size must be a positive integer, got {size!r}")
    return Patch(0, size, 0, size, value)


def noise(scale: float = 1.0) -> UniformNoise:
    """Return fixed uniform noise of amplitude `scale` (R1/R2/R3 are 0.25/0.5/1.0)."""
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise SpuriousError(f"noise scale must be a positive number, got {scale!r}")
    return UniformNoise(float(scale))


def bar(top: int = 3, bottom: int = 25, left: int = 13, right: int = 16, value: float = 1.0) -> Patch:
    """Return a white rectangle; the defaults are the paper's centre bar ("core", rows 3–24, cols 13–15)."""
    if not (0 <= top < bottom and 0 <= left < right):
        raise SpuriousError(f"bar needs 0 <= top < bottom and 0 <= left < right, got {top, bottom, left, right}")
    return Patch(top, bottom, left, right, value)


PATTERNS: Registry[Pattern] = Registry("pattern")
FACTORIES = {"square": square, "noise": noise, "bar": bar}

PATTERNS.register("corner_square_1", square(1), aliases=("s1", "v1"))
PATTERNS.register("corner_square_3", square(3), aliases=("s2", "v3"))
PATTERNS.register("corner_square_5", square(5), aliases=("s3", "v8"))
PATTERNS.register("uniform_noise_0.25", noise(0.25), aliases=("r1", "v18"))
PATTERNS.register("uniform_noise_0.5", noise(0.5), aliases=("r2", "v19"))
PATTERNS.register("uniform_noise_1.0", noise(1.0), aliases=("r3", "v20"))
PATTERNS.register("center_bar", bar(), aliases=("core", "v30"))

PAPER_NAMES = {"s1": "S1", "s2": "S2", "s3": "S3", "r1": "R1", "r2": "R2", "r3": "R3", "core": "Co"}
_SPEC = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$")


def names() -> list[str]:
    """Return the registered pattern names in display order."""
    return PATTERNS.names()


def short_name(name: str) -> str:
    """Return the paper's label (S1…Co) for a pattern, or the name itself for other patterns."""
    if name in PATTERNS:
        for alias in PATTERNS.aliases(PATTERNS.canonical(name)):
            if alias in PAPER_NAMES:
                return PAPER_NAMES[alias]
    return name


def _parse_spec(spec: str) -> Pattern:
    match = _SPEC.match(spec)
    if not match or match.group(1) not in FACTORIES:
        raise SpuriousError(
            f"unknown pattern {spec!r}; choose one of: {', '.join(PATTERNS.choices())}, "
            f"or a spec like square(size=7), noise(scale=0.3), bar(top=3, bottom=25, left=13, right=16)")
    try:
        call = ast.parse(f"f({match.group(2)})", mode="eval").body
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        if call.args:
            raise ValueError("positional arguments")
        return FACTORIES[match.group(1)](**kwargs)
    except (SyntaxError, ValueError, TypeError) as err:
        raise SpuriousError(f"bad pattern spec {spec!r}: use keyword arguments only ({err})") from None


def get(name: str) -> Pattern:
    """Return the pattern for a registered name, alias or keyword spec such as `square(size=7)`."""
    if not isinstance(name, str):
        raise SpuriousError(f"pattern must be a name, got {name!r}")
    if name in PATTERNS:
        return PATTERNS.get(name)
    return _parse_spec(name)


def canonical(name: str) -> str:
    """Return the registered name for `name`, or the spec itself (validated) if it is a keyword spec."""
    if name in PATTERNS:
        return PATTERNS.canonical(name)
    get(name)
    return name


def apply(name: str, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Return a patterned copy of the batch `x` (N, C, H, W), the noise drawn from data seed `seed`."""
    return get(name).apply(x, seed)


def apply_at(name: str, x: torch.Tensor, indices: Iterable[int] | torch.Tensor, seed: int) -> torch.Tensor:
    """Return a copy of `x` with the pattern applied to the rows `indices` only (the planted examples)."""
    out = x.clone()
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.numel():
        out[idx] = apply(name, x[idx], seed)
    return out


def l2_change(name: str, x: torch.Tensor, seed: int = 0) -> float:
    """Return the mean per-image ℓ2 norm of the change the pattern makes to `x` (protocol §2.4)."""
    delta = apply(name, x, seed) - x
    return float(delta.flatten(1).norm(dim=1).mean())


def register(name: str, pattern: Pattern, aliases: Iterable[str] = ()) -> Pattern:
    """Register a user pattern (any object with `apply(x, seed)`) under `name`."""
    if not callable(getattr(pattern, "apply", None)):
        raise SpuriousError(f"pattern {name!r} must have an apply(x, seed) method")
    return PATTERNS.register(name, pattern, aliases=tuple(aliases))


def register_image(name: str, path: str | Path, mode: str = "replace", threshold: float = 0.0) -> Pattern:
    """Register a pattern from an image file (PNG or any format Pillow reads): `replace` pixels brighter than
    `threshold`, or `add` it. Grey, RGB and RGBA images keep their channels (alpha = mask); other modes are
    read as RGBA; 8-bit values are divided by 255, 16-bit ones by 65535."""
    from PIL import Image

    if mode not in ("replace", "add"):
        raise SpuriousError(f"image pattern mode must be 'replace' or 'add', got {mode!r}")
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):
                arr = np.asarray(img, dtype=np.float32) / 65535.0
            else:
                img = img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGBA")
                arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise SpuriousError(f"cannot read pattern image {str(path)!r}: {err}") from None
    return register(name, image_pattern(arr, mode, threshold))


def image_pattern(arr: np.ndarray, mode: str = "replace", threshold: float = 0.0) -> ImagePattern:
    """Build an image pattern from an (H, W), (H, W, 3) or (H, W, 4) array in [0, 1] (alpha = mask)."""
    arr = arr[..., None] if arr.ndim == 2 else arr
    alpha = arr[..., 3] > 0 if arr.shape[-1] == 4 else arr[..., :3].max(axis=-1) > threshold
    rgb = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
    image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    if image.shape[0] == 3 and torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]):
        image = image[:1]
    return ImagePattern(image.clamp(0, 1), torch.from_numpy(alpha)[None], mode)
