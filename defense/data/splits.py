"""Seeded splits: the defender's clean subset and the validation / reported-test split.

Defender data: a random 5% of the clean training set (BackdoorBench's default ratio),
not class-balanced, as the TSBD reference samples it: ``random.sample(range(n), int(n * ratio))``
in the reference's ``defense/tsbd.py`` keeps the sample's random order and truncates the size,
and so do we. Order matters because TSBD walks the defender set without shuffling: a sorted
subset of a class-sorted dataset (GTSRB, Tiny-ImageNet as loaded) would give batches of a few
classes each. Test data: a seeded part is held out
as the validation split that tuning may read; the rest is the reported test split, which no
tuning objective ever reads.
"""
from __future__ import annotations

import torch

from defense.data import Data


def defender_subset(clean_train: Data, ratio: float = 0.05, seed: int = 0) -> tuple[Data, torch.Tensor]:
    """A random ``ratio`` of the clean training set, in seeded random order; returns the subset
    and its indices. The size is ``int(n * ratio)`` (truncated, as the reference), at least 1."""
    if not 0 < ratio <= 1:
        raise ValueError(f"defender ratio must be in (0, 1], got {ratio}")
    n = len(clean_train)
    k = max(1, int(n * ratio))
    gen = torch.Generator().manual_seed(10_007 * seed + 1)
    idx = torch.randperm(n, generator=gen)[:k]
    return clean_train.subset(idx), idx


def val_test_indices(n_test: int, val_ratio: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint sorted index sets (val, test) over the original test set."""
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    gen = torch.Generator().manual_seed(20_011 * seed + 7)
    perm = torch.randperm(n_test, generator=gen)
    k = int(round(n_test * val_ratio))
    return perm[:k].sort().values, perm[k:].sort().values
