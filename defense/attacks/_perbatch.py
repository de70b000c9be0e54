"""Helpers shared by the training-controlled attacks (WaNet, Input-aware), whose poisoning
happens per batch inside ``defense.train.train`` through its hook, not once on the dataset.
"""
from __future__ import annotations

import torch

from defense.data import Data


def per_batch_count(rate: float, batch: int, gen: torch.Generator) -> int:
    """How many images of a batch of ``batch`` to modify so that the expected share is ``rate``:
    ``floor(rate * batch)`` plus one with probability equal to the remainder.

    BackdoorBench uses ``int(pratio * bs)`` and, below one per batch, one image in a random
    share of batches (``generalize_to_lower_pratio``); rounding the remainder stochastically
    does both at once and makes the expected rate exact (10% of a 128 batch is 12.8 images,
    BackdoorBench's floor gives 12, i.e. 9.4%)."""
    want = rate * batch
    k = int(want)
    if torch.rand((), generator=gen).item() < want - k:
        k += 1
    return min(k, batch)


def quantize(x01: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] images -> uint8, as a backdoor test set is stored (like BackdoorBench's saved
    backdoor test images)."""
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8)


def nontarget(test: Data, target: int) -> torch.Tensor:
    return torch.nonzero(test.y != target).flatten()


def empty_idx() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)
