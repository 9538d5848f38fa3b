"""Datasets (protocol §1): finding, checking and decoding MNIST, Fashion-MNIST and CIFAR-10 files. Choosing the
spurious examples and the membership split live with planting (spurious/planted.py), the reference's dataset
names with the other reference names (spurious/reference_names.py).

    from spurious import datasets
    data = datasets.load("fashion")          # or load("mnist", root="/data"), SPURIOUS_DATA=/data

Where `load` looks, in order: the `root` argument (the CLI's --data-dir), $SPURIOUS_DATA, the system
folder (/usr/share/datasets/...), the cache ($SPURIOUS_CACHE or ~/.cache/rare-spurious-study, then
/<name>), and finally a torchvision download into that cache. Each place may hold the files directly or
in a dataset subfolder (e.g. `MNIST/raw`, `fashion-mnist`, `cifar-10-batches-py`).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from spurious.errors import SpuriousError
from spurious.registry import Registry

SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
DEFAULT_CACHE = Path("~/.cache/rare-spurious-study")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test images (float32 NCHW in [0, 1]) with int64 labels.

    A loaded Dataset is cached and shared between `load` calls: clone a tensor before changing it in place.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Return the number of classes."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Return (C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DatasetSpec:
    """How to find, check and decode one dataset's files."""

    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    sizes: tuple[int, int]
    md5: dict[str, tuple[str | None, str | None]]  # file name -> (upstream .gz md5, decompressed md5)
    decode: Callable[[dict[str, bytes]], Arrays]
    subdirs: tuple[str, ...]
    system_dirs: tuple[str, ...]
    torchvision_class: str
    install_hint: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        """Return the file names the dataset needs."""
        return tuple(self.md5)


class _Rejected(Exception):
    """A place holds unusable data; the message says why (internal: becomes part of a SpuriousError)."""


# ---------------------------------------------------------------- file formats

def _md5(data: bytes) -> str:
    """Return the hex md5 of `data`."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _checksum_ok(raw: bytes, payload: bytes, md5s: tuple[str | None, str | None]) -> bool:
    """Return whether a file matches its upstream compressed md5 or its decompressed-payload md5."""
    gz_md5, payload_md5 = md5s
    compressed = raw is not payload
    if compressed and gz_md5 is not None and _md5(raw) == gz_md5:
        return True
    if payload_md5 is not None:
        return _md5(payload) == payload_md5
    # No payload md5 is known (raw MNIST files): an uncompressed file rests on the header and count checks,
    # while a compressed one had its chance to match the upstream .gz above.
    return not compressed


def _read(path: Path, md5s: tuple[str | None, str | None], verify: bool) -> bytes:
    """Return the (decompressed) contents of `path`, checking its md5 when `verify`."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _Rejected(f"cannot read {path.name} ({err.strerror or err})") from None
    try:
        payload = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as err:
        raise _Rejected(f"cannot decompress {path.name} ({err})") from None
    if verify and not _checksum_ok(raw, payload, md5s):
        raise _Rejected(f"checksum mismatch for {path.name}")
    return payload


def parse_idx(payload: bytes, magic: int, name: str = "IDX file") -> np.ndarray:
    """Return the uint8 array stored in an IDX payload (magic 2049 labels, 2051 images; big-endian dims)."""
    ndim = magic & 0xFF
    offset = 4 + 4 * ndim
    if len(payload) < offset or int.from_bytes(payload[:4], "big") != magic:
        raise _Rejected(f"{name} is not an IDX file with magic number {magic}")
    dims = tuple(int(d) for d in np.frombuffer(payload, ">u4", count=ndim, offset=4))
    if len(payload) != offset + int(np.prod(dims)):
        raise _Rejected(f"{name} has {len(payload) - offset} data bytes but its header says {dims}")
    return np.frombuffer(payload, np.uint8, offset=offset).reshape(dims)


