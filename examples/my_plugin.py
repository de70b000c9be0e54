"""An example plugin: a dataset, a model, an attack and a defense of your own, used by a grid
through the spec's ``imports:`` (see ``examples/plugin.yaml`` and the README, "Your own dataset,
model, attack or defense").

bdgrid imports the module in the driver before it validates the spec (so these names are
known, and a typo in them is reported like any other) and in every Ray worker before a stage
runs. The spec's own folder is on the import path, so this file needs no install.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from defense.attacks import choose_poison, poison_with, register_attack
from defense.data import Data, DatasetInfo, register_dataset
from defense.methods import DefenseOutput, register_defense
from defense.methods._common import clean_acc, finetune, last_linear, working_copy
from defense.models import register_model

# ----------------------------------------------------------------------------- a dataset

STRIPES = DatasetInfo("stripes", num_classes=4, channels=3, size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                      flip=False, pad=4, needs_root=False)  # generated: no files


@dataclass
class StripesParams:
    n_train: int = 4000
    n_test: int = 1000
    seed: int = 0


@register_dataset("stripes", info=STRIPES, params=StripesParams)
def load_stripes(root, n_train: int, n_test: int, seed: int):
    """Gratings in 4 orientations (the class), random frequency, phase and colours, plus noise.
    Generated, so ``needs_root=False`` in its info and ``root`` is ignored; a file-backed dataset
    reads its files from ``root`` (see defense/data/files.py)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    y = torch.randint(0, 4, (n,), generator=g)
    angle = y.float() * math.pi / 4 + (torch.rand(n, generator=g) - 0.5) * 0.3
    freq = 0.25 + 0.35 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    proj = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    wave = 0.5 + 0.5 * torch.sin(freq[:, None, None] * proj + phase[:, None, None])  # (n, 32, 32)
    lo, hi = torch.rand(n, 3, 1, 1, generator=g) * 0.4, 0.6 + torch.rand(n, 3, 1, 1, generator=g) * 0.4
    img = lo + (hi - lo) * wave[:, None] + 0.08 * torch.randn(n, 3, 32, 32, generator=g)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return Data(x[:n_train], y[:n_train], STRIPES), Data(x[n_train:], y[n_train:], STRIPES)


# ----------------------------------------------------------------------------- a model

@register_model("mlp")
def mlp(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, hidden: int = 256) -> nn.Module:
    """Two-layer perceptron; its last ``nn.Linear`` is the classifier (what FP, NAD and the
    defense below look for)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


# ----------------------------------------------------------------------------- an attack

@dataclass
class CheckerParams:
    size: int = 4  # side of the checkerboard patch, pixels

    def check(self):  # range problems are reported by `bdgrid validate`, with their line
        if not 2 <= self.size <= 16:
            yield f"size must be in [2, 16], got {self.size}"


@register_attack("corner_checker", params=CheckerParams, kind="dirty-label", rate_of="training set")
def corner_checker(train, test, p: CheckerParams, ctx):
    """A black-and-white checkerboard in the bottom-right corner, all-to-one (relabelled)."""
    s = p.size
    board = ((torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 * 255).to(torch.uint8)

    def stamp(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[..., -s:, -s:] = board.to(x.device)
        return x

    idx = choose_poison(train.y, ctx.pratio, ctx.target, ctx.seed)
    return poison_with(train, test, idx, stamp, ctx.target)


# ----------------------------------------------------------------------------- a defense

@dataclass
class ReinitHeadParams:
    epochs: int = 20
    lr: float = 0.01
    batch_size: int = 128


@register_defense("reinit_head", params=ReinitHeadParams)
def reinit_head(model, clean, p: ReinitHeadParams, ctx):
    """Re-initialise the classifier and fine-tune the whole model on the defender's clean data.
    Defenses get a model and the clean subset only (never the target or test data) and return
    a purified copy of the same architecture."""
    net = working_copy(model, ctx.device)
    clean = clean.to(next(net.parameters()).device)
    name, head = last_linear(net)
    torch.manual_seed(ctx.seed)
    head.reset_parameters()
    hist = finetune(net, clean, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, momentum=0.9, weight_decay=5e-4,
                    schedule="cosine", seed=ctx.seed, device=ctx.device)
    ctx.log(f"reinit_head: re-initialised {name}, fine-tuned {p.epochs} epochs")
    return DefenseOutput(net, {"head": name, "clean_acc": clean_acc(net, clean)},
                         [{"phase": "finetune", **h} for h in hist])
