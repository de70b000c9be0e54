"""Bad dataset files, written here in the real on-disk formats: each is refused with one
``DatasetFileError`` naming the file, what was expected and what was found, before anything is
cached or trained; and the decoded cache follows its source files when they change."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from defense.data import load_dataset
from defense.data.files import DatasetFileError, DatasetMissing
from test_loaders import make_cifar10, make_gtsrb, make_mnist, make_tiny, write_cifar_batch, write_idx

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(1)


def refused(name: str, root: Path, *parts: str) -> str:
    """Loading ``name`` from ``root`` raises one DatasetFileError whose message holds ``parts``;
    nothing is left in the cache."""
    with pytest.raises(DatasetFileError) as e:
        load_dataset(name, root, download=False)
    msg = str(e.value)
    assert msg.startswith("bad dataset file ") and "expected" in msg and "found" in msg
    for p in parts:
        assert p in msg, msg
    assert not list(root.rglob("*.npy"))
    assert isinstance(e.value, DatasetMissing)  # what the CLI already prints without a traceback
    return msg


# --- MNIST (idx) -----------------------------------------------------------------------------

def test_mnist_images_of_20x20_are_refused_not_padded(tmp_path):
    make_mnist(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte"
    write_idx(f, RNG.integers(0, 256, (7, 20, 20), dtype=np.uint8), gz=False)
    refused("mnist", tmp_path, str(f), "28 x 28", "dims 7 x 20 x 20")


@pytest.mark.parametrize("what", ["magic", "truncated", "gz-truncated", "empty"])
def test_mnist_bad_idx_files(tmp_path, what):
    make_mnist(tmp_path, gz=what.startswith("gz"))
    f = tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if what.startswith("gz") else ""))
    blob = f.read_bytes()
    if what == "magic":
        f.write_bytes(b"\x1f\x8b" + blob[2:])  # gzip's magic in a plain file: not idx
        refused("mnist", tmp_path, str(f), "magic 1f8b0801", "not an idx file")
    elif what == "truncated":
        f.write_bytes(blob[:-2])
        refused("mnist", tmp_path, str(f), "4 values", "2 values", "truncated")
    elif what == "gz-truncated":
        f.write_bytes(blob[: len(blob) // 2])
        refused("mnist", tmp_path, str(f), "readable (optionally gzipped) idx file")
    else:
        f.write_bytes(b"")
        refused("mnist", tmp_path, str(f), "(empty file)")


def test_mnist_counts_that_disagree_and_labels_out_of_range(tmp_path):
    make_mnist(tmp_path)
    f = tmp_path / "train-labels-idx1-ubyte"
    write_idx(f, RNG.integers(0, 10, 6).astype(np.uint8), gz=False)  # 7 images, 6 labels
    refused("mnist", tmp_path, str(f), "7 labels, one per image in train-images-idx3-ubyte", "found 6 labels")
    write_idx(f, np.array([1, 2, 3, 10, 4, 5, 6], np.uint8), gz=False)
    refused("mnist", tmp_path, str(f), "class labels 0..9", "label 10 at position 3")


# --- CIFAR (pickle batches) ------------------------------------------------------------------

def test_cifar_label_200_is_refused_before_caching(tmp_path):
    x, y, *_ = make_cifar10(tmp_path)
    f = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    y3 = RNG.integers(0, 10, 6)
    y3[4] = 200
    write_cifar_batch(f, RNG.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), y3, "labels", bytes_keys=False)
    refused("cifar10", tmp_path, str(f), "class labels 0..9", "label 200 at position 4")


@pytest.mark.parametrize("what", ["truncated", "shape", "count", "list", "keys"])
def test_cifar_bad_batches(tmp_path, what):
    make_cifar10(tmp_path)
    f = tmp_path / "cifar-10-batches-py" / "test_batch"
    x = RNG.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    if what == "truncated":
        f.write_bytes(f.read_bytes()[:5000])
        refused("cifar10", tmp_path, str(f), "CIFAR python batch", "truncated")
    elif what == "shape":
        with open(f, "wb") as fh:
            pickle.dump({"data": x.reshape(5, 3, 1024)[:, 0], "labels": [0] * 5}, fh, protocol=2)  # greyscale rows
        refused("cifar10", tmp_path, str(f), "N x 3072", "shape (5, 1024)")
    elif what == "count":
        write_cifar_batch(f, x, np.zeros(4, int), "labels", bytes_keys=True)
        refused("cifar10", tmp_path, str(f), "5 'labels', one per image", "found 4")
    elif what == "list":
        with open(f, "wb") as fh:
            pickle.dump([1, 2, 3], fh, protocol=2)
        refused("cifar10", tmp_path, str(f), "a pickled list")
    else:
        write_cifar_batch(f, x, np.zeros(5, int), "fine_labels", bytes_keys=False)  # a CIFAR-100 batch
        refused("cifar10", tmp_path, str(f), "keys 'data' and 'labels'", "'fine_labels'")


# --- GTSRB and Tiny-ImageNet (image folders) -------------------------------------------------

def test_gtsrb_truncated_image_and_bad_class_ids(tmp_path):
    make_gtsrb(tmp_path)
    img = tmp_path / "GTSRB" / "Final_Training" / "Images" / "00001" / "00000_00001.ppm"
    img.write_bytes(img.read_bytes()[:200])
    refused("gtsrb", tmp_path, str(img), "a readable PPM image")
    img.unlink()
    refused("gtsrb", tmp_path, str(img), "the image its annotation CSV lists", "no such file")

    make_gtsrb(tmp_path / "b")
    gt = tmp_path / "b" / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.csv"
    gt.write_text(gt.read_text().replace(";42\n", ";43\n"))
    refused("gtsrb", tmp_path / "b", str(gt), "class labels 0..42", "label 43")
    gt.write_text(gt.read_text().replace(";43\n", ";x\n"))
    refused("gtsrb", tmp_path / "b", str(gt), "integer ClassId", "line 4")


def test_tiny_imagenet_unknown_class_and_truncated_jpeg(tmp_path):
    make_tiny(tmp_path)
    d = tmp_path / "tiny-imagenet-200"
    ann = d / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good.replace("n02000000", "n00000042", 1))
    refused("tiny-imagenet", tmp_path, str(ann), "listed in wnids.txt", "'n00000042' on line")
    ann.write_text(good)
    jpg = next((d / "train").rglob("*.JPEG"))
    jpg.write_bytes(jpg.read_bytes()[:100])
    refused("tiny-imagenet", tmp_path, str(jpg), "a readable JPEG image")


# --- the decoded cache follows its sources ---------------------------------------------------

def _touch_later(f: Path) -> None:
    """A repair happens seconds after the first decode; say so explicitly, so the test does not
    depend on the file system's timestamp resolution."""
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_cache_is_rebuilt_when_a_source_file_changes(tmp_path):
    x, y, *_ = make_cifar10(tmp_path)
    first, _ = load_dataset("cifar10", tmp_path, download=False)
    assert torch.equal(first.x, torch.from_numpy(x))
    f = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    x1 = RNG.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(f, x1, np.full(6, 7), "labels", bytes_keys=False)  # same size as before
    _touch_later(f)
    second, _ = load_dataset("cifar10", tmp_path, download=False)
    assert torch.equal(second.x[:6], torch.from_numpy(x1)) and second.y[:6].tolist() == [7] * 6
    assert torch.equal(second.x[6:], first.x[6:])
    third, _ = load_dataset("cifar10", tmp_path, download=False)  # and the new decode is cached
    assert torch.equal(third.x, second.x)