def _decode_idx(blobs: dict[str, bytes]) -> Arrays:
    """Return (x_train, y_train, x_test, y_test) as uint8 NCHW images and uint8 labels from IDX payloads."""
    out = []
    for split in ("train", "t10k"):
        images = f"{split}-images-idx3-ubyte"
        labels = f"{split}-labels-idx1-ubyte"
        out += [parse_idx(blobs[images], 2051, images)[:, None], parse_idx(blobs[labels], 2049, labels)]
    return tuple(out)


def parse_cifar_batch(payload: bytes, name: str = "CIFAR batch") -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 images (N,3,32,32), int64 labels) from one pickled CIFAR-10 python batch."""
    try:
        # pickle runs code from the file: with verify=True only files with the known md5 get here.
        batch = pickle.loads(payload, encoding="bytes")
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # any unpickling failure means "not a CIFAR batch"
        raise _Rejected(f"{name} is not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise _Rejected(f"{name} holds data {data.dtype}{data.shape} and {len(labels)} labels, "
                        "expected uint8 (N, 3072) and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def _decode_cifar(blobs: dict[str, bytes]) -> Arrays:
    """Return (x_train, y_train, x_test, y_test) from the five training batches and the test batch."""
    train = [parse_cifar_batch(blobs[f"data_batch_{i}"], f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = parse_cifar_batch(blobs["test_batch"], "test_batch")
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test


# ---------------------------------------------------------------- the registry

DATASETS: Registry[DatasetSpec] = Registry("dataset")

# Upstream .gz md5s are torchvision's (datasets/mnist.py `resources`); the Fashion-MNIST payload md5s were
# computed from the decompressed Debian files (dataset-fashion-mnist, whose .gz files are recompressed).
# The decompressed MNIST md5s are not known here, so raw MNIST files are checked by header and counts only.
DATASETS.register("mnist", DatasetSpec(
    class_names=tuple(str(d) for d in range(10)),
    image_shape=(1, 28, 28),
    sizes=(60000, 10000),
    md5={
        "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", None),
        "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", None),
        "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", None),
        "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", None),
    },
    decode=_decode_idx,
    subdirs=("mnist", "MNIST/raw", "MNIST"),
    system_dirs=("mnist",),
    torchvision_class="MNIST",
))

DATASETS.register("fashion", DatasetSpec(
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    image_shape=(1, 28, 28),
    sizes=(60000, 10000),
    md5={
        "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    },
    decode=_decode_idx,
    subdirs=("fashion-mnist", "fashion_mnist", "fashion", "FashionMNIST/raw", "FashionMNIST"),
    system_dirs=("fashion-mnist",),
    torchvision_class="FashionMNIST",
    install_hint="apt-get install dataset-fashion-mnist",
), aliases=("fashion_mnist",))

# The batch md5s are torchvision's (datasets/cifar.py `train_list`/`test_list`), of the extracted files.
DATASETS.register("cifar10", DatasetSpec(
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    image_shape=(3, 32, 32),
    sizes=(50000, 10000),
    md5={
        "data_batch_1": (None, "c99cafc152244af753f735de768cd75f"),
        "data_batch_2": (None, "d4bba439e000b95fd0a9bffe97cbabec"),
        "data_batch_3": (None, "54ebc095f3ab1f0389bbae665268c751"),
        "data_batch_4": (None, "634d18415352ddfa80567beed471001a"),
        "data_batch_5": (None, "482c414d41f54cd18b22e5b47cb7c3cb"),
        "test_batch": (None, "40351d587109b95175f43aff81a1287e"),
    },
    decode=_decode_cifar,
    subdirs=("cifar-10-batches-py", "cifar10", "cifar10/cifar-10-batches-py", "cifar-10"),
    system_dirs=(),  # no distribution packages CIFAR-10
    torchvision_class="CIFAR10",
))


def names() -> list[str]:
    """Return the registered dataset names in display order."""
    return DATASETS.names()


# ---------------------------------------------------------------- decoding one folder

def _check(spec: DatasetSpec, arrays: Arrays, verify: bool) -> None:
    """Raise _Rejected unless the arrays have the expected image shape, labels and (when `verify`) counts."""
    x_train, y_train, x_test, y_test = arrays
    splits = (("train", x_train, y_train, spec.sizes[0]), ("test", x_test, y_test, spec.sizes[1]))
    for split, x, y, size in splits:
        if tuple(x.shape[1:]) != spec.image_shape or len(x) != len(y):
            raise _Rejected(f"{split} images have shape {tuple(x.shape)} with {len(y)} labels, "
                            f"expected (N, {', '.join(map(str, spec.image_shape))}) with N labels")
        if len(y) and (y.min() < 0 or y.max() >= len(spec.class_names)):
            raise _Rejected(f"{split} labels outside 0..{len(spec.class_names) - 1}")
        if verify and len(x) != size:
            raise _Rejected(f"expected {size} {split} images, found {len(x)}")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """Return uint8 images as float32 in [0, 1], divided by 255 as the reference does (protocol §1.2)."""
    x = images.astype(np.float32)
    x /= np.float32(255)
    return torch.from_numpy(x)


def _file_in(directory: Path, name: str) -> Path | None:
    """Return `directory/name.gz` or `directory/name`, whichever exists first, else None."""
    for path in (directory / f"{name}.gz", directory / name):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=4)
def _decode_dir(name: str, directory: str, verify: bool) -> Dataset:
    """Return dataset `name` decoded from `directory` (a resolved path); cached per process."""
    spec = DATASETS.get(name)
    blobs = {f: _read(_file_in(Path(directory), f), spec.md5[f], verify) for f in spec.files}
    arrays = spec.decode(blobs)
    _check(spec, arrays, verify)
    x_train, y_train, x_test, y_test = arrays
    return Dataset(name, _to_tensor(x_train), torch.from_numpy(y_train.astype(np.int64)),
                   _to_tensor(x_test), torch.from_numpy(y_test.astype(np.int64)), spec.class_names)


# ---------------------------------------------------------------- searching

def cache_root() -> Path:
    """Return the cache folder: $SPURIOUS_CACHE, or ~/.cache/rare-spurious-study."""
    return Path(os.environ.get("SPURIOUS_CACHE") or DEFAULT_CACHE).expanduser()


def cache_dir(name: str) -> Path:
    """Return the cache folder for dataset `name`: cache_root()/name."""
    return cache_root() / DATASETS.canonical(name)


def _places(name: str, root: str | os.PathLike | None) -> list[tuple[str, Path | None]]:
    """Return (label, base folder or None when unset) for each place to look, in search order."""
    spec = DATASETS.get(name)
    env = os.environ.get("SPURIOUS_DATA")
    places = [("--data-dir", Path(root).expanduser() if root else None),
              ("SPURIOUS_DATA", Path(env).expanduser() if env else None)]
    places += [("system folder", SYSTEM_DATA_ROOT / d) for d in spec.system_dirs]
    return places + [("cache", cache_dir(name))]


def _missing(spec: DatasetSpec, directory: Path) -> list[str]:
    """Return the dataset files absent from `directory`."""
    return [f for f in spec.files if _file_in(directory, f) is None]


def _try_place(name: str, base: Path, verify: bool) -> Dataset:
    """Return the dataset from `base` or one of its dataset subfolders; raise _Rejected saying why not."""
    return _decode_dir(name, str(_locate(name, base, verify)), verify)  # decoded once: _locate's call is cached


def _locate(name: str, base: Path, verify: bool) -> Path:
    """Return the folder (`base` or one of its dataset subfolders, resolved) whose files decode as dataset
    `name`; raise _Rejected saying why none does."""
    spec = DATASETS.get(name)
    failures, partial = [], []
    for directory in (base, *(base / sub for sub in spec.subdirs)):
        missing = _missing(spec, directory)
        if not missing:
            try:
                _decode_dir(name, str(directory.resolve()), verify)
                return directory.resolve()
            except _Rejected as err:
                failures.append(f"{directory}: {err}")
        elif len(missing) < len(spec.files):
            partial.append(f"{directory} lacks {', '.join(missing)}")
    if failures or partial:
        raise _Rejected("; ".join(failures + partial))
    if not base.is_dir():
        raise _Rejected("missing folder")
    raise _Rejected(f"missing files (looked in it and its subfolders {', '.join(spec.subdirs)})")


def _download(name: str, dest: Path) -> None:
    """Download dataset `name` into `dest` with torchvision (network access needed)."""
    import torchvision.datasets  # imported here: slow, and only needed when nothing local was found

    spec = DATASETS.get(name)
    getattr(torchvision.datasets, spec.torchvision_class)(root=str(dest), train=True, download=True)


def _one_line(err: BaseException) -> str:
    """Return an exception as a short single line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def _download_and_load(name: str, verify: bool) -> Dataset:
    """Download into the cache and load from there; raise _Rejected saying why that failed."""
    dest = cache_dir(name)
    try:
        _download(name, dest)
    except Exception as err:  # network, permission and torchvision errors all mean "download failed"
        raise _Rejected(f"download failed ({_one_line(err)})") from None
    return _try_place(name, dest, verify)


