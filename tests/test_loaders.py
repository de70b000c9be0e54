"""Each real-dataset loader on tiny files written here in the exact on-disk format.

Formats: CIFAR python pickle batches (dict with data (N, 3072) uint8 and labels), GTSRB PPM
images with semicolon CSVs, Tiny-ImageNet JPEGs with wnids.txt / val_annotations.txt, MNIST
idx binaries (plain and gzipped). Nothing here touches the network: the download path is
exercised against a closed local port.
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defense.data import dataset_info, load_dataset
from defense.data import files, mnist
from defense.data.files import DatasetFileError, DatasetMissing, dataset_problem
from defense.data.mnist import read_idx

RNG = np.random.default_rng(0)


# --- writers for the on-disk formats ------------------------------------------------------

def write_cifar_batch(path: Path, x: np.ndarray, y: np.ndarray, label_key: str, bytes_keys: bool):
    """A CIFAR "python version" batch: x (N, 3, 32, 32) stored as rows of 1024 R, G, B values."""
    d = {"batch_label": "test batch", label_key: [int(v) for v in y],
         "data": x.reshape(len(x), 3072), "filenames": [f"img_{i}.png" for i in range(len(x))]}
    if bytes_keys:  # the real files unpickle with bytes keys under encoding="bytes"
        d = {k.encode(): v for k, v in d.items()}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)  # protocol 2: what Python 2's cPickle wrote


def make_cifar10(root: Path, per_batch: int = 6, n_test: int = 5):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = RNG.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = RNG.integers(0, 10, per_batch)
        write_cifar_batch(d / f"data_batch_{i}", x, y, "labels", bytes_keys=False)
        xs.append(x)
        ys.append(y)
    xt = RNG.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    yt = RNG.integers(0, 10, n_test)
    write_cifar_batch(d / "test_batch", xt, yt, "labels", bytes_keys=False)
    (d / "batches.meta").write_bytes(b"")  # present in the real folder, not read
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def write_idx(path: Path, a: np.ndarray, gz: bool):
    code = {np.uint8: 0x08}[a.dtype.type]
    blob = struct.pack(">BBBB", 0, 0, code, a.ndim) + struct.pack(f">{a.ndim}i", *a.shape) + a.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def make_mnist(d: Path, n: int = 7, n_test: int = 4, gz: bool = False):
    d.mkdir(parents=True, exist_ok=True)
    x = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = RNG.integers(0, 10, n).astype(np.uint8)
    xt = RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    yt = RNG.integers(0, 10, n_test).astype(np.uint8)
    for name, a in [("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                    ("t10k-images-idx3-ubyte", xt), ("t10k-labels-idx1-ubyte", yt)]:
        write_idx(d / name, a, gz)
    return x, y, xt, yt


GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def make_gtsrb(root: Path, classes=(0, 1, 42), per_class: int = 2, n_test: int = 3):
    """The official layout. Each image is w x h with the sign box [x1, x2) x [y1, y2) in one
    colour and a different border colour, so both the resize and the ROI crop are visible."""
    train_dir = root / "GTSRB" / "Final_Training" / "Images"
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    expect = {"train": [], "test": []}

    def image(path: Path, cls: int, i: int):
        w, h = 40 + i, 36 + 2 * i
        x1, y1, x2, y2 = 4, 3, w - 5, h - 4
        inner = np.array([10 + 5 * cls, 200 - 3 * i, 7 * i % 256], np.uint8)
        border = np.array([255, 0, 128], np.uint8)
        a = np.empty((h, w, 3), np.uint8)
        a[:] = border
        a[y1:y2, x1:x2] = inner
        Image.fromarray(a).save(path)  # .ppm suffix: PIL writes binary PPM (P6)
        return f"{path.name};{w};{h};{x1};{y1};{x2};{y2};{cls}\n", a, inner

    for cls in classes:
        d = train_dir / f"{cls:05d}"
        d.mkdir(parents=True)
        lines = [GT_HEADER]
        for i in range(per_class):
            line, a, inner = image(d / f"00000_{i:05d}.ppm", cls, i)
            lines.append(line)
            expect["train"].append((cls, a, inner))
        (d / f"GT-{cls:05d}.csv").write_text("".join(lines))
    lines = [GT_HEADER]
    for i in range(n_test):
        cls = classes[i % len(classes)]
        line, a, inner = image(test_dir / f"{i:05d}.ppm", cls, i)
        lines.append(line)
        expect["test"].append((cls, a, inner))
    (test_dir / "GT-final_test.csv").write_text("".join(lines))
    return expect


def make_tiny(root: Path, wnids=("n09999999", "n01443537", "n02000000"), per_class: int = 2):
    """wnids.txt deliberately unsorted: labels follow the sorted order (ImageFolder's)."""
    d = root / "tiny-imagenet-200"
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    expect = {"train": [], "val": []}

    def jpeg(path: Path, k: int, grey: bool = False):
        a = np.empty((64, 64, 3), np.uint8)
        a[:] = np.array([(40 * k) % 256, (90 + 30 * k) % 256, (200 - 20 * k) % 256], np.uint8)
        a[:32, :32] = 255 - a[:32, :32]  # some structure, blocks aligned to JPEG's 8x8 grid
        if grey:
            Image.fromarray(a[:, :, 0], mode="L").save(path, quality=100)
            a = np.repeat(a[:, :, :1], 3, axis=2)
        else:
            Image.fromarray(a).save(path, quality=100, subsampling=0)
        return a

    k = 0
    for w in wnids:
        (d / "train" / w / "images").mkdir(parents=True)
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(per_class):
            expect["train"].append((w, jpeg(d / "train" / w / "images" / f"{w}_{i}.JPEG", k, grey=(k == 1))))
            k += 1
    lines = []
    for i, w in enumerate(list(wnids) * 2):
        name = f"val_{i}.JPEG"
        expect["val"].append((w, jpeg(d / "val" / "images" / name, k)))
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
        k += 1
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (d / "test" / "images").mkdir(parents=True)  # unlabelled in the real archive; ignored
    return expect


# --- CIFAR ----------------------------------------------------------------------------------

def test_cifar10_round_trip(tmp_path):
    x, y, xt, yt = make_cifar10(tmp_path)
    train, test = load_dataset("cifar10", tmp_path, download=False)
    assert train.x.shape == (30, 3, 32, 32) and test.x.shape == (5, 3, 32, 32)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert train.x.device.type == "cpu"
    assert torch.equal(train.x, torch.from_numpy(x)) and torch.equal(train.y, torch.from_numpy(y))
    assert torch.equal(test.x, torch.from_numpy(xt)) and torch.equal(test.y, torch.from_numpy(yt))
    assert train.info == dataset_info("cifar10") and train.info.flip and train.info.num_classes == 10
    # channel layout: the first 1024 values of a row are the red plane
    raw = x.reshape(len(x), 3072)
    assert np.array_equal(train.x[0, 0].numpy().ravel(), raw[0, :1024])
    assert np.array_equal(train.x[0, 2].numpy().ravel(), raw[0, 2048:])


def test_cifar100_fine_labels_and_bytes_keys(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    x = RNG.integers(0, 256, (9, 3, 32, 32), dtype=np.uint8)
    y = RNG.integers(0, 100, 9)
    xt = RNG.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    yt = RNG.integers(0, 100, 4)
    for name, a, b in [("train", x, y), ("test", xt, yt)]:
        path = d / name
        write_cifar_batch(path, a, b, "fine_labels", bytes_keys=True)
        # the real files carry the 20 superclass labels too; they must not be picked up
        data = pickle.load(open(path, "rb"))
        data[b"coarse_labels"] = [int(v) % 20 for v in b]
        pickle.dump(data, open(path, "wb"), protocol=2)
    train, test = load_dataset("cifar100", tmp_path, download=False)
    assert train.info.num_classes == 100 and not train.info.flip
    assert torch.equal(train.x, torch.from_numpy(x)) and torch.equal(train.y, torch.from_numpy(y))
    assert torch.equal(test.y, torch.from_numpy(yt))


def test_cifar_pickle_refuses_foreign_globals(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    with open(d / "train", "wb") as f:
        pickle.dump({"data": os.getcwd, "fine_labels": []}, f, protocol=2)  # a reference to a function
    shutil.copy(d / "train", d / "test")
    with pytest.raises(DatasetFileError, match=f"{d / 'train'}.*refusing to load posix.getcwd"):
        load_dataset("cifar100", tmp_path, download=False, cache=False)


# --- GTSRB ----------------------------------------------------------------------------------

def test_gtsrb_resize_labels_and_roi(tmp_path):
    expect = make_gtsrb(tmp_path)
    train, test = load_dataset("gtsrb", tmp_path, download=False)
    assert train.x.shape == (6, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert train.x.dtype == torch.uint8 and train.info.num_classes == 43 and not train.info.flip
    assert train.y.tolist() == [c for c, _, _ in expect["train"]] == [0, 0, 1, 1, 42, 42]
    assert test.y.tolist() == [c for c, _, _ in expect["test"]]
    for got, (_, a, inner) in zip(train.x, expect["train"]):
        # whole image resized (BackdoorBench): border colour in the corner, sign colour inside
        ref = np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
        assert np.array_equal(got.numpy(), ref)
        assert got[:, 0, 0].tolist() == [255, 0, 128]
        assert got[:, 16, 16].tolist() == inner.tolist()

    train_roi, test_roi = load_dataset("gtsrb", tmp_path, download=False, roi=True)
    for got, (_, _, inner) in zip(list(train_roi.x) + list(test_roi.x), expect["train"] + expect["test"]):
        # cropped to the sign box: every pixel is the sign colour
        assert (got == torch.from_numpy(inner)[:, None, None]).all()
    # the two variants are cached under different keys
    assert len(list((tmp_path / ".bdgrid-cache").glob("gtsrb-*-xtr.npy"))) == 2


def test_gtsrb_exact_pixels_at_32(tmp_path):
    """A 32x32 image with a full-image ROI comes back unchanged."""
    d = tmp_path / "Train" / "00007"  # BackdoorBench's folder layout
    d.mkdir(parents=True)
    (tmp_path / "Test").mkdir()
    a = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(a).save(d / "x.ppm")
    Image.fromarray(a[::-1].copy()).save(tmp_path / "Test" / "t.ppm")
    (d / "GT-00007.csv").write_text(GT_HEADER + "x.ppm;32;32;0;0;32;32;7\n")
    (tmp_path / "Test" / "GT-final_test.csv").write_text(GT_HEADER + "t.ppm;32;32;0;0;32;32;3\n")
    train, test = load_dataset("gtsrb", tmp_path, download=False)
    assert np.array_equal(train.x[0].numpy(), a.transpose(2, 0, 1)) and train.y.tolist() == [7]
    assert np.array_equal(test.x[0].numpy(), a[::-1].transpose(2, 0, 1)) and test.y.tolist() == [3]


def test_gtsrb_unlabelled_test_csv_is_named(tmp_path):
    make_gtsrb(tmp_path)
    csv = tmp_path / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.csv"
    csv.write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n00000.ppm;40;36;4;3;35;32\n")
    with pytest.raises(DatasetMissing, match="ClassId"):
        load_dataset("gtsrb", tmp_path, download=False)


# --- Tiny-ImageNet --------------------------------------------------------------------------

def test_tiny_imagenet_round_trip(tmp_path):
    expect = make_tiny(tmp_path)
    train, test = load_dataset("tiny-imagenet", tmp_path, download=False)
    assert train.x.shape == (6, 3, 64, 64) and test.x.shape == (6, 3, 64, 64)
    assert train.x.dtype == torch.uint8 and train.info.size == 64 and train.info.num_classes == 200
    order = sorted(w for w, _ in expect["train"][::2])  # labels index the sorted wnids
    assert train.y.tolist() == sorted(order.index(w) for w, _ in expect["train"])
    assert test.y.tolist() == [order.index(w) for w, _ in expect["val"]]
    # training images come grouped by sorted wnid; JPEG at quality 100 is close to lossless
    by_label = sorted(expect["train"], key=lambda t: order.index(t[0]))
    for got, (_, a) in zip(list(train.x) + list(test.x), by_label + expect["val"]):
        err = (got.int() - torch.from_numpy(a.transpose(2, 0, 1).copy()).int()).abs()
        assert err.max() <= 6, err.max()
    # the greyscale JPEG became 3 equal channels
    grey = train.x[[i for i, t in enumerate(by_label) if t[1][..., 0].tolist() == t[1][..., 1].tolist()]]
    assert len(grey) == 1 and torch.equal(grey[0, 0], grey[0, 1])


def test_tiny_imagenet_backdoorbench_val_folders(tmp_path):
    """BackdoorBench's download moves val images into val/<wnid>/ and drops the annotations."""
    expect = make_tiny(tmp_path)
    val = tmp_path / "tiny-imagenet-200" / "val"
    for line in (val / "val_annotations.txt").read_text().split("\n"):
        if line:
            name, wnid = line.split("\t")[:2]
            (val / wnid).mkdir(exist_ok=True)
            shutil.move(val / "images" / name, val / wnid / name)
    (val / "val_annotations.txt").unlink()
    (val / "images").rmdir()
    _, test = load_dataset("tiny-imagenet", tmp_path, download=False)
    order = sorted({w for w, _ in expect["val"]})
    assert test.y.tolist() == sorted(order.index(w) for w, _ in expect["val"])


# --- MNIST ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gz,sub", [(False, ""), (True, "MNIST/raw")])
def test_mnist_round_trip(tmp_path, gz, sub):
    x, y, xt, yt = make_mnist(tmp_path / sub, gz=gz)
    train, test = load_dataset("mnist", tmp_path, download=False)
    assert train.x.shape == (7, 1, 32, 32) and test.x.shape == (4, 1, 32, 32)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert train.info.channels == 1 and not train.info.flip
    assert np.array_equal(train.x[:, 0, 2:30, 2:30].numpy(), x)  # padded 2 px each side
    assert train.x[:, :, :2].sum() == 0 and train.x[:, :, :, 30:].sum() == 0
    assert train.y.tolist() == y.tolist() and test.y.tolist() == yt.tolist()
    assert np.array_equal(test.x[:, 0, 2:30, 2:30].numpy(), xt)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    short = struct.pack(">BBBB", 0, 0, 8, 2) + struct.pack(">2i", 3, 3) + bytes(5)
    (tmp_path / "short").write_bytes(short)
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


# --- cache ----------------------------------------------------------------------------------

def test_second_load_reads_the_cache(tmp_path):
    x, y, _, _ = make_cifar10(tmp_path / "data")
    first, _ = load_dataset("cifar10", tmp_path / "data", download=False)
    cached = list((tmp_path / "data" / ".bdgrid-cache").glob("cifar10-*.npy"))
    assert len(cached) == 4
    shutil.rmtree(tmp_path / "data" / "cifar-10-batches-py")  # the source is gone ...
    second, test = load_dataset("cifar10", tmp_path / "data", download=False)  # ... the cache answers
    assert torch.equal(second.x, first.x) and torch.equal(second.y, first.y) and len(test) == 5
    assert dataset_problem("cifar10", tmp_path / "data") is None
    # with the cache off, the missing source is an error again
    with pytest.raises(DatasetMissing):
        load_dataset("cifar10", tmp_path / "data", download=False, cache=False)


def test_custom_cache_dir_and_no_cache(tmp_path):
    make_mnist(tmp_path / "src")
    load_dataset("mnist", tmp_path / "src", download=False, cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("mnist-*.npy"))) == 4
    assert not (tmp_path / "src" / ".bdgrid-cache").exists()
    load_dataset("mnist", tmp_path / "src", download=False, cache=False)
    assert not (tmp_path / "src" / ".bdgrid-cache").exists()


def test_truncated_cache_is_rebuilt(tmp_path):
    x, *_ = make_mnist(tmp_path)
    load_dataset("mnist", tmp_path, download=False)
    xtr = next((tmp_path / ".bdgrid-cache").glob("mnist-*-xtr.npy"))
    xtr.write_bytes(xtr.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        train, _ = load_dataset("mnist", tmp_path, download=False)
    assert np.array_equal(train.x[:, 0, 2:30, 2:30].numpy(), x)


# --- missing files --------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("cifar10", ["cifar-10-batches-py/data_batch_1", "test_batch"]),
    ("cifar100", ["cifar-100-python/train", "test"]),
    ("gtsrb", ["GTSRB/Final_Training/Images/000NN", "GT-000NN.csv", "GTSRB/Final_Test/Images", "GT-final_test.csv"]),
    ("tiny-imagenet", ["tiny-imagenet-200/wnids.txt", "train/<wnid>/images/*.JPEG", "val/val_annotations.txt"]),
    ("mnist", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", ".gz"]),
])
def test_missing_files_error_names_the_layout(tmp_path, name, expected):
    with pytest.raises(DatasetMissing) as e:
        load_dataset(name, tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "download=false" in msg
    for part in expected:
        assert part in msg
    assert dataset_problem(name, tmp_path) is not None


def test_missing_root_is_an_error():
    with pytest.raises(DatasetMissing, match="needs a root"):
        load_dataset("mnist", None)


def test_offline_download_fails_fast(tmp_path, monkeypatch):
    """With download on and the site unreachable (a closed local port), the error comes at
    once and still names the layout; nothing is written."""
    monkeypatch.setattr(mnist.MNIST_SOURCE, "url", "http://127.0.0.1:9/mnist/")
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    t = time.monotonic()
    with pytest.raises(DatasetMissing) as e:
        load_dataset("mnist", tmp_path / "nowhere")
    assert time.monotonic() - t < files.PROBE_TIMEOUT_S + 1
    assert "unreachable" in str(e.value) and "train-images-idx3-ubyte" in str(e.value)
    assert not (tmp_path / "nowhere").exists()


def test_bad_params_are_reported():
    from defense.registry import BadParams

    with pytest.raises(BadParams, match="did you mean 'roi'"):
        load_dataset("gtsrb", "/nonexistent", rio=True)
