"""The one training loop: attack training and every defense that fine-tunes use it.

Data stays whole on its device as uint8; each step slices a batch by index, augments it with
tensor ops, optionally hands it to a per-batch hook (training-controlled attacks such as
WaNet poison here), normalises and steps. Seeded: the same seed gives the same batches,
augmentations and initial weights.

Recipes (one typed place for every default, each with its source):
- ``paper``: the BackdoorBench protocol (SGD lr 0.01, momentum 0.9, wd 5e-4, batch 128,
  cosine annealing, 100 epochs on CIFAR-10); the fidelity reference.
- ``fast``: batch 512, one-cycle schedule (linear warm-up over 20% of the steps to lr 0.2, then
  linear decay to 0) with Nesterov momentum, 15 epochs. On CUDA also bf16 autocast,
  channels_last, cuDNN autotuning, a fused SGD step, and optionally ``torch.compile``. Which of
  them a run uses is decided in one place, ``accel_for``: on the CPU they are off unless asked
  (``train(..., accel_on_cpu=True)``), so CI runs the very code a GPU runs (bf16 autocast with
  ``device_type="cpu"``, channels_last, the inductor CPU backend, the fused SGD step);
  tests/test_speed_paths.py checks both that off is bit-identical to plain and that on implants
  the same backdoor. TSBD's bf16 autocast is decided there too (``DefenseContext.accel_on_cpu``
  runs it on the CPU). Ideas from airbench (github.com/KellerJordan/cifar10-airbench): data whole on
  the GPU as uint8, crop/flip of whole batches with tensor ops, shuffle and augmentation drawn
  from a generator on the GPU, no DataLoader, no host sync inside an epoch, short one-cycle-like
  schedules at large batch. No label smoothing: it caps the target-class logit margin that the
  backdoor relies on, and the fidelity criterion (same ASR as ``paper``) is met without it.
  Measured against ``paper`` by ``bench/train_speed.py`` (README, section speed).
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F

from defense.data import Data
from defense.data.augment import augment, normalize, to_float


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_frac: float = 0.0  # one-cycle: fraction of steps spent warming up
    label_smoothing: float = 0.0
    bf16: bool = False  # autocast to bf16 (on CUDA; on the CPU only when asked, see accel_for)
    channels_last: bool = False  # CUDA (CPU when asked)
    compile: bool = False  # torch.compile, CUDA (CPU when asked); drops the ragged last batch: static shapes, one graph
    cudnn_benchmark: bool = False  # CUDA only: let cuDNN time its kernels once per shape and keep the fastest
    # Small data: shrink the batch so an epoch has at least this many steps, scaling lr with it
    # (linear rule, Goyal et al. 2017). 0 = off. At batch 512 on 4,000 images an epoch is 8 steps
    # and tiny_cnn never learns the task (measured: ACC 0.10, README speed); CIFAR scale is unchanged.
    min_steps: int = 0


RECIPES: dict[str, Recipe] = {
    # BackdoorBench CIFAR-10 attack training (resource/config of BackdoorBench: sgd, lr 0.01,
    # momentum 0.9, wd 5e-4, bs 128, CosineAnnealingLR, 100 epochs).
    "paper": Recipe("paper", epochs=100, batch_size=128, lr=0.01, weight_decay=5e-4, schedule="cosine"),
    # Fast: one-cycle with Nesterov (airbench-style), larger batch, mixed precision on GPU.
    # Label smoothing stays 0 by default: it softens the target-class logit that ASR relies on.
    "fast": Recipe(
        "fast", epochs=15, batch_size=512, lr=0.2, weight_decay=5e-4, nesterov=True,
        schedule="onecycle", warmup_frac=0.2, bf16=True, channels_last=True, cudnn_benchmark=True,
        min_steps=32,
    ),
}

# Attack-training epochs of the ``paper`` recipe per dataset: BackdoorBench's
# config/attack/prototype/{cifar10,cifar100,gtsrb,tiny}.yaml (github.com/SCLBD/BackdoorBench,
# commit 3f4b1a9): ``epochs: 100`` for CIFAR-10 and CIFAR-100, 50 for GTSRB, 200 for
# Tiny-ImageNet (whose prototype also uses ReduceLROnPlateau where we keep cosine annealing).
# BackdoorBench has no MNIST prototype; MNIST gets CIFAR-10's 100. Datasets not listed (synthetic,
# plug-ins) keep the recipe's own ``epochs`` (100).
PAPER_EPOCHS = {"cifar10": 100, "cifar100": 100, "gtsrb": 50, "tiny-imagenet": 200, "mnist": 100}


def get_recipe(name: str, dataset: str | None = None, **overrides) -> Recipe:
    """The recipe ``name`` with ``overrides`` (None values ignored). With ``dataset``, ``paper``
    trains that dataset's BackdoorBench epochs (``PAPER_EPOCHS``) unless ``epochs`` is overridden."""
    from defense.registry import UnknownName, did_you_mean

    if name not in RECIPES:
        raise UnknownName(f"unknown recipe '{name}'{did_you_mean(name, RECIPES)}; valid: {', '.join(RECIPES)}")
    r = RECIPES[name]
    if name == "paper" and dataset in PAPER_EPOCHS:
        r = replace(r, epochs=PAPER_EPOCHS[dataset])
    return replace(r, **{k: v for k, v in overrides.items() if v is not None})


