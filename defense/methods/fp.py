"""FP: Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018, arXiv 1805.12185).

1. Rank the channels of the last convolutional layer by their mean activation on clean data.
2. Prune them in that order, lowest first, while clean accuracy stays within ``acc_ratio``
   (relative) of the unpruned model; backdoor neurons tend to be dormant on clean inputs.
3. Fine-tune with the pruned channels held at zero.

How "the last conv layer" is found for any model: the channels are those the classifier sees,
i.e. the input of the last ``nn.Linear`` (after global pooling: the last conv block's
channels in tiny_cnn, PreAct-ResNet18 and VGG19-BN). Pruning a channel zeroes its column of
the classifier's weight, which removes it from every path (in PreAct-ResNet18 also from the
identity shortcut, which masking the conv weight would miss). This is what BackdoorBench's
``defense/fp.py`` does (a forward hook on the last child's input, ``prune.custom_from_mask`` on
the first Linear's columns). Because pruning acts only on the classifier's input, the clean
accuracy of every pruning prefix is computed exactly from features extracted once.

Defaults: BackdoorBench ``config/defense/fp/config.yaml``: acc_ratio 0.1, once_prune_ratio
0.01 (prune 1% of the channels per step), fine-tuning SGD lr 0.01 momentum 0.9 wd 5e-4,
batch 256, cosine, 100 epochs.

Deviations: accuracy is measured on the defender's clean data, not the clean test set; the
kept pruning is the largest prefix within the bound (BackdoorBench's loop keeps the network
object it last pruned, i.e. the first prefix that broke the bound, and prunes one channel
fewer than its counter says).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from defense.methods import DefenseOutput, register_defense
from defense.methods._common import (apply_masks, bake_masks, clean_acc, finetune, last_linear, within_bound,
                                     working_copy)
from defense.data.augment import normalize


@dataclass
class FPParams:
    acc_ratio: float = 0.1  # BackdoorBench fp/config.yaml: tolerated relative clean-accuracy drop
    once_prune_ratio: float = 0.01  # idem: share of channels pruned per step
    epochs: int = 100  # idem: fine-tuning epochs
    batch_size: int = 256  # idem
    lr: float = 0.01  # idem
    momentum: float = 0.9  # idem
    weight_decay: float = 5e-4  # idem
    schedule: str = "cosine"  # idem

    def check(self):
        if not 0 <= self.acc_ratio < 1:
            yield f"acc_ratio must be in [0, 1), got {self.acc_ratio}"
        if not 0 < self.once_prune_ratio <= 1:
            yield f"once_prune_ratio must be in (0, 1], got {self.once_prune_ratio}"
        if self.epochs < 0:
            yield f"epochs must be >= 0, got {self.epochs}"


@torch.no_grad()
def classifier_features(model, data, batch_size: int = 512) -> torch.Tensor:
    """The classifier's input for every image (eval mode, no augmentation): (N, C)."""
    _, lin = last_linear(model)
    feats = []
    hook = lin.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach().flatten(1)))
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        for i in range(0, len(data), batch_size):
            model(normalize(data.x[i : i + batch_size].to(dev), data.info))
    finally:
        hook.remove()
        model.train(was)
    return torch.cat(feats)


def rank_by_activation(feats: torch.Tensor) -> torch.Tensor:
    """Channel indices, lowest mean clean activation first (the pruning order of Fine-Pruning)."""
    return torch.argsort(feats.mean(0), stable=True)


@torch.no_grad()
def prune_prefix(feats, labels, weight, bias, order, acc_ratio: float, once_prune_ratio: float):
    """Largest prefix of ``order`` whose pruning keeps clean accuracy within the bound, by steps of
    ``ceil(C * once_prune_ratio)`` channels, stopping at the first step that breaks it."""
    c = feats.shape[1]
    step = max(1, math.ceil(c * once_prune_ratio))
    labels = labels.to(feats.device)

    def acc_with(k: int) -> float:
        keep = torch.ones(c, device=feats.device)
        keep[order[:k]] = 0
        logits = (feats * keep) @ weight.T + (bias if bias is not None else 0)
        return float((logits.argmax(1) == labels).float().mean())

    acc0 = acc_with(0)
    kept, curve = 0, [{"phase": "prune", "pruned": 0, "clean_acc": acc0}]
    for k in range(step, c, step):
        acc = acc_with(k)
        curve.append({"phase": "prune", "pruned": k, "clean_acc": acc})
        if not within_bound(acc, acc0, acc_ratio):
            break
        kept = k
    return kept, acc0, curve


@register_defense("fp", params=FPParams)
def defend(model, clean, p: FPParams, ctx):
    """Fine-Pruning: prune dormant last-layer channels (clean-accuracy bound), then fine-tune."""
    net = working_copy(model, ctx.device)
    clean = clean.to(next(net.parameters()).device)
    name, lin = last_linear(net)
    feats = classifier_features(net, clean)
    if feats.shape[1] != lin.in_features:
        raise ValueError(f"classifier input has {feats.shape[1]} features, expected {lin.in_features}")
    order = rank_by_activation(feats)
    k, acc0, curve = prune_prefix(feats, clean.y, lin.weight, lin.bias, order, p.acc_ratio, p.once_prune_ratio)
    pruned = order[:k]
    mask = torch.ones_like(lin.weight)
    mask[:, pruned] = 0
    apply_masks(net, {name: mask})
    acc_pruned = clean_acc(net, clean)
    hist = finetune(net, clean, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, momentum=p.momentum,
                    weight_decay=p.weight_decay, schedule=p.schedule, seed=ctx.seed, device=ctx.device)
    bake_masks(net, [name])
    diag = {"layer": name, "channels": int(feats.shape[1]), "pruned": int(k),
            "pruned_channels": [int(i) for i in pruned.tolist()], "clean_acc_before": acc0,
            "clean_acc_pruned": acc_pruned, "clean_acc": clean_acc(net, clean)}
    return DefenseOutput(net, diag, curve + [{"phase": "finetune", **h} for h in hist])
