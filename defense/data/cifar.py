"""CIFAR-10 and CIFAR-100 from their "python version" pickle batches.

Normalisation as BackdoorBench (``get_dataset_normalization``): CIFAR-10 mean (0.4914, 0.4822,
0.4465) std (0.247, 0.243, 0.261) (the WaNet values BackdoorBench took over); CIFAR-100
(0.5071, 0.4865, 0.4409) / (0.2673, 0.2564, 0.2762). Random crop with padding 4; horizontal
flip for CIFAR-10 only, as BackdoorBench's ``get_transform``.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from defense.data import DatasetInfo, register_dataset
from defense.data.files import Arrays, FileParams, Source, bad_file, check_labels, load_source, register_source

CIFAR10 = DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), flip=True, pad=4)
CIFAR100 = DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), flip=False, pad=4)


class _BatchUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles (the standard format, read from the user's own local
    files). Unpickling can run arbitrary code, so only the globals a dict of numpy arrays,
    lists and strings needs are allowed; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles spell bytes
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


BATCH = "a CIFAR python batch (a pickled dict with 'data' N x 3072 uint8 and labels)"


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # latin1: the batches were pickled by Python 2; its str keys and array bytes decode
            # losslessly this way. Keys may then be str or bytes (files re-pickled by Python 3).
            d = _BatchUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - truncated or foreign pickles fail in many ways; all are the file's
        raise bad_file(path, BATCH, f"{type(e).__name__}: {e} (truncated or not a CIFAR batch)") from None
    if not isinstance(d, dict):
        raise bad_file(path, BATCH, f"a pickled {type(d).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise bad_file(path, f"{BATCH}, keys 'data' and '{label_key}'", f"keys {sorted(map(str, d))}")
    x = np.asarray(d["data"])
    if x.ndim != 2 or x.shape[1] != 3072:
        raise bad_file(path, "'data' of N x 3072 values (32 x 32 RGB images)", f"shape {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer) or x.size and (x.min() < 0 or x.max() > 255):
            raise bad_file(path, "'data' pixel values 0..255", f"{x.dtype} values")
        x = x.astype(np.uint8)
    y = np.asarray(d[label_key])
    if y.ndim != 1 or len(y) != len(x):
        raise bad_file(path, f"{len(x)} '{label_key}', one per image", f"{len(y) if y.ndim == 1 else y.shape}")
    return x.reshape(-1, 3, 32, 32), check_labels(y, num_classes, path)  # rows: 1024 R, 1024 G, 1024 B


def _tv_cifar_fetch(name: str) -> Callable[[Path], None]:
    def fetch(root: Path) -> None:
        from torchvision.datasets import CIFAR10, CIFAR100
        from torchvision.datasets.utils import download_and_extract_archive

        cls = CIFAR10 if name == "cifar10" else CIFAR100
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)

    return fetch


CIFAR10_SOURCE = register_source(Source(
    CIFAR10, "  cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    find=lambda root: _find_all(root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    decode=lambda files, p: _decode_cifar(files, "labels", 10),
    fetch=_tv_cifar_fetch("cifar10"),
))
CIFAR100_SOURCE = register_source(Source(
    CIFAR100, "  cifar-100-python/train, test",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    find=lambda root: _find_all(root / "cifar-100-python", ["train", "test"]),
    decode=lambda files, p: _decode_cifar(files, "fine_labels", 100),  # the 100-class labels
    fetch=_tv_cifar_fetch("cifar100"),
))


def _find_all(folder: Path, names: list[str]) -> list[Path] | None:
    files = [folder / n for n in names]
    return files if all(f.is_file() for f in files) else None


def _decode_cifar(files: list[Path], label_key: str, num_classes: int) -> Arrays:
    """All files but the last are training batches; the last is the test batch."""
    parts = [_read_batch(f, label_key, num_classes) for f in files[:-1]]
    xte, yte = _read_batch(files[-1], label_key, num_classes)
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]), xte, yte


@register_dataset("cifar10", info=CIFAR10, params=FileParams)
def load_cifar10(root, **params):
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (50k/10k, 32x32 RGB, 10 classes)."""
    return load_source(CIFAR10_SOURCE, root, FileParams(**params))


@register_dataset("cifar100", info=CIFAR100, params=FileParams)
def load_cifar100(root, **params):
    """CIFAR-100 from ``<root>/cifar-100-python`` (50k/10k, 32x32 RGB, 100 fine classes)."""
    return load_source(CIFAR100_SOURCE, root, FileParams(**params))
