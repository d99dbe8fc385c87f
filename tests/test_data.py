"""Tests of :mod:`dyrep_fx_examples.data` on the real Fashion-MNIST files of Debian's ``dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dyrep_fx_examples.data import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    IDXFormatError,
    fashion_mnist_loaders,
    fashion_mnist_root,
    load_fashion_mnist,
    read_idx,
)

FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write ``array`` (uint8) as a gzip-compressed IDX file."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _copy_real_files(dst: Path) -> Path:
    """Copy the four real files into ``dst`` so one of them can be replaced."""
    src = fashion_mnist_root()
    for name in FILES:
        shutil.copy(src / name, dst / name)
    return dst


def test_classes() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_root_default_is_debian_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    if all((DEBIAN_FASHION_MNIST_DIR / name).is_file() for name in FILES):
        assert fashion_mnist_root() == DEBIAN_FASHION_MNIST_DIR
    else:  # the files come from elsewhere (e.g. an extracted .deb named by the environment variable)
        with pytest.raises(FileNotFoundError, match=str(DEBIAN_FASHION_MNIST_DIR)):
            fashion_mnist_root()


def test_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _copy_real_files(tmp_path)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(real))
    assert fashion_mnist_root() == real
    # An explicit argument beats the environment variable.
    assert fashion_mnist_root(DEBIAN_FASHION_MNIST_DIR) == DEBIAN_FASHION_MNIST_DIR


@pytest.mark.parametrize("via_env", [False, True])
def test_missing_files_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via_env: bool) -> None:
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    if via_env:
        monkeypatch.setenv(FASHION_MNIST_ENV, str(empty))
        with pytest.raises(FileNotFoundError) as info:
            load_fashion_mnist("test")
    else:
        with pytest.raises(FileNotFoundError) as info:
            fashion_mnist_root(empty)
    message = str(info.value)
    assert "dataset-fashion-mnist" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert FASHION_MNIST_ENV in message
    assert str(empty) in message


def test_train_split() -> None:
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 6000))
    # Real images: dark background, bright item, and no two of the first images alike.
    assert images[:, 0, 0].float().mean() < 5
    assert images.float().mean().item() / 255 == pytest.approx(0.2860, abs=1e-3)
    assert len({images[i].numpy().tobytes() for i in range(100)}) == 100


def test_test_split() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 1000))


def test_returned_tensors_are_independent() -> None:
    a, _ = load_fashion_mnist("test")
    a.zero_()
    b, _ = load_fashion_mnist("test")
    assert b.sum() > 0


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val")


def test_balanced_subset() -> None:
    images, labels = load_fashion_mnist("train")
    sub_x, sub_y = load_fashion_mnist("train", limit=250)
    assert sub_x.shape == (250, 28, 28) and sub_y.shape == (250,)
    assert torch.equal(torch.bincount(sub_y, minlength=10), torch.full((10,), 25))
    # First occurrences of each class, in file order.
    expected = torch.cat([torch.nonzero(labels == c).flatten()[:25] for c in range(10)]).sort().values
    assert torch.equal(sub_x, images[expected]) and torch.equal(sub_y, labels[expected])
    # Deterministic, and nested: a smaller subset is contained in a larger one.
    again_x, again_y = load_fashion_mnist("train", limit=250)
    assert torch.equal(again_x, sub_x) and torch.equal(again_y, sub_y)
    small_x, _ = load_fashion_mnist("train", limit=50)
    big = {x.numpy().tobytes() for x in sub_x}
    assert all(x.numpy().tobytes() in big for x in small_x)


@pytest.mark.parametrize("limit", [0, -10, 15, 10010])
def test_bad_limit(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        load_fashion_mnist("test", limit=limit)


def _epoch_labels(loader: torch.utils.data.DataLoader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


def test_loaders() -> None:
    train, test = fashion_mnist_loaders(32, train_limit=200, test_limit=100, seed=3)
    assert train.num_workers == 0 and test.num_workers == 0
    x, y = next(iter(test))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Normalised pixels: the background (0) maps to -mean/std.
    assert x.min().item() == pytest.approx(-0.2860 / 0.3530, abs=1e-5)
    assert len(train.dataset) == 200 and len(test.dataset) == 100
    # The test set stays in file order.
    _, test_labels = load_fashion_mnist("test", limit=100)
    assert torch.equal(_epoch_labels(test), test_labels)
    # Seeded shuffling: every epoch has its own order, and the sequence of epochs depends on the seed only.
    same, _ = fashion_mnist_loaders(32, train_limit=200, test_limit=100, seed=3)
    other, _ = fashion_mnist_loaders(32, train_limit=200, test_limit=100, seed=4)
    epochs = [_epoch_labels(train) for _ in range(2)]
    assert torch.equal(torch.sort(epochs[0]).values, torch.sort(train.dataset.tensors[1]).values)
    assert not torch.equal(epochs[0], epochs[1])
    for e in epochs:
        assert torch.equal(e, _epoch_labels(same))
    assert not torch.equal(epochs[0], _epoch_labels(other))


def test_loaders_unnormalized() -> None:
    _, test = fashion_mnist_loaders(100, test_limit=100, train_limit=10, normalize=False)
    x, _ = next(iter(test))
    images, _ = load_fashion_mnist("test", limit=100)
    torch.testing.assert_close(x, images.unsqueeze(1).float() / 255)


def test_corrupt_gzip(tmp_path: Path) -> None:
    root = _copy_real_files(tmp_path)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not a gzip file at all")
    with pytest.raises(IDXFormatError, match="t10k-images-idx3-ubyte.gz.*gzip"):
        load_fashion_mnist("test", root=root)


def test_truncated_gzip(tmp_path: Path) -> None:
    root = _copy_real_files(tmp_path)
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(IDXFormatError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist("test", root=root)


def test_wrong_size(tmp_path: Path) -> None:
    root = _copy_real_files(tmp_path)
    # A valid gzip whose header announces more images than it holds.
    images = np.zeros((5, 28, 28), np.uint8)
    path = root / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(
            (0x803).to_bytes(4, "big")
            + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28))
            + images.tobytes()
        )
    with pytest.raises(IDXFormatError, match="announces shape"):
        load_fashion_mnist("test", root=root)


def test_wrong_magic(tmp_path: Path) -> None:
    root = _copy_real_files(tmp_path)
    # Labels written where images are expected: magic 0x801 instead of 0x803.
    _write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros(10000, np.uint8))
    with pytest.raises(IDXFormatError, match="magic number"):
        load_fashion_mnist("test", root=root)


def test_count_mismatch(tmp_path: Path) -> None:
    root = _copy_real_files(tmp_path)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(9999, np.uint8))
    with pytest.raises(IDXFormatError, match="9999 labels"):
        load_fashion_mnist("test", root=root)


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    out = read_idx(tmp_path / "a.gz", expected_magic=0x803)
    np.testing.assert_array_equal(out, array)
