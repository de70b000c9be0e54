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

Side by side in this one process: for each batch size the pipelines (ours, torchvision with
each worker count) are warmed up with one untimed epoch, then each runs one timed epoch per
repetition, the order alternating (``--reps``, default 3: A B C, C B A, A B C), so that a drift
in machine load falls on all of them alike. Images per wall second and per CPU second (CPU time
of this process and of the DataLoader's worker processes: ``_common.TreeTimer``), and every
ratio ours / torchvision taken within a repetition, printed as median (min, max, n). On a
shared machine read the CPU ratio: wall time measures the other jobs too.

    .venv/bin/python bench/data_pipeline.py [--n 10000] [--reps 3] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when imported from elsewhere

from _common import TreeTimer, alternating, fmt_spread, spread  # noqa: E402
from _common import machine as machine_line  # noqa: E402
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


def timed_epoch(epoch_fn) -> dict:
    """One epoch: images per wall second and per CPU second (this process and its children:
    the DataLoader's workers are persistent, so they live through the whole epoch)."""
    with TreeTimer(every=60.0) as t:  # no process exits inside an epoch: the end sample suffices
        n = epoch_fn()
    return {"img_per_s": n / t.s, "img_per_cpu_s": n / max(t.cpu, 1e-9), "wall_s": t.s, "cpu_s": t.cpu}


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
    ap.add_argument("--reps", type=int, default=3, help="timed epochs of each pipeline, alternating order (>= 3)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads here (1: on a shared, oversubscribed CPU more threads only spin)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    data, _ = load_dataset("synthetic", n_train=args.n, n_test=10)
    head = machine()
    print(f"# data_pipeline: {machine_line()}")
    print(f"# synthetic {args.n} x 3x32x32, crop(pad 4) + flip + normalise; {args.reps} repetitions per pipeline, "
          f"alternating; CPU = this process + DataLoader workers")
    print("# " + ", ".join(f"{k}={v}" for k, v in head.items()))

    # both pipelines make the same kind of batch
    x0, _ = make_batch(data, torch.arange(8), torch.Generator().manual_seed(0))
    x1, _ = next(iter(torchvision_loader(data, 8, 0)))
    assert x0.shape == x1.shape and x0.dtype == x1.dtype, (x0.shape, x1.shape)

    rows = []
    for bs in args.batch_sizes:
        gen = torch.Generator().manual_seed(0)
        loaders = {w: torchvision_loader(data, bs, w) for w in args.workers}
        sides = {"ours": lambda: ours_epoch(data, bs, gen)}
        sides |= {w: (lambda ld=ld: loader_epoch(ld)) for w, ld in loaders.items()}
        for fn in sides.values():
            fn()  # warm-up: first allocations, and the persistent workers start here
        reps = alternating({k: (lambda fn=fn: timed_epoch(fn)) for k, fn in sides.items()}, args.reps)
        del loaders  # ends the persistent workers
        ours = reps.pop("ours")
        rows.append({"pipeline": "ours (tensor)", "batch": bs, "workers": 0, "reps": ours,
                     "img_per_s": spread([r["img_per_s"] for r in ours]),
                     "img_per_cpu_s": spread([r["img_per_cpu_s"] for r in ours])})
        for w, runs in reps.items():
            pairs = list(zip(ours, runs))  # repetition i of each side ran next to each other
            rows.append({"pipeline": "torchvision DataLoader+PIL", "batch": bs, "workers": w, "reps": runs,
                         "img_per_s": spread([r["img_per_s"] for r in runs]),
                         "img_per_cpu_s": spread([r["img_per_cpu_s"] for r in runs]),
                         "ratio": spread([o["img_per_s"] / r["img_per_s"] for o, r in pairs]),
                         "cpu_ratio": spread([o["img_per_cpu_s"] / r["img_per_cpu_s"] for o, r in pairs])})

    print(f"\n| {'pipeline':<28} | batch | workers | images/s (median) | img/CPU-s (median) |")
    print(f"|{'-' * 30}|-------|---------|-------------------|--------------------|")
    for r in rows:
        print(f"| {r['pipeline']:<28} | {r['batch']:>5} | {r['workers']:>7} | {r['img_per_s']['median']:>17,.0f} | "
              f"{r['img_per_cpu_s']['median']:>18,.0f} |")
    print()
    for r in rows:
        if "ratio" in r:
            print(f"RATIO ours/torchvision (batch {r['batch']}, {r['workers']} workers) images/s, wall: "
                  f"{fmt_spread(r['ratio'], 'x', 1)}; per CPU-second: {fmt_spread(r['cpu_ratio'], 'x', 1)}")
    tv = [r for r in rows if "ratio" in r]
    worst = min(r["ratio"]["median"] for r in tv)
    worst_cpu = min(r["cpu_ratio"]["median"] for r in tv)
    print(f"smallest same-batch median ratio: wall {worst:.1f}x, CPU {worst_cpu:.1f}x (target >= 5x)")
    out = {"machine": head, "machine_line": machine_line(), "n": args.n, "reps": args.reps, "rows": rows,
           "min_same_batch_ratio": worst, "min_same_batch_cpu_ratio": worst_cpu}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
