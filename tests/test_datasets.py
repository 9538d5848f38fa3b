"""Tests for spurious.datasets: file formats, search order, checksums, example choice, names, splits."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from spurious import datasets, planted, reference_names
from spurious.errors import SpuriousError

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- helpers and fixtures

def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """Write a uint8 array as an IDX file (gzipped when `gz`)."""
    magic = 2048 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def tiny_idx(directory: Path, gz: bool, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    """Write tiny MNIST-format files into `directory`; return the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, gz)
    return arrays


def tiny_cifar(directory: Path, per_batch: int = 3, n_test: int = 4) -> dict[str, tuple[np.ndarray, list]]:
    """Write tiny CIFAR-10 python batches into `directory`; return {file: (data, labels)}."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        data = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
        labels = [(i + j) % 10 for j in range(n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (data, labels)
    return written


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Point the cache at a temporary folder, unset SPURIOUS_DATA and make downloads fail at once."""
    monkeypatch.delenv("SPURIOUS_DATA", raising=False)
    monkeypatch.setenv("SPURIOUS_CACHE", str(tmp_path / "cache"))

    def no_download(name, dest):
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(datasets, "_download", no_download)
    datasets._decode_dir.cache_clear()
    yield tmp_path
    datasets._decode_dir.cache_clear()


@pytest.fixture
def isolated(offline, monkeypatch):
    """Like `offline`, and hide the real system dataset folders too."""
    monkeypatch.setattr(datasets, "SYSTEM_DATA_ROOT", offline / "system")
    return offline


# ---------------------------------------------------------------- reading the formats

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion"])
def test_idx_files_read_back(isolated, name, gz):
    arrays = tiny_idx(isolated / "data", gz)
    data = datasets.load(name, root=isolated / "data", verify=False)
    assert data.name == name
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)[:, None]
    assert torch.equal(data.x_train, expected)
    assert data.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_cifar_batches_read_back(isolated):
    written = tiny_cifar(isolated / "data" / "cifar-10-batches-py")
    data = datasets.load("cifar10", root=isolated / "data", verify=False)
    assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.input_shape == (3, 32, 32) and data.class_names[0] == "airplane"
    first, labels = written["data_batch_1"]
    # CIFAR rows hold the red plane, then green, then blue, each 32x32 row-major.
    assert data.x_train[0, 1, 2, 3].item() == pytest.approx(first[0, 1024 + 2 * 32 + 3] / 255)
    test_images = written["test_batch"][0].reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255)
    assert torch.equal(data.x_test, torch.from_numpy(test_images))
    assert data.y_train[:3].tolist() == labels and data.y_train.dtype == torch.int64


def test_cifar_batches_directly_in_root(isolated):
    tiny_cifar(isolated / "flat")
    assert len(datasets.load("cifar10", root=isolated / "flat", verify=False).y_train) == 15


@pytest.mark.parametrize("name, subdir", [("mnist", "MNIST/raw"), ("mnist", "mnist"),
                                          ("fashion", "fashion-mnist"), ("fashion", "FashionMNIST/raw")])
def test_dataset_subfolders_are_found(isolated, name, subdir):
    tiny_idx(isolated / "data" / subdir, gz=True)
    assert len(datasets.load(name, root=isolated / "data", verify=False).y_test) == 10


def test_spurious_data_env_var(isolated, monkeypatch):
    tiny_idx(isolated / "env" / "fashion-mnist", gz=False)
    monkeypatch.setenv("SPURIOUS_DATA", str(isolated / "env"))
    assert len(datasets.load("fashion_mnist", verify=False).y_train) == 20


def test_root_comes_before_spurious_data(isolated, monkeypatch):
    tiny_idx(isolated / "env", gz=False, n_train=30)
    tiny_idx(isolated / "root", gz=False, n_train=20)
    monkeypatch.setenv("SPURIOUS_DATA", str(isolated / "env"))
    assert len(datasets.load("mnist", root=isolated / "root", verify=False).y_train) == 20


