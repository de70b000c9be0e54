"""The common path of the file-backed datasets: cache -> local files -> download -> clear error.

Each dataset module (``cifar``, ``gtsrb``, ``tiny_imagenet``, ``mnist``) describes its files with
a ``Source`` and registers it here. ``load_source`` reads the standard on-disk format from a
local ``root``, decodes it once into uint8 arrays and caches them as ``.npy`` (default
``<root>/.bdgrid-cache``), so every later load is a few ``np.load`` calls. Where the files are
missing and ``download`` is on, the torchvision download helpers fetch them into ``root``; an
offline machine gets, within a few seconds, an error naming the exact files expected and where
to put them. ``dataset_problem`` tells spec validation, before any compute, whether a dataset
is there.

Per-dataset conventions (normalisation, augmentation, resizing) follow BackdoorBench
(``utils/aggregate_block/dataset_and_transform_generate.py``: ``get_input_shape``,
``get_dataset_normalization``, ``get_transform``); each module's docstring states its own. In
short: random crop with padding 4 for every dataset, horizontal flip for CIFAR-10 only
(BackdoorBench's ``get_transform`` flips only for ``cifar10``; for GTSRB it would also mirror
the meaning of some signs).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
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

from defense.data import Data, DatasetInfo

# bump when the decoded arrays of any loader change, so stale caches are not reused
CACHE_FORMAT = 1
PROBE_TIMEOUT_S = 4.0  # offline machines must fail fast, not hang in DNS / connect
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0  # a stalled download raises instead of hanging forever


class DatasetMissing(FileNotFoundError):
    """The files of a dataset are not under its root (and could not be downloaded)."""


class DatasetFileError(DatasetMissing, ValueError):
    """A dataset file is there but does not hold what its format says: truncated, wrong magic,
    wrong image size, labels out of range, counts that disagree. The message names the file,
    what was expected and what was found.

    A ``DatasetMissing`` (so a ``FileNotFoundError``) on purpose: every caller that turns a
    missing dataset into one message (``bdgrid trial`` and ``bdgrid attacks`` catch
    ``FileNotFoundError``) does the same for a bad file, with no traceback; a ``ValueError``
    for callers of the format readers (``mnist.read_idx``)."""


def bad_file(path: Path | str, expected: str, found: str) -> DatasetFileError:
    return DatasetFileError(f"bad dataset file {path}: expected {expected}; found {found}")


def read_rgb(path: Path, size: int, kind: str, listed_by: str, box: tuple | None = None) -> np.ndarray:
    """One image file as uint8 (3, size, size): RGB (greyscale JPEGs too), cropped to ``box`` when
    given, resized with PIL bilinear (what BackdoorBench's ``transforms.Resize`` does on PIL images;
    PIL returns an image already of that size unchanged). A missing or unreadable file is one
    ``DatasetFileError`` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if box is not None:
                im = im.crop(box)
            im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except FileNotFoundError:
        raise bad_file(path, f"the image {listed_by} lists", "no such file") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, "image file is truncated"
        raise bad_file(path, f"a readable {kind} image", f"{type(e).__name__}: {e}") from None


def check_labels(y: np.ndarray, num_classes: int, path: Path | str) -> np.ndarray:
    """``y`` as int64 class labels, or ``DatasetFileError`` naming ``path`` and the first label
    outside 0..num_classes-1 (a CIFAR label 200 must not reach training)."""
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise bad_file(path, "a 1-d list of integer class labels", f"{y.dtype} values of shape {y.shape}")
    out = (y < 0) | (y >= num_classes)
    if out.any():
        i = int(np.argmax(out))
        raise bad_file(path, f"class labels 0..{num_classes - 1}", f"label {int(y[i])} at position {i}"
                             f" ({int(out.sum())} label(s) out of range)")
    return y.astype(np.int64)


def check_arrays(info: DatasetInfo, arrays: Arrays, where: Path | str) -> Arrays:
    """The decoded arrays have the dataset's shape, matching counts and labels in range; the
    last line of defence behind each decoder's own per-file checks."""
    c, s = info.channels, info.size
    for part, x, y in (("train", arrays[0], arrays[1]), ("test", arrays[2], arrays[3])):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise bad_file(where, f"{info.name} {part} images as uint8 N x {c} x {s} x {s}",
                           f"{x.dtype} of shape {' x '.join(map(str, x.shape))}")
        if len(y) != len(x):
            raise bad_file(where, f"one {part} label per image ({len(x)})", f"{len(y)} labels")
        check_labels(y, info.num_classes, where)
    return arrays


