"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read without any network access.

The package installs the four original IDX files, gzip-compressed, in ``/usr/share/datasets/fashion-mnist``.
This module parses them with :mod:`gzip` and :mod:`numpy` (not torchvision's dataset class, which wants the
uncompressed files in its own layout) and wraps them in torch ``DataLoader`` objects.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IDXFormatError",
    "fashion_mnist_loaders",
    "fashion_mnist_root",
    "load_fashion_mnist",
    "random_crop_flip",
    "read_idx",
]

logger = logging.getLogger(__name__)

#: Class names, indexed by label.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Mean and standard deviation of the training pixels, scaled to [0, 1].
FASHION_MNIST_MEAN: float = 0.2860
FASHION_MNIST_STD: float = 0.3530

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that overrides :data:`DEBIAN_FASHION_MNIST_DIR`.
FASHION_MNIST_ENV = "DYREP_FASHION_MNIST"

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_SPLIT_SIZE = {"train": 60000, "test": 10000}
_IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_IMAGE_SIDE = 28


class IDXFormatError(ValueError):
    """An IDX file is truncated, corrupt or not the kind of IDX file that was expected."""


def _split_files(split: str) -> tuple[str, str]:
    """File names of the image and label files of ``split`` ("train" or "test")."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def fashion_mnist_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory that holds the four Fashion-MNIST ``*-ubyte.gz`` files.

    The directory is, in order of precedence: ``root`` if given, else the environment variable
    ``DYREP_FASHION_MNIST`` if set and non-empty, else ``/usr/share/datasets/fashion-mnist`` (Debian's
    ``dataset-fashion-mnist`` package).

    Raises:
        FileNotFoundError: if any of the four files is missing from that directory. The message says how to
            install the Debian package and how to point the library elsewhere.
    """
    if root is not None:
        path, source = Path(root), "the root argument"
    elif os.environ.get(FASHION_MNIST_ENV):
        path, source = Path(os.environ[FASHION_MNIST_ENV]), f"${FASHION_MNIST_ENV}"
    else:
        path, source = DEBIAN_FASHION_MNIST_DIR, "the default Debian location"
    path = path.expanduser()
    names = [name for split in _SPLIT_PREFIX for name in _split_files(split)]
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {path} (from {source}): missing {', '.join(missing)}. "
            "Install Debian's dataset-fashion-mnist package (as root: "
            "`apt-get update && apt-get install -y dataset-fashion-mnist`), which puts the files in "
            f"{DEBIAN_FASHION_MNIST_DIR}, or set the environment variable {FASHION_MNIST_ENV} "
            "(or pass root=) to a directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
        )
    return path


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzip-compressed if its name ends in ``.gz``).

    Args:
        path: the file.
        expected_magic: if given, the 32-bit big-endian magic number the file must start with
            (``0x803`` for an image file, ``0x801`` for a label file).

    Returns:
        A read-only ``uint8`` array whose shape is the one stored in the header.

    Raises:
        IDXFormatError: if the file cannot be decompressed, has the wrong magic number, stores another data
            type than unsigned bytes, or holds a different number of bytes than its header announces.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise IDXFormatError(f"{path}: cannot read the file as gzip-compressed IDX data ({exc})") from exc
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise IDXFormatError(f"{path}: magic number {magic:#010x}, expected {expected_magic:#010x}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise IDXFormatError(f"{path}: magic number {magic:#010x} is not that of an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise IDXFormatError(
            f"{path}: header announces shape {dims} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header} bytes of data"
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    return array  # np.frombuffer over bytes is read-only


@functools.lru_cache(maxsize=4)
def _load_arrays(image_path: str, label_path: str, _stamp: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Parse and cross-check one split; cached on the paths and the files' size and mtime (``_stamp``)."""
    images = read_idx(image_path, _IMAGE_MAGIC)
    labels = read_idx(label_path, _LABEL_MAGIC)
    if images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
        raise IDXFormatError(f"{image_path}: images of shape {images.shape[1:]}, expected (28, 28)")
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise IDXFormatError(f"{label_path}: label {int(labels.max())} out of range 0..9")
    return images, labels


def _stamp(*paths: Path) -> tuple[int, ...]:
    stats = [p.stat() for p in paths]
    return tuple(v for s in stats for v in (s.st_size, s.st_mtime_ns, s.st_ino))


def _balanced_indices(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the first ``limit // 10`` samples of every class, in file order."""
    num_classes = len(FASHION_MNIST_CLASSES)
    if limit <= 0 or limit % num_classes:
        raise ValueError(
            f"limit must be a positive multiple of {num_classes} (a class-balanced subset), got {limit}"
        )
    per_class = limit // num_classes
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            raise ValueError(
                f"limit={limit} needs {per_class} samples of class {c}, the split has {idx.size}"
            )
        chosen.append(idx[:per_class])
    return np.sort(np.concatenate(chosen))


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST.

    Args:
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        root: directory of the ``.gz`` files; see :func:`fashion_mnist_root`.
        limit: if given, return a deterministic class-balanced subset of ``limit`` images: the first
            ``limit // 10`` images of each class, kept in file order. Must be a positive multiple of 10.

    Returns:
        ``(images, labels)``: a ``uint8`` tensor of shape ``N x 28 x 28`` and an ``int64`` tensor of shape
        ``N``. Both own their memory.
    """
    image_name, label_name = _split_files(split)
    directory = fashion_mnist_root(root)
    image_path, label_path = directory / image_name, directory / label_name
    images, labels = _load_arrays(str(image_path), str(label_path), _stamp(image_path, label_path))
    if limit is not None:
        idx = _balanced_indices(labels, limit)
        images, labels = images[idx], labels[idx]  # fancy indexing copies
    else:
        images, labels = images.copy(), labels.copy()
    logger.debug("Fashion-MNIST %s: %d images from %s", split, len(labels), directory)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _to_float(images: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``uint8`` ``N x 28 x 28`` to ``float32`` ``N x 1 x 28 x 28`` in [0, 1], optionally standardised."""
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)
    if normalize:
        x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return x


def fashion_mnist_loaders(
    batch_size: int,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    normalize: bool = True,
    root: str | os.PathLike[str] | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Build ``(train_loader, test_loader)`` over in-memory Fashion-MNIST tensors.

    Each batch is ``(x, y)`` with ``x`` a ``float32`` tensor of shape ``B x 1 x 28 x 28`` (pixels scaled to
    [0, 1] and, if ``normalize``, standardised with mean 0.2860 and std 0.3530) and ``y`` ``int64`` labels.
    The train loader shuffles with a ``torch.Generator`` seeded by ``seed``, so two calls with the same seed
    give the same batch order; the test loader keeps file order. Both use ``num_workers=0``.

    Args:
        batch_size: samples per batch (the last batch may be smaller).
        train_limit: optional class-balanced subset size of the train split (see :func:`load_fashion_mnist`).
        test_limit: the same for the test split.
        seed: seed of the train loader's shuffling.
        normalize: standardise the pixels as described above.
        root: directory of the ``.gz`` files; see :func:`fashion_mnist_root`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    loaders = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images, labels = load_fashion_mnist(split, root=root, limit=limit)
        dataset = TensorDataset(_to_float(images, normalize), labels)
        if split == "train":
            generator = torch.Generator().manual_seed(seed)
            loader = DataLoader(
                dataset, batch_size=batch_size, shuffle=True, generator=generator, num_workers=0
            )
        else:
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        loaders.append(loader)
    return loaders[0], loaders[1]


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 2,
                     fill: float = 0.0) -> torch.Tensor:
    """Standard light augmentation of a batch ``[B, C, H, W]``: pad, random crop back, random h-flip.

    Every draw comes from ``generator``, so runs that seed it alike see the same augmented batches
    whatever else consumes the global RNG. ``fill`` is the padding value (the normalised black pixel
    for normalised images).
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4, value=fill)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, w + 2 * padding)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, c, h, w)
    out = out.gather(3, cols)
    return torch.where(flip[:, None, None, None], out.flip(3), out)
