"""NWC-FP: Fine-Pruning with neurons ordered by TSBD's neuron weight change instead of activation.

An ablation that isolates TSBD's neuron *ranking* (Lin et al., NeurIPS 2024, Stage 1a/1b:
clean unlearning, then per-channel L1 weight change) from its *repair* (zero
reinitialisation + activeness-aware fine-tuning): the neurons are pruned and the model is
fine-tuned exactly as Fine-Pruning does (``fp``), only the order differs.

1. ``clean_unlearn`` + ``neuron_weight_change`` from ``defense.methods.tsbd`` (shared with a
   TSBD sweep through ``prepare``; same defaults as TSBD).
2. Walk the NWC ranking, highest change first (``scope="all"``: every non-shortcut conv
   neuron, TSBD's global ranking; ``scope="last"``: only the last scored conv layer, the layer
   FP prunes); prune ``ceil(N * once_prune_ratio)`` more neurons per step while clean accuracy
   on the defender's data stays within ``acc_ratio`` (relative) of the unpruned model; keep
   the largest prefix within the bound. A pruned neuron is a zeroed output channel of its
   conv (all its kernel weights), held at zero through fine-tuning.
3. Fine-tune as FP (BackdoorBench fp defaults: SGD lr 0.01, momentum 0.9, wd 5e-4, batch
   256, cosine, 100 epochs).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from defense.methods import DefenseOutput, register_defense
from defense.methods._common import apply_masks, bake_masks, clean_acc, finetune, within_bound, working_copy
from defense.methods.tsbd import NWC, TSBDParams, clean_unlearn, neuron_weight_change

_T = TSBDParams(n=0.1)


@dataclass
class NWCFPParams:
    # Stage 1a/1b, as TSBD (defense/methods/tsbd.py, from the reference's config.yaml)
    layer_type: Literal["conv"] = "conv"
    lr_un: float = _T.lr_un
    momentum: float = _T.momentum
    un_threshold: float = 0.10
    max_un_epochs: int = _T.max_un_epochs
    batch_size: int = _T.batch_size
    augment: bool = _T.augment
    # pruning, as FP (BackdoorBench fp/config.yaml)
    scope: Literal["all", "last"] = "all"  # ours: the global ranking (TSBD) or the last conv layer (FP)
    acc_ratio: float = 0.1
    once_prune_ratio: float = 0.01
    # fine-tuning, as FP
    epochs: int = 100
    ft_batch_size: int = 256
    lr: float = 0.01
    ft_momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"

    def check(self):
        if not 0 <= self.acc_ratio < 1:
            yield f"acc_ratio must be in [0, 1), got {self.acc_ratio}"
        if not 0 < self.once_prune_ratio <= 1:
            yield f"once_prune_ratio must be in (0, 1], got {self.once_prune_ratio}"
        if not 0 <= self.un_threshold <= 1:
            yield f"un_threshold must be in [0, 1], got {self.un_threshold}"


SHARED = ("layer_type", "lr_un", "momentum", "un_threshold", "max_un_epochs", "batch_size", "augment")


def _tsbd_params(p: NWCFPParams) -> TSBDParams:
    return replace(_T, **{k: getattr(p, k) for k in SHARED})


def nwc_prepare(model, clean, p: NWCFPParams, ctx) -> dict:
    """Stages 1a/1b of TSBD (unlearning, NWC); a dict that round-trips through weights_only loads."""
    unlearned, curve = clean_unlearn(model, clean, _tsbd_params(p), ctx)
    nwc = neuron_weight_change(model, unlearned, p.layer_type)
    return {"nwc": nwc.to_dict(), "curve": curve, "unlearn_epochs": len(curve)}


def channel_masks(model, neurons: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """{conv name: weight mask} zeroing the output channels listed."""
    masks: dict[str, torch.Tensor] = {}
    for layer, j in neurons:
        if layer not in masks:
            masks[layer] = torch.ones_like(model.get_submodule(layer).weight)
        masks[layer][j] = 0
    return masks


@torch.no_grad()
def prune_ranked(model, clean, ranking: list[tuple[str, int]], acc_ratio: float, once_prune_ratio: float):
    """Largest prefix of ``ranking`` whose pruning keeps clean accuracy within the bound."""
    acc0 = clean_acc(model, clean)
    step = max(1, math.ceil(len(ranking) * once_prune_ratio))
    kept, curve = 0, [{"phase": "prune", "pruned": 0, "clean_acc": acc0}]
    for k in range(step, len(ranking), step):  # never every neuron (FP keeps one channel too)
        m = copy.deepcopy(model)
        for layer, w in channel_masks(m, ranking[:k]).items():
            m.get_submodule(layer).weight.mul_(w)
        acc = clean_acc(m, clean)
        curve.append({"phase": "prune", "pruned": k, "clean_acc": acc})
        if not within_bound(acc, acc0, acc_ratio):
            break
        kept = k
    return kept, acc0, curve


@register_defense("nwc_fp", params=NWCFPParams, prepare=nwc_prepare, shared=SHARED)
def defend(model, clean, p: NWCFPParams, ctx):
    """Fine-Pruning with neurons ordered by TSBD's neuron weight change (highest first)."""
    net = working_copy(model, ctx.device)
    clean = clean.to(next(net.parameters()).device)
    prep = ctx.prepared if ctx.prepared is not None else nwc_prepare(net, clean, p, ctx)
    nwc = NWC.from_dict(prep["nwc"])
    ranking = nwc.ranking
    if p.scope == "last":
        last = list(nwc.neuron)[-1]
        ranking = [(layer, j) for layer, j in ranking if layer == last]
    k, acc0, curve = prune_ranked(net, clean, ranking, p.acc_ratio, p.once_prune_ratio)
    masks = channel_masks(net, ranking[:k])
    apply_masks(net, masks)
    acc_pruned = clean_acc(net, clean)
    hist = finetune(net, clean, epochs=p.epochs, batch_size=p.ft_batch_size, lr=p.lr, momentum=p.ft_momentum,
                    weight_decay=p.weight_decay, schedule=p.schedule, seed=ctx.seed, device=ctx.device)
    bake_masks(net, masks)
    per_layer = {}
    for layer, _ in ranking[:k]:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    diag = {"scope": p.scope, "neurons": len(ranking), "pruned": int(k), "pruned_per_layer": per_layer,
            "top_neurons": [f"{layer}:{j}" for layer, j in ranking[:20]], "unlearn_epochs": prep["unlearn_epochs"],
            "clean_acc_before": acc0, "clean_acc_pruned": acc_pruned, "clean_acc": clean_acc(net, clean)}
    curves = [dict(r) for r in prep["curve"]] + curve + [{"phase": "finetune", **h} for h in hist]
    return DefenseOutput(net, diag, curves)