def test_a_repaired_batch_is_decoded_again_not_the_old_cache(tmp_path):
    """The issue's case: a bad batch, the user repairs it, the repaired data must be used."""
    make_cifar10(tmp_path)
    f = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    write_cifar_batch(f, RNG.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), np.full(6, 200), "labels", False)
    refused("cifar10", tmp_path, str(f))
    x2 = RNG.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(f, x2, np.full(6, 3), "labels", bytes_keys=False)
    _touch_later(f)
    train, _ = load_dataset("cifar10", tmp_path, download=False)
    assert torch.equal(train.x[6:12], torch.from_numpy(x2)) and train.y[6:12].tolist() == [3] * 6


def test_a_cache_holding_bad_labels_is_decoded_again(tmp_path):
    """A cache written by an older bdgrid, which let a label 200 through, is not used."""
    _, y, *_ = make_cifar10(tmp_path)
    load_dataset("cifar10", tmp_path, download=False)
    ytr = next((tmp_path / ".bdgrid-cache").glob("cifar10-*-ytr.npy"))
    bad = np.load(ytr)
    bad[0] = 200
    np.save(ytr, bad)
    train, _ = load_dataset("cifar10", tmp_path, download=False)
    assert train.y.tolist() == y.tolist()


def test_cache_without_sources_is_still_used_and_old_caches_are_refreshed(tmp_path):
    x, *_ = make_mnist(tmp_path)
    load_dataset("mnist", tmp_path, download=False)
    manifest = next((tmp_path / ".bdgrid-cache").glob("mnist-*-sources.json"))
    manifest.unlink()  # as a cache from before source fingerprints
    train, _ = load_dataset("mnist", tmp_path, download=False)
    assert manifest.exists() and np.array_equal(train.x[:, 0, 2:30, 2:30].numpy(), x)
    for f in tmp_path.glob("*-ubyte"):
        f.unlink()  # only the cache is left (e.g. copied to a cluster node)
    again, _ = load_dataset("mnist", tmp_path, download=False)
    assert torch.equal(again.x, train.x)


# --- the CLI: one message, no traceback, no training -----------------------------------------

def test_trial_on_a_bad_file_prints_one_message_and_trains_nothing(tmp_path):
    make_mnist(tmp_path, n=40, n_test=20)
    f = tmp_path / "train-images-idx3-ubyte"
    write_idx(f, RNG.integers(0, 256, (40, 20, 20), dtype=np.uint8), gz=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="500")  # rich wraps at 80
    r = subprocess.run([sys.executable, "-m", "grid.cli", "trial", "--dataset", "mnist", "--data-root", str(tmp_path),
                        "--data-param", "download=false", "--device", "cpu", "--epochs", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    assert f"bad dataset file {f}: expected MNIST images of 28 x 28 pixels" in r.stderr
    assert "epoch" not in (r.stderr + r.stdout).lower()
