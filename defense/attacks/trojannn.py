"""TrojanNN (Liu et al., NDSS 2018, "Trojaning attack on neural networks"), as BackdoorBench
runs it (``attack/trojannn.py``): a patch trigger optimised to excite chosen neurons of a
clean model, then ordinary dirty-label poisoning of a model trained from scratch.

1. Clean reference model of the same dataset and architecture (resource ``clean_model``,
   shared with LF).
2. Neurons: the inputs of the model's last ``nn.Linear`` (BackdoorBench's
   ``selected_layer_name: linear`` for PreAct-ResNet18) with the largest summed |weight| to the
   outputs (``get_most_connected_neuron_idxes``), ``num_neuron`` of them.
3. Trigger: start from a mask image and run signed-gradient descent on its pixels (step
   ``alpha``, at most ``eps`` from the start, pixels in [0, 1], ``iters`` steps, stop early when
   the cost is below ``tolerance``) on ``sum_i (a_i - neuron_target)^2``; only pixels inside the
   mask are fed to the model and kept (resource ``trojannn_trigger``).
4. Poisoning adds the trigger to images, clipped to [0, 255].

Defaults (BackdoorBench ``config/attack/trojannn/preactresnet18.yaml`` and the function's
defaults): num_neuron 2, neuron_target 100, iters 1000 (mask_update_iters), eps 0.3, alpha
0.1, tolerance 1e-3. Deviations: BackdoorBench's mask is a picture file
(``resource/trojannn/apple4.png``); ours is drawn (a ``mask_shape`` of side ``mask_size`` in the
bottom-right corner, start value ``init``), since bdgrid downloads nothing. BackdoorBench
feeds the unnormalised mask image to the model and casts ``trigger + image`` to uint8 before
clipping (which wraps around); we normalise as the model expects and clip properly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn

from defense.attacks import add, choose_poison, poison_with, register_attack
from defense.data.augment import normalize
from defense.resources import clean_reference_model, data_fingerprint, get_resource
from defense.train import pick_device

VERSION = "1"


@dataclass
class TrojanNNParams:
    num_neuron: int = 2  # BackdoorBench default
    neuron_target: float = 100.0  # BackdoorBench neuron_target_values
    iters: int = 1000  # BackdoorBench mask_update_iters
    eps: float = 0.3  # BackdoorBench pgd_with_mask_to_selected_neuron default
    alpha: float = 0.1  # BackdoorBench pgd_with_mask_to_selected_neuron default
    tolerance: float = 1e-3  # BackdoorBench pgd_with_mask_to_selected_neuron default
    mask_shape: Literal["square", "circle"] = "square"  # bdgrid (BackdoorBench: apple4.png)
    mask_size: int = 8  # side of the mask, pixels, bottom-right corner (bdgrid)
    init: float = 0.5  # start value of the trigger pixels, [0, 1] (bdgrid)
    ref_epochs: int | None = None  # clean reference model epochs; None = the recipe's

    def check(self):
        if self.num_neuron < 1:
            yield "num_neuron must be >= 1"
        if self.mask_size < 1:
            yield "mask_size must be >= 1"
        if not 0 < self.init <= 1:
            yield "init must be in (0, 1]"


def trigger_mask(size: int, p: TrojanNNParams) -> torch.Tensor:
    """(1, H, W) 0/1 mask of the trigger region, bottom-right corner."""
    m = torch.zeros(1, size, size)
    s = min(p.mask_size, size)
    if p.mask_shape == "square":
        m[:, size - s:, size - s:] = 1
    else:
        c = size - s / 2
        yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        m[0] = (((yy - c) ** 2 + (xx - c) ** 2) <= (s / 2) ** 2).float()
    return m


def last_linear(model: nn.Module) -> nn.Linear:
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not lins:
        raise ValueError("TrojanNN needs a model with an nn.Linear layer")
    return lins[-1]


def most_connected(layer: nn.Linear, k: int) -> torch.Tensor:
    """Input neurons of ``layer`` with the largest summed |weight| (BackdoorBench's rule)."""
    return torch.argsort(layer.weight.detach().abs().sum(0), descending=True)[:k]


def optimise_trigger(model: nn.Module, info, p: TrojanNNParams, device,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm.auto import tqdm

    """(trigger (C, H, W) in [0, 1], zero outside the mask; selected neuron indices)."""
    device = pick_device(device)
    model = model.to(device).eval().requires_grad_(False)
    layer = last_linear(model)
    neurons = most_connected(layer, p.num_neuron).to(device)
    feats = {}
    handle = layer.register_forward_pre_hook(lambda mod, inp: feats.__setitem__("a", inp[0]))
    mask = trigger_mask(info.size, p).to(device)
    start = (mask * p.init).expand(info.channels, -1, -1)[None].clone()
    img = start.clone()
    try:
        for _ in tqdm(range(p.iters), desc="TrojanNN trigger", unit="it", leave=False, disable=not progress):
            img.requires_grad_(True)
            model(normalize(img * mask, info))
            cost = ((feats["a"][:, neurons] - p.neuron_target) ** 2).sum()
            (g,) = torch.autograd.grad(cost, img)
            img = (start + (img.detach() - p.alpha * g.sign() - start).clamp(-p.eps, p.eps)).clamp(0, 1)
            if cost.item() < p.tolerance:
                break
    finally:
        handle.remove()
    return (img * mask)[0].detach().cpu(), neurons.cpu()


@register_attack("trojannn", params=TrojanNNParams, kind="dirty-label",
                 rate_of="training set (non-target images poisoned)", resources=("clean_model", "trojannn_trigger"))
def trojannn(train, test, p: TrojanNNParams, ctx):
    """Patch trigger optimised to excite the most connected neurons of a clean model's last linear layer."""
    info: dict = {}
    cfg = {"data": data_fingerprint(train), "arch": ctx.arch, "seed": ctx.seed,
           "recipe": asdict(ctx.recipe) if ctx.recipe is not None else None, **asdict(p)}

    def compute():
        model = clean_reference_model(train, ctx, p.ref_epochs, log=info)
        trig, neurons = optimise_trigger(model, train.info, p, ctx.device, ctx.progress)
        return {"trigger": trig, "neurons": neurons}

    res = get_resource(ctx.resources, "trojannn_trigger", cfg, compute, VERSION, info)
    t255 = res["trigger"] * 255
    idx = choose_poison(train.y, ctx.pratio, ctx.target, ctx.seed)
    out = poison_with(train, test, idx, lambda x: add(x, t255.to(x.device)), ctx.target)
    out.info.update(info, trigger=res["trigger"], neurons=res["neurons"])
    return out
