"""Loaders for the real datasets: ``cifar10``, ``cifar100``, ``gtsrb``, ``tiny-imagenet``, ``mnist``.

Each reads the dataset's standard on-disk format from a local ``root``, decodes it once into
uint8 arrays and caches them as ``.npy`` (default ``<root>/.bdgrid-cache``), so every later
load is a few ``np.load`` calls. Where the files are missing and ``download`` is on, the
torchvision download helpers fetch them into ``root``; an offline machine gets, within a few
seconds, an error naming the exact files expected and where to put them.

Per-dataset conventions follow BackdoorBench (``utils/aggregate_block/
dataset_and_transform_generate.py``: ``get_input_shape``, ``get_dataset_normalization``,
``get_transform``), the protocol bdgrid reproduces:
- normalisation: CIFAR-10 mean (0.4914, 0.4822, 0.4465) std (0.247, 0.243, 0.261) (the
  WaNet values BackdoorBench took over); CIFAR-100 (0.5071, 0.4865, 0.4409) /
  (0.2673, 0.2564, 0.2762); Tiny-ImageNet (0.4802, 0.4481, 0.3975) / (0.2302, 0.2265,
  0.2262); MNIST 0.5 / 0.5; GTSRB none (mean 0, std 1).
- augmentation: random crop with padding 4 for every dataset (Tiny-ImageNet too, at 64x64);
  horizontal flip for CIFAR-10 only (BackdoorBench's ``get_transform`` flips only when the
  dataset is ``cifar10``; for GTSRB it would also mirror the meaning of some signs).
- GTSRB: the whole image resized to 32x32 with PIL bilinear (what ``transforms.Resize`` does
  on PIL images), no ROI crop, as BackdoorBench's GTSRB class; ``roi=True`` crops to the
  annotated sign box first.
- Tiny-ImageNet: labels are the wnids in sorted order (what BackdoorBench's ``ImageFolder``
  gives), 64x64.
- MNIST: deviation: zero-padded from 28x28 to 32x32 (BackdoorBench keeps 28x28). VGG19-BN's
  five max-pools shrink 28 to 0 and fail; at 32 every architecture and every 32x32 trigger
  works unchanged, and the 2-pixel border is background (black) anyway.
"""
from __future__ import annotations

import concurrent.futures
import csv
import gzip
import hashlib
import json
import os
import pickle
import socket
import threading
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from defense.data import Data, DatasetInfo, register_dataset

# bump when the decoded arrays of any loader change, so stale caches are not reused
CACHE_FORMAT = 1
PROBE_TIMEOUT_S = 4.0  # offline machines must fail fast, not hang in DNS / connect
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0  # a stalled download raises instead of hanging forever


class DatasetMissing(FileNotFoundError):
    """The files of a dataset are not under its root (and could not be downloaded)."""


@dataclass
class FileParams:
    download: bool = True  # fetch with torchvision's download helpers when files are missing
    cache: bool = True  # write/read the decoded arrays as .npy
    cache_dir: str | None = None  # default: <root>/.bdgrid-cache


@dataclass
class GTSRBParams(FileParams):
    roi: bool = False  # crop each image to its annotated sign box before resizing (BackdoorBench: no)


# ---------------------------------------------------------------------------------------------
# infos (normalisation and augmentation: see the module docstring for the source)

