"""Tiny-ImageNet-200: JPEG folders and a tab-separated validation annotation file.

Labels are the wnids in sorted order (what BackdoorBench's ``ImageFolder`` gives), 64x64;
normalisation (0.4802, 0.4481, 0.3975) / (0.2302, 0.2265, 0.2262) as BackdoorBench; random
crop with padding 4, no flip. The labelled val set is the test set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from defense.data import DatasetInfo, register_dataset
from defense.data.files import (Arrays, FileParams, Source, bad_file, load_source, pool_map, read_rgb,
                                register_source, tv_archive)

TINY = DatasetInfo("tiny-imagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), flip=False, pad=4)


def _tiny_find(root: Path):
    d = root / "tiny-imagenet-200"
    if not ((d / "wnids.txt").is_file() and (d / "train").is_dir() and (d / "val").is_dir()):
        return None
    has_ann = (d / "val" / "val_annotations.txt").is_file() and (d / "val" / "images").is_dir()
    # BackdoorBench's download moves val/images/* into val/<wnid>/ and deletes the annotations
    has_folders = any((d / "val" / w).is_dir() for w in (d / "wnids.txt").read_text().split()[:1])
    return d if has_ann or has_folders else None


def _tiny_image(path: Path) -> np.ndarray:
    return read_rgb(path, TINY.size, "JPEG", "val_annotations.txt")  # a few Tiny-ImageNet JPEGs are greyscale


def _tiny_decode(d: Path, p: FileParams) -> Arrays:
    wnids = sorted((d / "wnids.txt").read_text(errors="replace").split())  # sorted: ImageFolder's class order
    if not 0 < len(wnids) <= TINY.num_classes or len(set(wnids)) != len(wnids):
        raise bad_file(d / "wnids.txt", f"1..{TINY.num_classes} distinct class ids (wnids), one a line",
                       f"{len(wnids)} ids, {len(set(wnids))} distinct")
    index = {w: i for i, w in enumerate(wnids)}
    train, ytr = [], []
    for w in wnids:
        files = sorted((d / "train" / w / "images").glob("*.JPEG"))
        train += files
        ytr += [index[w]] * len(files)
    val, yte = [], []
    ann = d / "val" / "val_annotations.txt"
    if ann.is_file():
        for n, line in enumerate(ann.read_text(errors="replace").splitlines(), start=1):
            parts = line.split("\t")
            if len(parts) >= 2:
                if parts[1] not in index:
                    raise bad_file(ann, "a class id listed in wnids.txt in the second column",
                                   f"'{parts[1]}' on line {n}")
                val.append(d / "val" / "images" / parts[0])
                yte.append(index[parts[1]])
    else:
        for w in wnids:
            files = sorted((d / "val" / w).rglob("*.JPEG"))
            val += files
            yte += [index[w]] * len(files)
    xtr = np.stack(pool_map(_tiny_image, train))
    xte = np.stack(pool_map(_tiny_image, val))
    return xtr, np.asarray(ytr, np.int64), xte, np.asarray(yte, np.int64)


TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_SOURCE = register_source(Source(
    TINY,
    "  tiny-imagenet-200/wnids.txt\n"
    "  tiny-imagenet-200/train/<wnid>/images/*.JPEG\n"
    "  tiny-imagenet-200/val/images/*.JPEG and tiny-imagenet-200/val/val_annotations.txt",
    TINY_URL,
    find=_tiny_find,
    decode=_tiny_decode,
    # md5 of the official zip, as BackdoorBench's utils/dataset/Tiny.py checks it
    fetch=tv_archive(TINY_URL, "90528d7ca1a48142e341f4ef8d21d0de"),
))


@register_dataset("tiny-imagenet", info=TINY, params=FileParams)
def load_tiny_imagenet(root, **params):
    """Tiny-ImageNet-200 (100k/10k, 64x64 RGB, 200 classes; the labelled val set is the test set)."""
    return load_source(TINY_SOURCE, root, FileParams(**params))