def _not_found_message(name: str, tried: list[str]) -> str:
    """Return the one-line error listing every place tried and how to supply the data."""
    spec = DATASETS.get(name)
    files = ", ".join(f"{f}[.gz]" if spec.decode is _decode_idx else f for f in spec.files)
    how = "pass --data-dir DIR or set SPURIOUS_DATA=DIR to a folder holding " + files
    if spec.install_hint:
        how += f", or run `{spec.install_hint}`"
    return f"cannot load dataset {name!r}; tried: {'; '.join(tried)}. To supply it, {how}."


def load(name: str, root: str | os.PathLike | None = None, verify: bool = True, download: bool = True) -> Dataset:
    """Return dataset `name`, found in the first usable place (see the module docstring); protocol §1.1.

    `download=False` skips the last place (a torchvision download), e.g. for checks that must not fetch.
    """
    name = DATASETS.canonical(name)
    directory, tried = _search(name, root, verify)
    if directory is not None:
        return _decode_dir(name, str(directory), verify)
    if not download:
        tried.append("torchvision download (skipped)")
        raise SpuriousError(_not_found_message(name, tried))
    try:
        return _download_and_load(name, verify)
    except _Rejected as err:
        tried.append(f"torchvision download into {cache_dir(name)}: {err}")
    raise SpuriousError(_not_found_message(name, tried))


def _search(name: str, root: str | os.PathLike | None, verify: bool) -> tuple[Path | None, list[str]]:
    """Return the first local folder holding usable files of dataset `name` (None when none does) and what
    was tried before it, in `load`'s search order (no download)."""
    tried = []
    for label, base in _places(name, root):
        if base is None:
            tried.append(f"{label} (not set)")
            continue
        try:
            return _locate(name, base, verify), tried
        except _Rejected as err:
            tried.append(f"{label} {base}: {err}")
    return None, tried


def source_files(name: str, root: str | os.PathLike | None = None, verify: bool = True) -> list[Path]:
    """Return the files `load(name, root, verify)` reads, in the dataset's file order (a folder a load has
    read is not decoded again); SpuriousError when no local place holds them (this never downloads)."""
    name = DATASETS.canonical(name)
    directory, tried = _search(name, root, verify)
    if directory is None:
        raise SpuriousError(_not_found_message(name, tried))
    return [_file_in(directory, f) for f in DATASETS.get(name).files]


# ---------------------------------------------------------------- spurious examples (protocol §3.1)