CIFAR10 = DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), flip=True, pad=4)
CIFAR100 = DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), flip=False, pad=4)
GTSRB = DatasetInfo("gtsrb", 43, 3, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), flip=False, pad=4)
TINY = DatasetInfo("tiny-imagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), flip=False, pad=4)
MNIST = DatasetInfo("mnist", 10, 1, 32, (0.5,), (0.5,), flip=False, pad=4)


# ---------------------------------------------------------------------------------------------
# the common path: cache -> local files -> download -> clear error

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


@dataclass
class Source:
    """How one dataset is found, fetched and decoded."""

    info: DatasetInfo
    layout: str  # the expected files, relative to root, for the error message
    url: str  # where the files come from (probed before downloading; named in the error)
    find: Callable[[Path], object | None]  # root -> located paths, or None when incomplete
    decode: Callable[..., Arrays]  # (located, params) -> arrays
    fetch: Callable[[Path], None]  # torchvision download into root


def _cache_paths(source: Source, root: Path, key: dict, cache_dir: str | None) -> dict[str, Path]:
    blob = json.dumps({"format": CACHE_FORMAT, "name": source.info.name, **key}, sort_keys=True)
    tag = hashlib.sha256(blob.encode()).hexdigest()[:12]
    d = Path(cache_dir) if cache_dir else root / ".bdgrid-cache"
    return {part: d / f"{source.info.name}-{tag}-{part}.npy" for part in ("xtr", "ytr", "xte", "yte")}


def _read_cache(paths: dict[str, Path]) -> Arrays | None:
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        a = [np.load(paths[k], allow_pickle=False) for k in ("xtr", "ytr", "xte", "yte")]
    except (OSError, ValueError) as e:  # a truncated or foreign file: decode again
        warnings.warn(f"ignoring unreadable dataset cache {paths['xtr'].parent}: {e}")
        return None
    if a[0].ndim != 4 or len(a[0]) != len(a[1]) or a[2].ndim != 4 or len(a[2]) != len(a[3]):
        return None
    return tuple(a)  # type: ignore[return-value]


def _write_cache(paths: dict[str, Path], arrays: Arrays) -> None:
    try:
        next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
        for (k, p), a in zip(paths.items(), arrays):
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, a, allow_pickle=False)
            os.replace(tmp, p)  # atomic: a reader never sees half a file
    except OSError as e:  # e.g. a read-only shared dataset folder: still usable, just slower
        warnings.warn(f"could not write the dataset cache {paths['xtr'].parent}: {e}")


def _missing_message(source: Source, root: Path, why: str) -> str:
    return (
        f"dataset '{source.info.name}' not found under {root}: {why}\n"
        f"Expected (relative to {root}):\n{source.layout}\n"
        f"Get the files from {source.url} and extract them into {root}, "
        f"or run once on a machine with internet access (download=true, the default)."
    )


def _probe(url: str) -> None:
    """Raise OSError within ``PROBE_TIMEOUT_S`` when ``url``'s host (or the proxy) is unreachable.

    DNS lookups have no timeout of their own, so the probe runs in a daemon thread and is
    abandoned after the deadline.
    """
    u = urllib.parse.urlparse(url)
    proxy = urllib.request.getproxies().get(u.scheme)
    target = urllib.parse.urlparse(proxy) if proxy else u
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    err: list[BaseException] = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT_S + 0.5)
    if t.is_alive():
        raise OSError(f"no answer from {host}:{port} within {PROBE_TIMEOUT_S:.0f} s")
    if err:
        raise OSError(f"cannot reach {host}:{port}: {err[0]}")


def _download(source: Source, root: Path) -> None:
    try:
        _probe(source.url)
    except OSError as e:
        raise DatasetMissing(_missing_message(source, root, f"files missing and the download site is unreachable ({e})")) from None
    root.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        source.fetch(root)
    except Exception as e:  # noqa: BLE001 - any download failure becomes the one clear message
        raise DatasetMissing(_missing_message(source, root, f"download failed ({type(e).__name__}: {e})")) from e
    finally:
        socket.setdefaulttimeout(old)


def _load(source: Source, root: Path | None, p: FileParams, key: dict | None = None) -> tuple[Data, Data]:
    if root is None:
        raise DatasetMissing(
            f"dataset '{source.info.name}' needs a root folder (--data-root / data_root).\n"
            f"Expected inside it:\n{source.layout}"
        )
    root = Path(root).expanduser()
    paths = _cache_paths(source, root, key or {}, p.cache_dir)
    arrays = _read_cache(paths) if p.cache else None
    if arrays is None:
        located = source.find(root)
        if located is None:
            if not p.download:
                raise DatasetMissing(_missing_message(source, root, "files missing (download=false)"))
            _download(source, root)
            located = source.find(root)
            if located is None:
                raise DatasetMissing(_missing_message(source, root, "files still missing after the download"))
        arrays = source.decode(located, p)
        if p.cache:
            _write_cache(paths, arrays)
    xtr, ytr, xte, yte = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return Data(xtr, ytr.long(), source.info), Data(xte, yte.long(), source.info)


