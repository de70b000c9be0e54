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
from defense.data.files import Arrays, FileParams, Source, load_source, register_source

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
    """An idx file: 2 zero bytes, a dtype code, the number of dims, big-endian int32 sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)}, file holds {data.size} values")
    return data.reshape(tuple(dims))


def _mnist_decode(files: list[Path], p: FileParams) -> Arrays:
    xtr, ytr, xte, yte = (read_idx(f) for f in files)

    def pad(x):  # (N, 28, 28) -> (N, 1, 32, 32), 2 black pixels each side (see module docstring)
        return np.pad(x.astype(np.uint8), ((0, 0), (2, 2), (2, 2)))[:, None]

    return pad(xtr), ytr.astype(np.int64), pad(xte), yte.astype(np.int64)


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
