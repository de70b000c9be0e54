"""Batched augmentation and normalisation on tensors (no PIL, no per-image Python).

Random crop with zero padding and horizontal flip, as torchvision's ``RandomCrop(size,
padding)`` + ``RandomHorizontalFlip()`` do per image, here for a whole batch at once with
one gather: the images never leave their device.
"""
from __future__ import annotations

import torch

from defense.data import DatasetInfo


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Pad ``x`` (B, C, H, W) by ``pad`` zeros and take a random H x W window per image."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device if gen else "cpu").to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device if gen else "cpu").to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])  # (B, H)
    cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])  # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=gen, device=gen.device if gen else "cpu").to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, info: DatasetInfo, gen: torch.Generator | None = None) -> torch.Tensor:
    """The training augmentation of a dataset: crop (pad ``info.pad``), then flip where ``info.flip``."""
    x = random_crop(x, info.pad, gen)
    if info.flip:
        x = random_flip(x, gen)
    return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def normalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Float [0, 1] (or uint8) images -> zero-mean unit-std per channel, as the models expect."""
    x = to_float(x)
    mean = torch.tensor(info.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std
