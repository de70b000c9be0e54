"""Blended (Chen et al., 2017): a fixed image blended into poisoned inputs at alpha 0.2.

The paper and BackdoorBench blend the Hello Kitty picture; bdgrid downloads nothing, so the
blend image is drawn procedurally and deterministically from ``pattern_seed``: smooth
colour blobs plus fine stripes, a full-image, high-contrast pattern like a photo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defense.attacks import blend, choose_poison, poison_with, register_attack


@dataclass
class BlendedParams:
    alpha: float = 0.2  # blend weight of the pattern, train and test (BackdoorBench default)
    pattern_seed: int = 1234

    def check(self):
        if not 0 < self.alpha <= 1:
            yield "alpha must be in (0, 1]"


def blend_pattern(channels: int, size: int, seed: int) -> torch.Tensor:
    """A deterministic (C, H, W) uint8 picture."""
    g = torch.Generator().manual_seed(seed)
    blobs = F.interpolate(torch.rand(1, channels, 4, 4, generator=g), size=(size, size), mode="bicubic",
                          align_corners=False)[0]
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * (xx * 0.21 + yy * 0.13))
    img = 0.7 * blobs + 0.3 * stripes
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    return (img * 255).round().to(torch.uint8)


@register_attack("blended", params=BlendedParams, kind="dirty-label", rate_of="training set (non-target images poisoned)")
def blended(train, test, p: BlendedParams, ctx):
    """Blend a fixed procedural image at alpha 0.2, all-to-one."""
    pat = blend_pattern(train.x.shape[1], train.x.shape[-1], p.pattern_seed)
    idx = choose_poison(train.y, ctx.pratio, ctx.target, ctx.seed)
    return poison_with(train, test, idx, lambda x: blend(x, pat.to(x.device), p.alpha), ctx.target)