def _pool_map(fn: Callable, items: list) -> list:
    """Decode image files in threads (PIL releases the GIL while decoding)."""
    if len(items) < 256:
        return [fn(i) for i in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        return list(ex.map(fn, items, chunksize=64))


def _tv_archive(url: str, md5: str | None) -> Callable[[Path], None]:
    def fetch(root: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(url, str(root), md5=md5)

    return fetch


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: the "python version" pickle batches

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


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        # latin1: the batches were pickled by Python 2; its str keys and array bytes decode
        # losslessly this way. Keys may then be str or bytes (files re-pickled by Python 3).
        d = _BatchUnpickler(f, encoding="latin1").load()
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows: 1024 R, 1024 G, 1024 B
    y = np.asarray(d[label_key], dtype=np.int64)
    return x, y


def _tv_cifar_fetch(name: str) -> Callable[[Path], None]:
    def fetch(root: Path) -> None:
        from torchvision.datasets import CIFAR10, CIFAR100
        from torchvision.datasets.utils import download_and_extract_archive

        cls = CIFAR10 if name == "cifar10" else CIFAR100
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)

    return fetch


CIFAR10_SOURCE = Source(
    CIFAR10, "  cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    find=lambda root: _find_all(root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
    decode=lambda files, p: _decode_cifar(files, "labels"),
    fetch=_tv_cifar_fetch("cifar10"),
)
CIFAR100_SOURCE = Source(
    CIFAR100, "  cifar-100-python/train, test",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    find=lambda root: _find_all(root / "cifar-100-python", ["train", "test"]),
    decode=lambda files, p: _decode_cifar(files, "fine_labels"),  # the 100-class labels
    fetch=_tv_cifar_fetch("cifar100"),
)


def _find_all(folder: Path, names: list[str]) -> list[Path] | None:
    files = [folder / n for n in names]
    return files if all(f.is_file() for f in files) else None


def _decode_cifar(files: list[Path], label_key: str) -> Arrays:
    """All files but the last are training batches; the last is the test batch."""
    parts = [_read_batch(f, label_key) for f in files[:-1]]
    xte, yte = _read_batch(files[-1], label_key)
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]), xte, yte


