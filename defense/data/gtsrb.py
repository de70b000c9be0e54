"""GTSRB: PPM images with semicolon-separated annotation CSVs (39,209 train / 12,630 test, 43 classes).

As BackdoorBench's GTSRB class: the whole image resized to 32x32 with PIL bilinear (what
``transforms.Resize`` does on PIL images), no ROI crop (``roi=True`` crops to the annotated
sign box first), no normalisation (mean 0, std 1), random crop with padding 4 and no flip
(a mirrored sign can mean another sign).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from defense.data import DatasetInfo, register_dataset
from defense.data.files import (Arrays, DatasetMissing, FileParams, Source, bad_file, check_labels, load_source,
                                pool_map, read_rgb, register_source)

GTSRB = DatasetInfo("gtsrb", 43, 3, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), flip=False, pad=4)


@dataclass
class GTSRBParams(FileParams):
    roi: bool = False  # crop each image to its annotated sign box before resizing (BackdoorBench: no)


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
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    except (UnicodeDecodeError, csv.Error) as e:
        raise bad_file(path, "a semicolon-separated GTSRB annotation CSV", f"{type(e).__name__}: {e}") from None


def _gtsrb_image(item: tuple[Path, tuple[int, int, int, int] | None]) -> np.ndarray:
    path, box = item
    return read_rgb(path, GTSRB.size, "PPM", "its annotation CSV", box)


def _gtsrb_rows(rows: list[dict], folder: Path, roi: bool, path: Path) -> tuple[list, list[int]]:
    """(image, crop box) items and labels of the annotation CSV ``path``, read from ``rows``."""
    items, labels = [], []
    for n, r in enumerate(rows, start=2):  # line 1 is the header
        try:
            # The ROI box as a PIL crop box (x1, y1, x2, y2), x2/y2 exclusive; the sign sits in
            # a margin of about 10% of the image, so the one-pixel convention does not matter.
            box = (int(r["Roi.X1"]), int(r["Roi.Y1"]), int(r["Roi.X2"]), int(r["Roi.Y2"])) if roi else None
            items.append((folder / r["Filename"], box))
            labels.append(int(r["ClassId"]))
        except (KeyError, TypeError, ValueError) as e:
            raise bad_file(path, "Filename, Roi.X1..Roi.Y2 and an integer ClassId on every line",
                           f"line {n}: {type(e).__name__}: {e}") from None
    check_labels(np.asarray(labels, np.int64), GTSRB.num_classes, path)
    return items, labels


def _gtsrb_decode(located, p: GTSRBParams) -> Arrays:
    classes, test_dir, test_csv = located
    items, ytr = [], []
    for d in classes:
        gt = d / f"GT-{d.name}.csv"
        if gt.is_file():
            it, lab = _gtsrb_rows(_read_gt_csv(gt), d, p.roi, gt)
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
    titems, yte = _gtsrb_rows(rows, test_dir, p.roi, test_csv)
    xtr = np.stack(pool_map(_gtsrb_image, items))
    xte = np.stack(pool_map(_gtsrb_image, titems))
    return xtr, np.asarray(ytr, np.int64), xte, np.asarray(yte, np.int64)


def _gtsrb_fetch(root: Path) -> None:
    from torchvision.datasets import GTSRB as TVGTSRB

    TVGTSRB(str(root), split="train", download=True)  # -> root/gtsrb/GTSRB/Training/000NN
    TVGTSRB(str(root), split="test", download=True)  # -> root/gtsrb/GTSRB/Final_Test/Images, root/gtsrb/GT-final_test.csv


GTSRB_SOURCE = register_source(Source(
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
))


@register_dataset("gtsrb", info=GTSRB, params=GTSRBParams)
def load_gtsrb(root, roi: bool = False, **params):
    """GTSRB (39,209/12,630 traffic-sign images, 43 classes), resized to 32x32, no flip."""
    return load_source(GTSRB_SOURCE, root, GTSRBParams(roi=roi, **params), key={"roi": roi})