@dataclass
class FileParams:
    download: bool = True  # fetch with torchvision's download helpers when files are missing
    cache: bool = True  # write/read the decoded arrays as .npy
    cache_dir: str | None = None  # default: <root>/.bdgrid-cache



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


def _sources_path(paths: dict[str, Path]) -> Path:
    return paths["xtr"].with_name(paths["xtr"].name.replace("-xtr.npy", "-sources.json"))


def _stat_tree(p: Path, out: dict) -> None:
    """[size, mtime ns] of every file below folder ``p`` (hidden entries skipped), by scandir:
    a GTSRB-sized folder has 50,000 files and ``Path.rglob`` + ``stat`` costs several times more."""
    with os.scandir(p) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                _stat_tree(Path(e.path), out)
            elif e.is_file():
                st = e.stat()
                out[e.path] = [st.st_size, st.st_mtime_ns]


def fingerprint(located) -> dict[str, list[int]]:
    """{file: [size, mtime in ns]} of every file a decode read: ``located`` is whatever
    ``Source.find`` returned (paths, folders, tuples and lists of them; a folder counts with all
    files below it). What the decoded cache was made from (sizes and times, as make and rsync
    judge change; hashing 150 MB of CIFAR at every load would cost more than decoding it)."""
    out: dict[str, list[int]] = {}
    todo = [located]
    while todo:
        item = todo.pop()
        if isinstance(item, (list, tuple)):
            todo.extend(item)
        elif Path(item).is_dir():
            _stat_tree(Path(item), out)
        else:
            st = Path(item).stat()
            out[str(item)] = [st.st_size, st.st_mtime_ns]
    return out


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


def _write_cache(paths: dict[str, Path], arrays: Arrays, sources: dict) -> None:
    try:
        next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
        for (k, p), a in zip(paths.items(), arrays):
            tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, a, allow_pickle=False)
            os.replace(tmp, p)  # atomic: a reader never sees half a file
        m = _sources_path(paths)  # written last: a cache without it is rebuilt when its sources are there
        tmp = m.with_name(f".{m.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sources, sort_keys=True))
        os.replace(tmp, m)
    except OSError as e:  # e.g. a read-only shared dataset folder: still usable, just slower
        warnings.warn(f"could not write the dataset cache {paths['xtr'].parent}: {e}")


def _cache_current(source: Source, paths: dict[str, Path], arrays: Arrays, located) -> bool:
    """Whether the cached arrays may be used: they pass ``check_arrays`` and, where the source
    files are there, were decoded from these very files (same sizes and times). A cache without
    sources (only the cache was copied) is used as it is."""
    try:
        check_arrays(source.info, arrays, paths["xtr"].parent)
    except DatasetFileError:
        return False  # e.g. decoded by an older bdgrid that let a label 200 through: decode again
    if located is None:
        return True
    try:
        recorded = json.loads(_sources_path(paths).read_text())
    except (OSError, ValueError):
        return False  # a cache from before fingerprints: decode once more and record them
    return recorded == fingerprint(located)


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


def load_source(source: Source, root: Path | None, p: FileParams, key: dict | None = None) -> tuple[Data, Data]:
    """The train and test ``Data`` of ``source`` under ``root`` (see the module docstring)."""
    if root is None:
        raise DatasetMissing(
            f"dataset '{source.info.name}' needs a root folder (--data-root / data_root).\n"
            f"Expected inside it:\n{source.layout}"
        )
    root = Path(root).expanduser()
    paths = _cache_paths(source, root, key or {}, p.cache_dir)
    arrays = _read_cache(paths) if p.cache else None
    located = source.find(root)
    if arrays is not None and not _cache_current(source, paths, arrays, located):
        arrays = None
    if arrays is None:
        if located is None:
            if not p.download:
                raise DatasetMissing(_missing_message(source, root, "files missing (download=false)"))
            _download(source, root)
            located = source.find(root)
            if located is None:
                raise DatasetMissing(_missing_message(source, root, "files still missing after the download"))
        arrays = check_arrays(source.info, source.decode(located, p), root)
        if p.cache:
            _write_cache(paths, arrays, fingerprint(located))
    xtr, ytr, xte, yte = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return Data(xtr, ytr.long(), source.info), Data(xte, yte.long(), source.info)


def pool_map(fn: Callable, items: list) -> list:
    """Decode image files in threads (PIL releases the GIL while decoding)."""
    if len(items) < 256:
        return [fn(i) for i in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        return list(ex.map(fn, items, chunksize=64))


def tv_archive(url: str, md5: str | None) -> Callable[[Path], None]:
    def fetch(root: Path) -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(url, str(root), md5=md5)

    return fetch


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    """Make ``source`` known to ``dataset_problem`` (spec validation)."""
    SOURCES[source.info.name] = source
    return source


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
