"""Images/second of bdgrid's tensor input pipeline vs a torchvision DataLoader + PIL transforms.

Both pipelines produce the same training batches from the same data (``synthetic``, 10k
images, 32x32 RGB): random crop 32 with zero padding 4, random horizontal flip, conversion to
float and per-channel normalisation, one shuffled epoch per measurement.

- ours: ``defense.train.make_batch`` on whole uint8 tensors (index slice -> batched crop+flip
  -> float -> normalise), batch 128 and 512.
- torchvision: a ``Dataset`` of PIL images through ``transforms.Compose([RandomCrop(32,
  padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])`` and a
  ``DataLoader(shuffle=True)`` with num_workers 0 and 2 (persistent workers, so worker start-up
  is not charged to the timed epoch); the per-image pipeline BackdoorBench's training uses.

Each number is the median over ``--repeats`` timed epochs after one warm-up epoch; both run
in this one process, side by side, so machine load affects them alike (the header prints the
load average: on a shared machine read the ratio, not the absolute numbers).

    .venv/bin/python bench/data_pipeline.py [--n 10000] [--repeats 3] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from defense.data import load_dataset  # noqa: E402
from defense.train import index_batches, make_batch  # noqa: E402

# --------------------------------------------------------------------------------------------
# the two pipelines


def ours_epoch(data, batch_size: int, gen: torch.Generator) -> int:
    n = 0
    for idx in index_batches(len(data), batch_size, True, gen):
        x, y = make_batch(data, idx, gen, train_aug=True)
        n += len(y)
    return n


class PILDataset(torch.utils.data.Dataset):
    """The data as a list of PIL images, as torchvision's CIFAR10 dataset holds it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        from PIL import Image

        self.images = [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def torchvision_loader(data, batch_size: int, workers: int):
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(data.info.mean, data.info.std),
    ])
    ds = PILDataset(data.x, data.y, tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def loader_epoch(loader) -> int:
    n = 0
    for x, y in loader:
        n += len(y)
    return n


def worker_pids(loader) -> list[int]:
    """PIDs of a persistent DataLoader's worker processes (private attribute; [] if absent)."""
    it = getattr(loader, "_iterator", None)
    return [w.pid for w in getattr(it, "_workers", [])] if it is not None else []


def cpu_seconds(pids: list[int]) -> float:
    """This process's CPU time (all threads) plus that of the given child processes."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(epoch_fn, repeats: int, pids_fn=lambda: []) -> tuple[float, float]:
    """Median images per wall second and per CPU second over ``repeats`` timed epochs, after
    one warm-up epoch. CPU seconds count every thread and worker process of the pipeline, so
    that ratio holds on a loaded shared machine, where wall time mostly measures the load."""
    epoch_fn()
    wall, cpu = [], []
    for _ in range(repeats):
        pids = pids_fn()
        t, c = time.perf_counter(), cpu_seconds(pids)
        n = epoch_fn()
        wall.append(n / (time.perf_counter() - t))
        cpu.append(n / max(cpu_seconds(pids) - c, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


# --------------------------------------------------------------------------------------------
# header: machine and versions


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import PIL
    import torchvision

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="synthetic training images (default 10k)")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration (median)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads here (1: on a shared, oversubscribed CPU more threads only spin)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    data, _ = load_dataset("synthetic", n_train=args.n, n_test=10)
    head = machine()
    print(f"# data pipeline benchmark: synthetic {args.n} x 3x32x32, crop(pad 4) + flip + normalise")
    print("# " + ", ".join(f"{k}={v}" for k, v in head.items()))

    # both pipelines make the same kind of batch
    x0, _ = make_batch(data, torch.arange(8), torch.Generator().manual_seed(0))
    x1, _ = next(iter(torchvision_loader(data, 8, 0)))
    assert x0.shape == x1.shape and x0.dtype == x1.dtype, (x0.shape, x1.shape)

    rows = []
    for bs in args.batch_sizes:
        gen = torch.Generator().manual_seed(0)
        wall, cpu = measure(lambda: ours_epoch(data, bs, gen), args.repeats)
        rows.append({"pipeline": "ours (tensor)", "batch": bs, "workers": 0, "img_per_s": wall, "img_per_cpu_s": cpu})
        for w in args.workers:
            loader = torchvision_loader(data, bs, w)
            wall, cpu = measure(lambda: loader_epoch(loader), args.repeats, lambda: worker_pids(loader))
            rows.append({"pipeline": "torchvision DataLoader+PIL", "batch": bs, "workers": w,
                         "img_per_s": wall, "img_per_cpu_s": cpu})
            del loader

    print(f"\n| {'pipeline':<28} | batch | workers | {'images/s':>9} | ours/this | {'img/CPU-s':>9} | ours/this |")
    print(f"|{'-' * 30}|-------|---------|{'-' * 11}|-----------|{'-' * 11}|-----------|")
    for r in rows:
        ours = next(o for o in rows if o["pipeline"].startswith("ours") and o["batch"] == r["batch"])
        r["ratio"] = ours["img_per_s"] / r["img_per_s"]
        r["cpu_ratio"] = ours["img_per_cpu_s"] / r["img_per_cpu_s"]
        print(f"| {r['pipeline']:<28} | {r['batch']:>5} | {r['workers']:>7} | {r['img_per_s']:>9,.0f} | "
              f"{r['ratio']:>8.1f}x | {r['img_per_cpu_s']:>9,.0f} | {r['cpu_ratio']:>8.1f}x |")
    tv = [r for r in rows if not r["pipeline"].startswith("ours")]
    ours = [r for r in rows if r["pipeline"].startswith("ours")]
    best_ratio = max(r["img_per_s"] for r in ours) / max(r["img_per_s"] for r in tv)
    worst = min(r["ratio"] for r in tv)
    worst_cpu = min(r["cpu_ratio"] for r in tv)
    print(f"\nwall: best ours / best torchvision {best_ratio:.1f}x, smallest same-batch ratio {worst:.1f}x; "
          f"CPU time: smallest same-batch ratio {worst_cpu:.1f}x (target >= 5x)")
    out = {"machine": head, "n": args.n, "repeats": args.repeats, "rows": rows, "best_ratio": best_ratio,
           "min_same_batch_ratio": worst, "min_same_batch_cpu_ratio": worst_cpu}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
