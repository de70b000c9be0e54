"""CLP: Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022, arXiv 2208.03111). Data-free.

For each convolution followed by a BatchNorm, channel k's upper bound on its Lipschitz
constant is the largest singular value of ``W_k * |gamma_k / sigma_k|`` with ``W_k`` reshaped
to ``(C_in, kh*kw)`` (conv and BN folded). Within each layer, channels whose bound exceeds
``mean + u * std`` (over that layer's channels; unbiased std, as ``torch.Tensor.std``) are
pruned by zeroing the BN's weight and bias (the reference and BackdoorBench's ``CLP_prune``).

Which BN goes with which conv, for any model: the reference pairs each BN with the last conv
*registered* before it, which in PreAct-ResNet18 (BN before conv) pairs a block's ``bn1`` with
the previous block's shortcut conv. We pair by execution instead: one probe forward on a
zero image (no data involved) records the order modules run in, and each BN is paired with
the last Conv2d that ran before it with as many output channels (``bn2`` <- ``conv1``; a
block's ``bn1`` <- the previous block's ``conv2``, whose output, summed with the shortcut, is
its input). Convs with no BN of their own are not scored, as in the reference.

Defaults: u = 3 (BackdoorBench ``config/defense/clp/config.yaml`` and the paper).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from defense.methods import DefenseOutput, register_defense
from defense.methods._common import working_copy


@dataclass
class CLPParams:
    u: float = 3.0  # BackdoorBench clp/config.yaml; CLP paper default

    def check(self):
        if self.u < 0:
            yield f"u must be >= 0, got {self.u}"


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, in_channels: int, size: int) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs in execution order, found with a zero input."""
    order: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append((n, mod)))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        model(torch.zeros(1, in_channels, size, size, device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    pairs, last_conv = [], {}
    for name, m in order:
        if isinstance(m, nn.Conv2d):
            last_conv[m.out_channels] = name
        elif m.affine and m.num_features in last_conv:
            pairs.append((last_conv[m.num_features], name))
    return pairs


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per output channel: spectral norm of the BN-scaled conv kernel, (C_out,)."""
    w = conv.weight.detach().float()
    w = w.reshape(w.shape[0], w.shape[1], -1)  # (C_out, C_in, kh*kw): one matrix per channel
    scale = (bn.weight.detach().float() / bn.running_var.float().sqrt()).abs()
    return torch.linalg.matrix_norm(w * scale[:, None, None], ord=2)


@torch.no_grad()
def clp_prune(model: nn.Module, u: float, in_channels: int, size: int) -> dict[str, list[int]]:
    """Prune ``model`` in place; returns {bn name: pruned channel indices}."""
    mods = dict(model.named_modules())
    pruned = {}
    for conv_name, bn_name in conv_bn_pairs(model, in_channels, size):
        conv, bn = mods[conv_name], mods[bn_name]
        lips = channel_lipschitz(conv, bn)
        idx = torch.nonzero(lips > lips.mean() + u * lips.std()).flatten()
        bn.weight[idx] = 0.0
        bn.bias[idx] = 0.0
        pruned[bn_name] = [int(i) for i in idx.tolist()]
    return pruned


@register_defense("clp", params=CLPParams)
def defend(model, clean, p: CLPParams, ctx):
    """Channel Lipschitzness Pruning: data-free; ``clean`` is read only for the image shape."""
    net = working_copy(model, ctx.device)
    pruned = clp_prune(net, p.u, clean.info.channels, clean.info.size)
    net.eval()
    diag = {"pruned": {k: v for k, v in pruned.items() if v}, "n_pruned": sum(len(v) for v in pruned.values()),
            "layers": len(pruned)}
    return DefenseOutput(net, diag)
