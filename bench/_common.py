"""Shared bits of the benchmarks: the machine banner, the poisoned data, timing on any device.

Every benchmark prints the machine and versions first (as airbench's header does), so a number
never travels without the hardware that produced it.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from anywhere

# CIFAR-10 scale (50,000 train / 10,000 test 32x32), as the GPU benchmarks use it.
CIFAR_SCALE = dict(n_train=50_000, n_test=10_000)
# CPU scale: the synthetic default (10,000 / 2,000), tiny_cnn trains it in about a minute on 2 threads.
CPU_SCALE = dict(n_train=10_000, n_test=2_000)


def resolve_scale(a) -> tuple:
    """Threads, device, architecture and data sizes from the common benchmark flags (``--gpu``,
    ``--threads``, ``--arch``, ``--n-train``, ``--n-test``): CIFAR scale and PreAct-ResNet18 on
    the GPU, the small CPU scale and tiny_cnn otherwise. Returns (device, arch, n_train, n_test)."""
    from defense.train import pick_device

    torch.set_num_threads(a.threads)
    device = pick_device("cuda" if a.gpu else "cpu")
    if a.gpu and device.type != "cuda":
        raise SystemExit("--gpu asked but torch sees no CUDA device")
    scale = CIFAR_SCALE if a.gpu else CPU_SCALE
    arch = a.arch or ("preact_resnet18" if a.gpu else "tiny_cnn")
    return device, arch, a.n_train or scale["n_train"], a.n_test or scale["n_test"]


def machine() -> str:
    """One line naming the hardware and versions."""
    if torch.cuda.is_available():
        hw = f"GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        hw = f"CPU {cpu}, {torch.get_num_threads()} threads, {os.cpu_count()} cores visible"
    return f"{hw}; torch {torch.__version__}; python {platform.python_version()}"


def sync(device) -> None:
    """Wait for queued GPU work so wall-clock timings mean what they say."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``with Timer(device) as t: ...``; ``t.s`` is the synced wall time in seconds, ``t.cpu`` the
    process CPU time (all threads) over the same span."""

    def __init__(self, device="cpu"):
        self.device = device
        self.s = 0.0
        self.cpu = 0.0

    def __enter__(self):
        sync(self.device)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.s = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        return False


CACHE = Path(__file__).resolve().parent / "out" / "cache"  # git-ignored


def synthetic(n_train: int, n_test: int):
    """``load_dataset("synthetic", ...)``, cached as plain tensors so that the benchmarks of one
    ``gpu_check.sh`` run generate the 60,000 CIFAR-scale images once, not once per script."""
    from defense.data import Data, dataset_info, load_dataset

    f = CACHE / f"synthetic_{n_train}_{n_test}.pt"
    if f.exists():
        d = torch.load(f, weights_only=True)
        info = dataset_info("synthetic")
        return Data(d["train_x"], d["train_y"], info), Data(d["test_x"], d["test_y"], info)
    train, test = load_dataset("synthetic", n_train=n_train, n_test=n_test)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    torch.save({"train_x": train.x, "train_y": train.y, "test_x": test.x, "test_y": test.y}, tmp)
    tmp.replace(f)  # atomic: a concurrent reader never sees half a file
    return train, test


def poisoned_data(attack: str, n_train: int, n_test: int, seed: int = 0, pratio: float = 0.1, target: int = 0):
    """Synthetic (train, test) and the attack's poisoned set, all on the CPU, deterministic."""
    from defense.trial import TrialConfig, make_poisoned

    train, test = synthetic(n_train, n_test)
    cfg = TrialConfig(attack=attack, seed=seed, pratio=pratio, target=target, device="cpu")
    return train, test, make_poisoned(cfg, train, test)


def write_json(path: str | None, obj: dict) -> None:
    """Atomic: a benchmark killed by its time limit leaves the previous file whole, never half of one."""
    if path:
        import os

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        os.replace(tmp, p)


def fmt_s(s: float | None) -> str:
    return "-" if s is None else (f"{s:.1f}s" if s < 600 else f"{s / 60:.1f}min")


def alternating(sides: dict, reps: int) -> dict:
    """Run each side ``reps`` times, alternating the order (A B, B A, A B, ...) so that a drift in
    machine load falls on both sides alike. ``sides``: {label: fn() -> dict}; returns
    {label: [result, ...]} in repetition order."""
    labels = list(sides)
    out = {k: [] for k in labels}
    for r in range(reps):
        for k in (labels if r % 2 == 0 else labels[::-1]):
            out[k].append(sides[k]())
    return out


def spread(values: list) -> dict:
    """Median, min, max and the relative spread (max - min) / median of measured values."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"median": None, "min": None, "max": None, "rel_spread": None, "n": 0}
    n = len(v)
    med = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
    return {"median": med, "min": v[0], "max": v[-1], "rel_spread": (v[-1] - v[0]) / med if med else None, "n": n}


def fmt_spread(s: dict, unit: str = "x", digits: int = 2) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:.{digits}f}{unit} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f}, n {s['n']})"



def tree_cpu(root: int | None = None) -> dict:
    """{(pid, start tick): CPU seconds (user + system)} of process ``root`` (default: this one)
    and every live descendant, from /proc (Linux; elsewhere only this process, from
    ``time.process_time``). A local Ray session's daemons (GCS, raylet, agents) are children of
    the driver that started it and its workers are the raylet's children, so this covers the
    whole session; DataLoader workers likewise. Exited children's time (``cutime``) is left out:
    the raylet does not reap its workers in a way that adds it, so it would count some and not
    others; ``TreeTimer`` samples instead."""
    root = os.getpid() if root is None else root
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {(root, 0): time.process_time()}
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        # fields after the name: state(0) ppid(1) ... utime(11) stime(12) ... starttime(19)
        stats[pid] = (int(f[1]), int(f[19]), (int(f[11]) + int(f[12])) / tick)
    if root not in stats:
        return {(root, 0): time.process_time()}
    children: dict = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        out[(pid, stats[pid][1])] = stats[pid][2]
        todo.extend(children.get(pid, ()))
    return out


class TreeTimer:
    """``with TreeTimer() as t: ...``: wall seconds (``t.s``) and CPU seconds of this process and
    all its descendants over the block (``t.cpu``): per process, its CPU time at the last sample
    minus that at the start (0 for one started inside the block). A background thread samples the
    tree every ``every`` seconds, so a process that exits inside the block (a Ray actor killed
    at the end of a run) is counted up to its last sample: at most ``every`` seconds of CPU
    missed per such process. The sampler's own CPU is charged to the block (both sides alike)."""

    def __init__(self, every: float = 0.25):
        self.every = every

    def _sample(self):
        for k, v in tree_cpu().items():
            self.last[k] = v

    def _loop(self):
        while not self.stop.wait(self.every):
            self._sample()

    def __enter__(self):
        import threading

        self.first = tree_cpu()
        self.last = dict(self.first)
        self.t0 = time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        self.stop.set()
        self.thread.join()
        self._sample()
        self.cpu = sum(v - self.first.get(k, 0.0) for k, v in self.last.items())
        return False
