"""BadNets (Gu et al., 2017): a 3x3 white patch in the bottom-right corner, dirty label.

BackdoorBench's CIFAR-10 default trigger is a 3x3 white square at the bottom-right; the
size scales with ``patch``; ``margin`` pixels from the border (0 = in the corner).
"""
from __future__ import annotations

from dataclasses import dataclass

from defense.attacks import choose_poison, poison_with, register_attack


@dataclass
class BadNetsParams:
    patch: int = 3  # side of the square trigger, pixels
    margin: int = 0  # distance from the bottom-right border, pixels
    value: int = 255  # trigger pixel value (white)

    def check(self):
        if self.patch < 1:
            yield "patch must be >= 1"
        if not 0 <= self.value <= 255:
            yield "value must be in [0, 255]"


def stamp(x, p: BadNetsParams):
    out = x.clone()
    h, w = x.shape[-2:]
    out[..., h - p.margin - p.patch : h - p.margin, w - p.margin - p.patch : w - p.margin] = p.value
    return out


@register_attack("badnets", params=BadNetsParams, kind="dirty-label", rate_of="training set (non-target images poisoned)")
def badnets(train, test, p: BadNetsParams, ctx):
    """3x3 white patch, bottom-right, all-to-one."""
    idx = choose_poison(train.y, ctx.pratio, ctx.target, ctx.seed)
    return poison_with(train, test, idx, lambda x: stamp(x, p), ctx.target)