class BatchHook(Protocol):
    """Per-batch transform for training-controlled attacks, applied after augmentation on
    float images in [0, 1]; may change images and labels, and may read the model."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]: ...


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_problem(device: str | None) -> str | None:
    """Why ``device`` cannot be used here, or None: checked before any compute, so that a
    machine without a working GPU gets one clear line, not a CUDA traceback mid-run."""
    if device in (None, "auto"):
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        return f"device '{device}' is not a torch device ({e}); valid: cpu, cuda, cuda:N, auto"
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return f"device '{device}': torch sees no usable GPU here (torch.cuda.is_available() is False); use cpu or auto"
        if d.index is not None and d.index >= torch.cuda.device_count():
            return f"device '{device}': only {torch.cuda.device_count()} GPU(s) here"
    return None


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def index_batches(n: int, batch_size: int, shuffle: bool, gen: torch.Generator | None,
                  drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index slices of one epoch, on the generator's device (a CUDA generator keeps the shuffle
    on the GPU, so a GPU-resident loop never waits for a host-to-device copy of the order)."""
    dev = gen.device if gen is not None else torch.device("cpu")
    order = torch.randperm(n, generator=gen, device=dev) if shuffle else torch.arange(n, device=dev)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def make_batch(data: Data, idx: torch.Tensor, gen: torch.Generator | None, train_aug: bool = True,
               hook: BatchHook | None = None, model: torch.nn.Module | None = None,
               channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice, augment, hook, normalise: the input pipeline of every loop in bdgrid."""
    idx = idx.to(data.device)
    x, y = data.x[idx], data.y[idx]
    if train_aug:
        x = augment(x, data.info, gen)
    x = to_float(x)
    if hook is not None:
        x, y = hook(x, y, model)
    x = normalize(x, data.info)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def fit_batch(r: Recipe, n: int) -> Recipe:
    """``r`` with the batch shrunk (and lr scaled alike) so an epoch of ``n`` images has at least
    ``r.min_steps`` steps; ``r`` itself when it already has (e.g. ``fast`` on 50,000 images)."""
    if r.min_steps <= 0 or n // r.batch_size >= r.min_steps:
        return r
    bs = max(16, n // r.min_steps)
    return replace(r, batch_size=bs, lr=r.lr * bs / r.batch_size)


def make_optimizer(model: torch.nn.Module, r: Recipe, steps: int, fused: bool = False):
    """SGD + the recipe's per-step schedule. ``fused`` updates all parameters in one kernel (CUDA;
    torch's fused CPU step is a vectorised loop); the arithmetic is the same as the default loop."""
    opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                          nesterov=r.nesterov and r.momentum > 0, fused=True if fused else None)
    if r.schedule == "cosine":  # stepped per epoch in BackdoorBench; per step here is equivalent in the limit
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    elif r.schedule == "onecycle":
        warm = max(1, int(r.warmup_frac * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
        )
    elif r.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    else:
        raise ValueError(f"unknown schedule '{r.schedule}'; valid: cosine, onecycle, constant")
    return opt, sched


@dataclass(frozen=True)
class Accel:
    """The speed options one training run uses (the only place they are decided: ``accel_for``)."""

    device: torch.device
    bf16: bool = False  # bf16 autocast, device_type = device.type
    channels_last: bool = False
    compile: bool = False  # torch.compile (inductor: Triton on CUDA, C++ on the CPU)
    fused: bool = False  # SGD's fused step (one kernel on CUDA; a vectorised loop on the CPU)
    cudnn_benchmark: bool = False  # cuDNN only: nothing to do on the CPU


def cpu_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would call (``$CXX``, else g++/c++/clang++), or None."""
    import os

    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def accel_for(recipe, device: str | torch.device | None, on_cpu: bool = False) -> Accel:
    """Which of ``recipe``'s speed options run on ``device``. On CUDA: all the recipe asks for.
    Elsewhere: none, unless ``on_cpu`` (the GPU code path run on the CPU, for CI): then bf16,
    channels_last, compile and the fused step as on CUDA; cuDNN autotuning has no CPU
    counterpart. Raises ValueError when compile is asked on the CPU without a C++ compiler.

    ``recipe`` is a ``Recipe`` or any options object with some of its flags (``bf16``,
    ``channels_last``, ``compile``, ``cudnn_benchmark``; a missing one is off): TSBD's params
    carry ``bf16`` only, and its autocast is decided here too (``autocast``)."""
    device = pick_device(device)
    use = device.type == "cuda" or on_cpu
    flag = lambda name: bool(getattr(recipe, name, False))  # noqa: E731
    acc = Accel(device, bf16=flag("bf16") and use, channels_last=flag("channels_last") and use,
                compile=flag("compile") and use, fused=use,
                cudnn_benchmark=flag("cudnn_benchmark") and device.type == "cuda")
    if acc.compile and device.type == "cpu" and cpu_compiler() is None:
        raise ValueError("torch.compile on the CPU (inductor's C++ backend) needs a C++ compiler: none of $CXX, g++, "
                         "c++, clang++ is on PATH; install one or set compile=False")
    return acc


def autocast(acc: Accel):
    """The forward passes' precision for ``acc``: bf16 autocast on ``acc.device``'s type
    (``device_type="cpu"`` when the GPU path runs on the CPU), else a no-op context."""
    return torch.autocast(acc.device.type, dtype=torch.bfloat16) if acc.bf16 else _null()


def train(model: torch.nn.Module, data: Data, recipe: Recipe, *, seed: int = 0,
          device: str | torch.device | None = None, hook: BatchHook | None = None,
          epochs: int | None = None, progress: bool | Callable[[dict], None] = False,
          desc: str = "train", eval_fn: Callable[[torch.nn.Module], dict] | None = None,
          accel_on_cpu: bool = False) -> list[dict]:
    """Train ``model`` in place on ``data``; return one dict per epoch (loss, acc, lr, seconds).

    ``eval_fn`` (optional) runs after each epoch and its dict joins that epoch's row; by
    default nothing is evaluated per epoch, since evaluation belongs at the end of a trial.
    ``progress`` is True for a tqdm bar or a callable that receives each epoch's row.
    ``accel_on_cpu`` runs the recipe's GPU options on the CPU too (``accel_for``).
    """
    device = pick_device(device)
    acc = accel_for(recipe, device, accel_on_cpu)
    gen = seed_everything(seed)  # seeds the initial weights (global RNG) and the batch/augmentation stream
    if device.type == "cuda":
        # Shuffle and augmentation draw on the GPU from a generator seeded alike, so the loop issues
        # no host-to-device copies and never blocks on the host (airbench keeps everything on device).
        # On the CPU the CPU generator is already on the data's device: the same batched path.
        gen = torch.Generator(device=device).manual_seed(seed)
    data = data.to(device)  # uint8, whole: 150 MB for CIFAR-10, a no-op when already there
    epochs = epochs if epochs is not None else recipe.epochs
    recipe = fit_batch(recipe, len(data))
    model.to(device)
    cl = acc.channels_last
    if cl:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if acc.compile else model
    drop_last = acc.compile  # a ragged last batch would compile a second graph
    steps_per_epoch = (len(data) // recipe.batch_size if drop_last and len(data) >= recipe.batch_size
                       else math.ceil(len(data) / recipe.batch_size))
    opt, sched = make_optimizer(model, recipe, epochs * steps_per_epoch, fused=acc.fused)
    amp = autocast(acc)
    bench_flag = torch.backends.cudnn.benchmark
    if acc.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        # counted in steps, not epochs: one epoch of a large model on a loaded CPU can take a minute,
        # and a bar that moves once per epoch looks like a hang
        bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=False)
    history = []
    try:
        for epoch in range(epochs):
            model.train()
            t0 = time.perf_counter()
            # Running sums stay on the device: no .item() per step, one sync per epoch.
            tot_loss = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for idx in index_batches(len(data), recipe.batch_size, True, gen, drop_last=drop_last):
                x, y = make_batch(data, idx, gen, True, hook, model, cl)
                with amp:
                    out = step_model(x)
                    loss = F.cross_entropy(out.float(), y, label_smoothing=recipe.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot_loss += loss.detach() * len(y)
                correct += (out.detach().argmax(1) == y).sum()
                seen += len(y)
                if bar is not None:
                    bar.update(1)
            loss_v, acc_v = float(tot_loss) / seen, float(correct) / seen  # the epoch's one sync
            row = {"epoch": epoch + 1, "loss": loss_v, "train_acc": acc_v, "images": seen,
                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            if eval_fn is not None:  # not timed: evaluation is not training
                row.update(eval_fn(model))
            history.append(row)
            if bar is not None:
                bar.set_postfix(ep=f"{epoch + 1}/{epochs}", loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.3f}")
            elif callable(progress):
                progress(row)
    finally:
        torch.backends.cudnn.benchmark = bench_flag
        if bar is not None:
            bar.close()
    if cl:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