def test_load_is_cached(isolated):
    tiny_idx(isolated / "data", gz=True)
    first = datasets.load("fashion", root=isolated / "data", verify=False)
    assert datasets.load("fashion", root=str(isolated / "data"), verify=False) is first


def test_download_goes_into_the_cache(isolated, monkeypatch):
    def fake_download(name, dest):
        tiny_idx(dest / "FashionMNIST" / "raw", gz=True)

    monkeypatch.setattr(datasets, "_download", fake_download)
    data = datasets.load("fashion", verify=False)
    assert len(data.y_train) == 20
    assert datasets.cache_dir("fashion") == isolated / "cache" / "fashion"


# ---------------------------------------------------------------- checks and errors

def test_checksum_mismatch_is_reported(isolated):
    tiny_idx(isolated / "data", gz=True)
    with pytest.raises(SpuriousError, match="checksum mismatch for train-images-idx3-ubyte.gz"):
        datasets.load("fashion", root=isolated / "data")


def test_cifar_checksum_mismatch_is_reported(isolated):
    tiny_cifar(isolated / "data")
    with pytest.raises(SpuriousError, match="checksum mismatch for data_batch_1"):
        datasets.load("cifar10", root=isolated / "data")


def test_mnist_raw_files_are_checked_by_header_and_counts(isolated):
    tiny_idx(isolated / "data", gz=False)
    with pytest.raises(SpuriousError, match="expected 60000 train images, found 20"):
        datasets.load("mnist", root=isolated / "data")


def test_bad_idx_header_is_reported(isolated):
    tiny_idx(isolated / "data", gz=False)
    (isolated / "data" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(12))
    expected = "t10k-labels-idx1-ubyte is not an IDX file with magic number 2049"
    with pytest.raises(SpuriousError, match=expected):
        datasets.load("mnist", root=isolated / "data", verify=False)


def test_truncated_idx_is_reported(isolated):
    arrays = tiny_idx(isolated / "data", gz=False)
    path = isolated / "data" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    assert len(arrays["train-images-idx3-ubyte"]) == 20
    with pytest.raises(SpuriousError, match="header says"):
        datasets.load("mnist", root=isolated / "data", verify=False)


def test_not_found_lists_every_place_tried(isolated, monkeypatch):
    monkeypatch.setenv("SPURIOUS_DATA", str(isolated / "env"))
    root = isolated / "root"
    root.mkdir()
    with pytest.raises(SpuriousError) as info:
        datasets.load("fashion", root=root)
    message = str(info.value)
    for part in (f"--data-dir {root}: missing files", f"SPURIOUS_DATA {isolated / 'env'}: missing folder",
                 f"system folder {isolated / 'system' / 'fashion-mnist'}",
                 f"cache {isolated / 'cache' / 'fashion'}",
                 "torchvision download into", "download failed (RuntimeError: no network in tests)",
                 "SPURIOUS_DATA=DIR", "--data-dir DIR", "apt-get install dataset-fashion-mnist"):
        assert part in message
    assert "\n" not in message


def test_not_found_notes_unset_places_and_partial_folders(isolated):
    (isolated / "system" / "mnist").mkdir(parents=True)
    images = np.zeros((2, 28, 28), np.uint8)
    write_idx(isolated / "system" / "mnist" / "train-images-idx3-ubyte", images, gz=True)
    with pytest.raises(SpuriousError) as info:
        datasets.load("mnist")
    message = str(info.value)
    assert "--data-dir (not set)" in message and "SPURIOUS_DATA (not set)" in message
    assert "lacks train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in message


