"""SIG (Barni et al., 2019): a horizontal sinusoid added to images, clean label.

x'[i, j] = x[i, j] + delta * sin(2 * pi * j * f / W), delta 40, f 6 (BackdoorBench defaults).
Clean label: only target-class training images are poisoned and keep their labels. The rate
``pratio`` is a fraction of the whole training set, drawn from the target class only (so at
most 1/num_classes of the set on balanced data): the BackdoorBench convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from defense.attacks import add, choose_poison, poison_with, register_attack


@dataclass
class SIGParams:
    delta: float = 40.0  # amplitude on the [0, 255] scale
    f: float = 6.0  # periods across the image width

    def check(self):
        if self.delta <= 0:
            yield "delta must be > 0"


def signal(width: int, p: SIGParams) -> torch.Tensor:
    j = torch.arange(width).float()
    return (p.delta * torch.sin(2 * math.pi * j * p.f / width)).view(1, 1, 1, width)


@register_attack("sig", params=SIGParams, kind="clean-label",
                 rate_of="training set, drawn from target-class images only (labels kept)")
def sig(train, test, p: SIGParams, ctx):
    """Sinusoidal signal, clean label."""
    sgl = signal(train.x.shape[-1], p)
    idx = choose_poison(train.y, ctx.pratio, ctx.target, ctx.seed, clean_label=True)
    out = poison_with(train, test, idx, lambda x: add(x, sgl.to(x.device)), ctx.target, relabel=False)
    out.info["rate_of"] = "training set, target class only"
    return out