@register_dataset("cifar10", info=CIFAR10, params=FileParams)
def load_cifar10(root, **params):
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (50k/10k, 32x32 RGB, 10 classes)."""
    return _load(CIFAR10_SOURCE, root, FileParams(**params))


@register_dataset("cifar100", info=CIFAR100, params=FileParams)
def load_cifar100(root, **params):
    """CIFAR-100 from ``<root>/cifar-100-python`` (50k/10k, 32x32 RGB, 100 fine classes)."""
    return _load(CIFAR100_SOURCE, root, FileParams(**params))


# ---------------------------------------------------------------------------------------------
# GTSRB: PPM images with semicolon-separated annotation CSVs

# (training folder with 000NN class folders, test image folder, candidate test-label CSVs),
# relative to root: the official archives, torchvision's download, BackdoorBench's folders.
GTSRB_LAYOUTS = [
    ("GTSRB/Final_Training/Images", "GTSRB/Final_Test/Images",
     ["GTSRB/Final_Test/Images/GT-final_test.csv", "GTSRB/Final_Test/GT-final_test.csv",
      "GTSRB/GT-final_test.csv", "GT-final_test.csv"]),
    ("gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", ["gtsrb/GT-final_test.csv"]),
    ("Train", "Test", ["Test/GT-final_test.csv"]),
]


def _gtsrb_find(root: Path):
    for train, test, csvs in GTSRB_LAYOUTS:
        tr, te = root / train, root / test
        if not (tr.is_dir() and te.is_dir()):
            continue
        classes = sorted(d for d in tr.iterdir() if d.is_dir() and d.name.isdigit())
        labels = next((root / c for c in csvs if (root / c).is_file()), None)
        if classes and labels is not None:
            return classes, te, labels
    return None


def _read_gt_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=";", skipinitialspace=True))


def _gtsrb_image(item: tuple[Path, tuple[int, int, int, int] | None]) -> np.ndarray:
    from PIL import Image

    path, box = item
    with Image.open(path) as im:
        im = im.convert("RGB")
        if box is not None:
            im = im.crop(box)
        # PIL bilinear: what BackdoorBench's transforms.Resize((32, 32)) does on PIL images
        im = im.resize((GTSRB.size, GTSRB.size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _gtsrb_rows(rows: list[dict], folder: Path, roi: bool) -> tuple[list, list[int]]:
    items, labels = [], []
    for r in rows:
        # The ROI box as a PIL crop box (x1, y1, x2, y2), x2/y2 exclusive; the sign sits in
        # a margin of about 10% of the image, so the one-pixel convention does not matter.
        box = (int(r["Roi.X1"]), int(r["Roi.Y1"]), int(r["Roi.X2"]), int(r["Roi.Y2"])) if roi else None
        items.append((folder / r["Filename"], box))
        labels.append(int(r["ClassId"]))
    return items, labels


def _gtsrb_decode(located, p: GTSRBParams) -> Arrays:
    classes, test_dir, test_csv = located
    items, ytr = [], []
    for d in classes:
        gt = d / f"GT-{d.name}.csv"
        if gt.is_file():
            it, lab = _gtsrb_rows(_read_gt_csv(gt), d, p.roi)
        else:  # an unannotated class folder: the folder number is the class, no ROI
            if p.roi:
                raise DatasetMissing(f"gtsrb: roi=true needs {gt} (the per-class annotation CSV)")
            files = sorted(d.glob("*.ppm"))
            it, lab = [(f, None) for f in files], [int(d.name)] * len(files)
        items += it
        ytr += lab
    rows = _read_gt_csv(test_csv)
    if rows and "ClassId" not in rows[0]:
        raise DatasetMissing(
            f"gtsrb: {test_csv} has no ClassId column (GT-final_test.test.csv from the image archive "
            f"carries no labels); use GT-final_test.csv from GTSRB_Final_Test_GT.zip"
        )
    titems, yte = _gtsrb_rows(rows, test_dir, p.roi)
    xtr = np.stack(_pool_map(_gtsrb_image, items))
    xte = np.stack(_pool_map(_gtsrb_image, titems))
    return xtr, np.asarray(ytr, np.int64), xte, np.asarray(yte, np.int64)


def _gtsrb_fetch(root: Path) -> None:
    from torchvision.datasets import GTSRB as TVGTSRB

    TVGTSRB(str(root), split="train", download=True)  # -> root/gtsrb/GTSRB/Training/000NN
    TVGTSRB(str(root), split="test", download=True)  # -> root/gtsrb/GTSRB/Final_Test/Images, root/gtsrb/GT-final_test.csv


GTSRB_SOURCE = Source(
    GTSRB,
    "  GTSRB/Final_Training/Images/000NN/*.ppm with GTSRB/Final_Training/Images/000NN/GT-000NN.csv (NN = 00..42)\n"
    "  GTSRB/Final_Test/Images/*.ppm and GT-final_test.csv (with ClassId; from GTSRB_Final_Test_GT.zip),\n"
    "    in GTSRB/Final_Test/Images/, GTSRB/Final_Test/, GTSRB/ or the root\n"
    "  (torchvision's layout gtsrb/GTSRB/Training, gtsrb/GTSRB/Final_Test/Images, gtsrb/GT-final_test.csv\n"
    "   and BackdoorBench's Train/000NN, Test/GT-final_test.csv are accepted too)",
    "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/",
    find=_gtsrb_find,
    decode=_gtsrb_decode,
    fetch=_gtsrb_fetch,
)


@register_dataset("gtsrb", info=GTSRB, params=GTSRBParams)
def load_gtsrb(root, roi: bool = False, **params):
    """GTSRB (39,209/12,630 traffic-sign images, 43 classes), resized to 32x32, no flip."""
    return _load(GTSRB_SOURCE, root, GTSRBParams(roi=roi, **params), key={"roi": roi})


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet: JPEG folders and a tab-separated validation annotation file

def _tiny_find(root: Path):
    d = root / "tiny-imagenet-200"
    if not ((d / "wnids.txt").is_file() and (d / "train").is_dir() and (d / "val").is_dir()):
        return None
    has_ann = (d / "val" / "val_annotations.txt").is_file() and (d / "val" / "images").is_dir()
    # BackdoorBench's download moves val/images/* into val/<wnid>/ and deletes the annotations
    has_folders = any((d / "val" / w).is_dir() for w in (d / "wnids.txt").read_text().split()[:1])
    return d if has_ann or has_folders else None


def _tiny_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")  # a few Tiny-ImageNet JPEGs are greyscale
        if im.size != (TINY.size, TINY.size):
            im = im.resize((TINY.size, TINY.size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _tiny_decode(d: Path, p: FileParams) -> Arrays:
    wnids = sorted((d / "wnids.txt").read_text().split())  # sorted: ImageFolder's class order
    index = {w: i for i, w in enumerate(wnids)}
    train, ytr = [], []
    for w in wnids:
        files = sorted((d / "train" / w / "images").glob("*.JPEG"))
        train += files
        ytr += [index[w]] * len(files)
    val, yte = [], []
    ann = d / "val" / "val_annotations.txt"
    if ann.is_file():
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                val.append(d / "val" / "images" / parts[0])
                yte.append(index[parts[1]])
    else:
        for w in wnids:
            files = sorted((d / "val" / w).rglob("*.JPEG"))
            val += files
            yte += [index[w]] * len(files)
    xtr = np.stack(_pool_map(_tiny_image, train))
    xte = np.stack(_pool_map(_tiny_image, val))
    return xtr, np.asarray(ytr, np.int64), xte, np.asarray(yte, np.int64)


TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_SOURCE = Source(
    TINY,
    "  tiny-imagenet-200/wnids.txt\n"
    "  tiny-imagenet-200/train/<wnid>/images/*.JPEG\n"
    "  tiny-imagenet-200/val/images/*.JPEG and tiny-imagenet-200/val/val_annotations.txt",
    TINY_URL,
    find=_tiny_find,
    decode=_tiny_decode,
    # md5 of the official zip, as BackdoorBench's utils/dataset/Tiny.py checks it
    fetch=_tv_archive(TINY_URL, "90528d7ca1a48142e341f4ef8d21d0de"),
)


@register_dataset("tiny-imagenet", info=TINY, params=FileParams)
def load_tiny_imagenet(root, **params):
    """Tiny-ImageNet-200 (100k/10k, 64x64 RGB, 200 classes; the labelled val set is the test set)."""
    return _load(TINY_SOURCE, root, FileParams(**params))


# ---------------------------------------------------------------------------------------------
# MNIST: idx binary files, optionally gzipped

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


MNIST_SOURCE = Source(
    MNIST,
    "  train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte\n"
    "  (each may be .gz), directly in the root or in MNIST/raw/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    find=_mnist_find,
    decode=_mnist_decode,
    fetch=_mnist_fetch,
)


@register_dataset("mnist", info=MNIST, params=FileParams)
def load_mnist(root, **params):
    """MNIST (60k/10k digits), padded from 28x28 to 32x32, 1 channel, no flip."""
    return _load(MNIST_SOURCE, root, FileParams(**params))


SOURCES = {s.info.name: s for s in (CIFAR10_SOURCE, CIFAR100_SOURCE, GTSRB_SOURCE, TINY_SOURCE, MNIST_SOURCE)}


def dataset_problem(name: str, root: str | Path | None) -> str | None:
    """Why ``name`` cannot be loaded from ``root`` without a download, or None when it can.

    For spec validation before any compute: checks the decoded cache in its default place
    and the source files, reads nothing.
    """
    source = SOURCES.get(name)
    if source is None:
        return None  # generated datasets (synthetic) need no files
    if root is None:
        return f"dataset '{name}' needs a data root"
    root = Path(root).expanduser()
    cache = root / ".bdgrid-cache"
    if cache.is_dir() and any(cache.glob(f"{name}-*-xtr.npy")):
        return None
    if source.find(root) is not None:
        return None
    return _missing_message(source, root, "files missing")
