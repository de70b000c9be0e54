"""Datasets as whole uint8 tensors in memory, a registry of loaders, and seeded splits.

A dataset is ``Data(x, y, info)``: ``x`` uint8 ``(N, C, H, W)``, ``y`` int64 ``(N,)``. It sits
whole on one device (the GPU when there is one), so batches are index slices and
augmentation is a few tensor ops per batch (see ``defense.data.augment``); no DataLoader,
no PIL in the training loop (the airbench approach).

Adding a dataset is one function decorated with ``@register_dataset(name, info=...)``
returning ``(train, test)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from defense.registry import Registry

DATASETS = Registry("dataset")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int  # images are size x size
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    flip: bool = True  # horizontal flip in training augmentation (off for GTSRB: signs are not mirror-symmetric)
    pad: int = 4  # random-crop padding (BackdoorBench: 4 for 32x32)
    needs_root: bool = True  # False for generated data (synthetic)


@dataclass
class Data:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)
    info: DatasetInfo

    def __post_init__(self):
        if self.x.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {self.x.dtype}")
        if self.x.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64:
            self.y = self.y.long()
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "Data":
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def subset(self, idx: torch.Tensor) -> "Data":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.x.device)
        return replace(self, x=self.x[idx], y=self.y[idx])

    @property
    def device(self) -> torch.device:
        return self.x.device


def register_dataset(name: str, info: DatasetInfo, params: type | None = None) -> Callable:
    """Register ``fn(root: Path | None, **params) -> (train: Data, test: Data)`` under ``name``."""
    return DATASETS.register(name, params=params, info=info)


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name).meta["info"]


def load_dataset(name: str, root: str | Path | None = None, **params) -> tuple[Data, Data]:
    """Load ``(train, test)`` for a registered dataset, on the CPU.

    ``root`` is where the standard on-disk files live (ignored by ``synthetic``).
    """
    entry = DATASETS.get(name)
    p = entry.make_params(params)
    kwargs = {} if p is None else {k: getattr(p, k) for k in p.__dataclass_fields__}
    return entry.fn(Path(root) if root is not None else None, **kwargs)


# Registration side effects: importing the package makes every built-in dataset available.
from defense.data import synthetic as _synthetic  # noqa: E402,F401
from defense.data import cifar, gtsrb, mnist, tiny_imagenet  # noqa: E402,F401
