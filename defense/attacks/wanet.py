"""WaNet (Nguyen & Tran, ICLR 2021, "WaNet: imperceptible warping-based backdoor attack").

The trigger is a fixed smooth warp of the image: a random ``k x k`` field of 2-D offsets,
normalised to mean absolute value 1, upsampled bicubically to the image size, scaled by
``s / H`` and added to the identity sampling grid (clamped to [-1, 1], times
``grid_rescale``); the image is resampled with ``grid_sample``. Training-controlled: in every
batch a share ``pratio`` of the images is warped and relabelled to the target, and a share
``pratio * cross_ratio`` (the "noise mode") is warped with the trigger grid plus a random
per-image perturbation of up to one pixel, keeping its label, so the model learns the exact
warp and not warping in general.

Defaults (BackdoorBench ``config/attack/wanet/default.yaml``): k 4, s 0.5, grid_rescale 1,
cross_ratio 2 (rho_a = pratio, rho_n = pratio * cross_ratio). BackdoorBench trains WaNet with
extra random rotation (10 deg) and crop (5 px) post-transforms; bdgrid trains every attack
with the dataset's one augmentation (crop + flip) and applies the warp after it (the hook).

``poison_idx`` is empty: which images carry the trigger is drawn anew in every batch.
``info['per_batch_rate']`` and ``info['per_batch_cross_rate']`` record the shares.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defense.attacks import Poisoned, register_attack
from defense.attacks._perbatch import empty_idx, nontarget, per_batch_count, quantize
from defense.data import Data
from defense.data.augment import to_float


@dataclass
class WaNetParams:
    k: int = 4  # control grid size (BackdoorBench default)
    s: float = 0.5  # warping strength (BackdoorBench default)
    grid_rescale: float = 1.0  # BackdoorBench default
    cross_ratio: float = 2.0  # noise-mode images per poisoned image (BackdoorBench default)

    def check(self):
        if self.k < 2:
            yield "k must be >= 2"
        if self.s <= 0:
            yield "s must be > 0"
        if self.cross_ratio < 0:
            yield "cross_ratio must be >= 0"


def warp_grids(size: int, p: WaNetParams, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(identity grid, noise grid), each (1, H, W, 2), deterministic from ``seed``."""
    gen = torch.Generator().manual_seed(7919 * seed + 4)
    ins = torch.rand(1, 2, p.k, p.k, generator=gen) * 2 - 1
    ins = ins / ins.abs().mean()  # mean |offset| 1 before scaling by s / H (as in the paper's code)
    noise = F.interpolate(ins, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    line = torch.linspace(-1, 1, size)
    gy, gx = torch.meshgrid(line, line, indexing="ij")
    identity = torch.stack((gx, gy), dim=2)[None]  # grid_sample wants (x, y) order
    return identity, noise


def trigger_grid(identity: torch.Tensor, noise: torch.Tensor, p: WaNetParams) -> torch.Tensor:
    size = identity.shape[1]
    return ((identity + p.s * noise / size) * p.grid_rescale).clamp(-1, 1)


def warp(x01: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample float images (B, C, H, W) with a (1 or B, H, W, 2) grid."""
    if grid.shape[0] == 1 and x01.shape[0] != 1:
        grid = grid.expand(x01.shape[0], -1, -1, -1)
    return F.grid_sample(x01, grid.to(x01.device, x01.dtype), align_corners=True)


class WaNetHook:
    """Per-batch poisoning for ``defense.train.train``: warp + relabel the first share of the
    (already shuffled) batch, noise-warp the next share, leave the rest clean."""

    def __init__(self, grid: torch.Tensor, pratio: float, cross_ratio: float, target: int, seed: int):
        self.grid = grid
        self.pratio = pratio
        self.cross_ratio = cross_ratio
        self.target = target
        self.gen = torch.Generator().manual_seed(104_729 * seed + 3)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, model=None):
        b, size = x.shape[0], x.shape[-1]
        nb = per_batch_count(self.pratio, b, self.gen)
        nc = min(per_batch_count(self.pratio * self.cross_ratio, b, self.gen), b - nb)
        if nb + nc == 0:
            return x, y
        x, y = x.clone(), y.clone()
        if nb:
            x[:nb] = warp(x[:nb], self.grid)
            y[:nb] = self.target
        if nc:
            jitter = (torch.rand(nc, size, size, 2, generator=self.gen) * 2 - 1) / size
            g = (self.grid + jitter).clamp(-1, 1)
            x[nb:nb + nc] = warp(x[nb:nb + nc], g)
        return x, y


@register_attack("wanet", params=WaNetParams, kind="training-controlled",
                 rate_of="each training batch (pratio warped + relabelled, pratio*cross_ratio noise-warped)",
                 resources=())
def wanet(train: Data, test: Data, p: WaNetParams, ctx):
    """Warping trigger, k 4, s 0.5, cross ratio 2; poisoned per batch during training."""
    identity, noise = warp_grids(train.x.shape[-1], p, ctx.seed)
    grid = trigger_grid(identity, noise, p)
    bd_idx = nontarget(test, ctx.target)
    bx = quantize(warp(to_float(test.x[bd_idx].cpu()), grid))
    bd_true = test.y[bd_idx].cpu().clone()
    bd = Data(bx, torch.full_like(bd_true, ctx.target), test.info)
    hook = WaNetHook(grid, ctx.pratio, p.cross_ratio, ctx.target, ctx.seed)
    return Poisoned(train, empty_idx(), bd, bd_idx, bd_true, hook=hook,
                    info={"rate_of": "each training batch", "per_batch_rate": ctx.pratio,
                          "per_batch_cross_rate": ctx.pratio * p.cross_ratio, "grid": grid})
