"""MNIST: idx binary files, optionally gzipped (60k/10k digits).

Normalisation 0.5 / 0.5, random crop with padding 4, no flip, as BackdoorBench. Deviation:
zero-padded from 28x28 to 32x32 (BackdoorBench keeps 28x28). VGG19-BN's five max-pools shrink
28 to 0 and fail; at 32 every architecture and every 32x32 trigger works unchanged, and the
2-pixel border is background (black) anyway.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from defense.data import DatasetInfo, register_dataset
from defense.data.files import Arrays, FileParams, Source, bad_file, check_labels, load_source, register_source

MNIST = DatasetInfo("mnist", 10, 1, 32, (0.5,), (0.5,), flip=False, pad=4)


MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _mnist_find(root: Path):
    for d in (root, root / "MNIST" / "raw", root / "mnist"):  # root/MNIST/raw: torchvision's download
        found = []
        for name in MNIST_FILES:
            f = next((d / n for n in (name, name + ".gz") if (d / n).is_file()), None)
            if f is None:
                break
            found.append(f)
        else:
            return found
    return None


def read_idx(path: Path) -> np.ndarray:
    """An idx file: 2 zero bytes, a dtype code, the number of dims, big-endian int32 sizes, data.

    A file that is not one (wrong magic, truncated, gzip damaged) raises ``DatasetFileError``
    (a ``ValueError``) naming it, what was expected and what was found."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut .gz ends in EOFError
        raise bad_file(path, "a readable (optionally gzipped) idx file", f"{type(e).__name__}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise bad_file(path, "an idx file (magic 00 00 <type> <dims>, e.g. 00000803 for images)",
                       f"magic {raw[:4].hex() or '(empty file)'}; not an idx file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise bad_file(path, f"{ndim} dimension sizes after the magic", f"a file of {len(raw)} bytes (truncated)")
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(int)
    itemsize = np.dtype(IDX_DTYPES[raw[2]]).itemsize
    body = len(raw) - 4 - 4 * ndim
    if body % itemsize or body // itemsize != int(np.prod(dims)):
        raise bad_file(path, f"{int(np.prod(dims))} values (header says {' x '.join(map(str, dims))})",
                       f"{body // itemsize} values: the header says {tuple(dims)}, the file is truncated or padded")
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    return data.reshape(tuple(dims))


def _mnist_images(x: np.ndarray, path: Path) -> np.ndarray:
    """(N, 28, 28) unsigned bytes, as the MNIST files hold; anything else is refused (a 20x20 set
    would otherwise be padded to 24x24 and trained on)."""
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise bad_file(path, "MNIST images of 28 x 28 pixels (idx dims N x 28 x 28)",
                       f"dims {' x '.join(map(str, x.shape))}")
    if x.dtype != np.uint8:
        raise bad_file(path, "pixels as unsigned bytes (idx type 0x08)", f"{x.dtype}")
    return x


def _mnist_decode(files: list[Path], p: FileParams) -> Arrays:
    xtr, ytr, xte, yte = (read_idx(f) for f in files)
    xtr, xte = _mnist_images(xtr, files[0]), _mnist_images(xte, files[2])
    for y, x, fy, fx in ((ytr, xtr, files[1], files[0]), (yte, xte, files[3], files[2])):
        if y.ndim == 1 and len(y) != len(x):
            raise bad_file(fy, f"{len(x)} labels, one per image in {fx.name}", f"{len(y)} labels")
    ytr, yte = check_labels(ytr, MNIST.num_classes, files[1]), check_labels(yte, MNIST.num_classes, files[3])

    def pad(x):  # (N, 28, 28) -> (N, 1, 32, 32), 2 black pixels each side (see module docstring)
        return np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None]

    return pad(xtr), ytr, pad(xte), yte


def _mnist_fetch(root: Path) -> None:
    from torchvision.datasets import MNIST as TVMNIST

    TVMNIST(str(root), train=True, download=True)  # -> root/MNIST/raw/*-ubyte(.gz)


MNIST_SOURCE = register_source(Source(
    MNIST,
    "  train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte\n"
    "  (each may be .gz), directly in the root or in MNIST/raw/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    find=_mnist_find,
    decode=_mnist_decode,
    fetch=_mnist_fetch,
))


@register_dataset("mnist", info=MNIST, params=FileParams)
def load_mnist(root, **params):
    """MNIST (60k/10k digits), padded from 28x28 to 32x32, 1 channel, no flip."""
    return load_source(MNIST_SOURCE, root, FileParams(**params))