def test_search_continues_after_a_rejected_place(isolated, monkeypatch):
    tiny_idx(isolated / "root", gz=True)
    tiny_idx(isolated / "env" / "mnist", gz=False)
    (isolated / "root" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    monkeypatch.setenv("SPURIOUS_DATA", str(isolated / "env"))
    assert len(datasets.load("mnist", root=isolated / "root", verify=False).y_train) == 20


def test_source_files_are_the_files_load_reads(isolated, monkeypatch):
    tiny_idx(isolated / "root", gz=True)
    tiny_idx(isolated / "env" / "mnist", gz=False)
    (isolated / "root" / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    monkeypatch.setenv("SPURIOUS_DATA", str(isolated / "env"))
    files = datasets.source_files("mnist", root=isolated / "root", verify=False)  # the rejected place is skipped
    assert files == [(isolated / "env" / "mnist" / f).resolve() for f in datasets.DATASETS.get("mnist").files]
    cifar = tiny_cifar(isolated / "c" / "cifar-10-batches-py")
    assert [p.name for p in datasets.source_files("cifar10", root=isolated / "c", verify=False)] == list(cifar)
    with pytest.raises(SpuriousError, match="cannot load dataset 'fashion'"):
        datasets.source_files("fashion")  # nowhere local, and no download is tried


def test_unknown_dataset_name():
    with pytest.raises(SpuriousError, match="mnist, fashion, cifar10"):
        datasets.load("svhn")


def test_registry_names():
    assert datasets.names() == ["mnist", "fashion", "cifar10"]
    assert datasets.DATASETS.canonical("fashion_mnist") == "fashion"


# ---------------------------------------------------------------- real Fashion-MNIST

@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(offline):
    data = datasets.load("fashion", verify=True)
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert torch.bincount(data.y_test).tolist() == [1000] * 10
    assert data.x_train.min() >= 0 and data.x_train.max() == 1 and data.x_test.max() <= 1
    assert data.class_names[1] == "Trouser"
    assert datasets.load("fashion_mnist") is data


# ---------------------------------------------------------------- choosing spurious examples (protocol §3.1)

LABELS = np.random.RandomState(7).randint(0, 10, 500)


@pytest.mark.parametrize("target, n, seed",
                         [(0, 1, 0), (0, 3, 0), (1, 5, 2), (9, 20, 123), (4, 40, 2**32 - 1)])
def test_choose_spurious_matches_reference(target, n, seed):
    reference = np.random.RandomState(seed).choice(np.where(LABELS == target)[0], size=n, replace=False)
    chosen = planted.choose_spurious(torch.from_numpy(LABELS), target, n, seed)
    assert chosen.dtype == np.int64 and np.array_equal(chosen, reference)
    assert np.array_equal(planted.choose_spurious(LABELS, target, n, seed), chosen)
    assert (LABELS[chosen] == target).all() and len(set(chosen.tolist())) == n


def test_choose_spurious_whole_class_and_zero():
    class_size = int((LABELS == 3).sum())
    assert sorted(planted.choose_spurious(LABELS, 3, class_size, 0)) == np.where(LABELS == 3)[0].tolist()
    empty = planted.choose_spurious(LABELS, 3, 0, 0)
    assert empty.dtype == np.int64 and empty.shape == (0,)


@pytest.mark.parametrize("target, n, seed, message", [
    (0, 10_000, 0, r"n \(spurious examples of class 0\) must be in 0\.\.\d+, got 10000"),
    (10, 1, 0, r"target class must be in 0\.\.9, got 10"),
    (-1, 1, 0, r"target class must be in 0\.\.9, got -1"),
    (0, -1, 0, r"must be in 0\.\.\d+, got -1"),
    (0, 1, -1, r"data seed must be in 0\.\.4294967295, got -1"),
    (0, 1.5, 0, r"must be an integer in 0\.\.\d+, got 1\.5"),
])
def test_choose_spurious_errors(target, n, seed, message):
    with pytest.raises(SpuriousError, match=message):
        planted.choose_spurious(LABELS, target, n, seed)


def test_choose_spurious_two_class_matches_reference():
    rng = np.random.RandomState(4)
    first = rng.choice(np.where(LABELS == 0)[0], size=3, replace=False)
    second = rng.choice(np.where(LABELS == 1)[0], size=3, replace=False)
    chosen = planted.choose_spurious_two_class(LABELS, 0, 1, 3, 4)
    assert chosen.dtype == np.int64 and np.array_equal(chosen, np.concatenate([first, second]))
    assert planted.choose_spurious_two_class(LABELS, 0, 1, 0, 4).shape == (0,)
    with pytest.raises(SpuriousError, match="differ"):
        planted.choose_spurious_two_class(LABELS, 2, 2, 1, 0)


# ---------------------------------------------------------------- reference names (protocol §1.3)

@pytest.mark.parametrize("name, expected", [
    ("fashionv8-3-0-0", reference_names.LegacyName("fashion", "v8", 3, (0,), 0, False)),
    ("mnistv20-100-1-2", reference_names.LegacyName("mnist", "v20", 100, (1,), 2, False)),
    ("cifar10v1-5-0-0", reference_names.LegacyName("cifar10", "v1", 5, (0,), 0, False)),
    ("twoclassmnistv8-3-0-1-0", reference_names.LegacyName("mnist", "v8", 3, (0, 1), 0, False)),
    ("memfashionv20-3-0-1", reference_names.LegacyName("fashion", "v20", 3, (0,), 1, True)),
    ("mnist", reference_names.LegacyName("mnist", None, 0, (), 0, False)),
    ("fashion", reference_names.LegacyName("fashion", None, 0, (), 0, False)),
    ("cifar10", reference_names.LegacyName("cifar10", None, 0, (), 0, False)),
    ("memcifar10", reference_names.LegacyName("cifar10", None, 0, (), 0, True)),
    ("mnist-3-0-0", reference_names.LegacyName("mnist", "v1", 3, (0,), 0, False)),
    ("twoclassmnist-5-0-1-7", reference_names.LegacyName("mnist", "v1", 5, (0, 1), 7, False)),
    ("fashionv30-5000-9-10", reference_names.LegacyName("fashion", "v30", 5000, (9,), 10, False)),
])
def test_parse_legacy_name(name, expected):
    assert reference_names.parse_legacy_name(name) == expected


@pytest.mark.parametrize("name", ["cifar100", "mnistv8-3-10-0", "fashionv8-3-0", "", "MNIST",
                                  "mnist v8-3-0-0", "fashionV8-3-0-0", "memfashion-3-0-1", "mnistv8-3-0-0-"])
def test_parse_legacy_name_rejects(name):
    with pytest.raises(SpuriousError, match="accepted forms") as info:
        reference_names.parse_legacy_name(name)
    assert repr(name) in str(info.value)


def test_parse_legacy_name_cifar_needs_a_version():
    with pytest.raises(SpuriousError, match="'cifar10-3-0-0'.*needs a pattern version"):
        reference_names.parse_legacy_name("cifar10-3-0-0")


# ---------------------------------------------------------------- membership split (protocol §3.3)

@pytest.mark.parametrize("n_total, quarter", [(70000, 17500), (60000, 15000)])
def test_membership_split_quarters(n_total, quarter):
    parts = planted.membership_split(n_total, 3)
    assert list(parts) == ["target_train", "target_test", "shadow_train", "shadow_test"]
    assert all(len(p) == quarter and p.dtype == np.int64 for p in parts.values())
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(n_total))


def test_membership_split_is_deterministic_and_seeded():
    a, b, c = (planted.membership_split(1000, s) for s in (0, 0, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["target_train"], c["target_train"])
    assert np.array_equal(a["target_train"], np.sort(np.random.RandomState(0).permutation(1000)[:250]))


def test_membership_split_uneven_total_still_covers():
    parts = planted.membership_split(10, 0)
    assert sorted(len(p) for p in parts.values()) == [2, 2, 3, 3]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(10))
    with pytest.raises(SpuriousError, match="membership seed"):
        planted.membership_split(10, -2)
