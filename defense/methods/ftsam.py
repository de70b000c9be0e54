"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu et al., ICCV 2023,
"Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization",
arXiv 2304.11823), as BackdoorBench's ``defense/ft-sam.py`` runs it.

Each batch: g = grad L(w); perturb every parameter by ``e = rho * T^2 g / ||T g||`` with
``T = |w|`` (adaptive SAM, ASAM: Kwon et al. 2021; plain SAM has ``T = 1``); take the
gradient at ``w + e`` with BatchNorm running statistics frozen (momentum 0, as BackdoorBench's
``disable_running_stats``); restore ``w`` and step the base optimiser with that gradient.

Defaults: BackdoorBench ``config/defense/ft-sam/config.yaml`` and the script's argparser:
rho 2.0 (rho_max = rho_min, so constant), adaptive True (``--adaptive`` is ``store_false``),
label smoothing 0.1, SGD lr 0.01 momentum 0.9 wd 5e-4, batch 256, cosine, 100 epochs; the
gradient-decomposition weight ``alpha`` is 0 there, so it is left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.methods import DefenseOutput, register_defense
from defense.methods._common import clean_acc, cosine, fit, seeded, steps_per_epoch, working_copy


@dataclass
class FTSAMParams:
    rho: float = 2.0  # BackdoorBench ft-sam/config.yaml rho_max = rho_min
    adaptive: bool = True  # ft-sam.py: --adaptive is store_false, so ASAM by default
    label_smoothing: float = 0.1  # ft-sam/config.yaml
    epochs: int = 100  # idem
    batch_size: int = 256  # idem
    lr: float = 0.01  # idem
    momentum: float = 0.9  # idem
    weight_decay: float = 5e-4  # idem

    def check(self):
        if self.rho < 0:
            yield f"rho must be >= 0, got {self.rho}"
        if self.epochs < 0:
            yield f"epochs must be >= 0, got {self.epochs}"


class _FrozenBN:
    """Context: BatchNorm layers normalise with batch statistics but leave running stats alone."""

    def __init__(self, model: nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [m.momentum for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for m, mom in zip(self.bns, self.saved):
            m.momentum = mom
        return False


def sam_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, rho: float,
             adaptive: bool, label_smoothing: float = 0.0, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A)SAM step in place; returns (loss at w, logits at w)."""
    params = [q for q in model.parameters() if q.requires_grad]
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    loss.backward()
    with torch.no_grad():
        live = [q for q in params if q.grad is not None]
        scaled = [(q.abs() * q.grad if adaptive else q.grad) for q in live]
        norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2)
        scale = rho / (norm + eps)
        perturb = [q.grad * scale * (q.pow(2) if adaptive else 1.0) for q in live]
        for q, e in zip(live, perturb):
            q.add_(e)
    opt.zero_grad(set_to_none=True)
    with _FrozenBN(model):
        F.cross_entropy(model(x), y, label_smoothing=label_smoothing).backward()
    with torch.no_grad():
        for q, e in zip(live, perturb):
            q.sub_(e)
    opt.step()
    return loss.detach(), out.detach()


@register_defense("ftsam", params=FTSAMParams)
def defend(model, clean, p: FTSAMParams, ctx):
    """Fine-tuning with (adaptive) sharpness-aware minimisation, BackdoorBench's FT-SAM."""
    net = working_copy(model, ctx.device)
    dev = next(net.parameters()).device
    clean = clean.to(dev)
    gen = seeded(ctx.seed, dev)
    opt = torch.optim.SGD(net.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    sched = cosine(opt, p.epochs * steps_per_epoch(len(clean), p.batch_size))

    def step(x, y):
        net.train()
        loss, out = sam_step(net, x, y, opt, p.rho, p.adaptive, p.label_smoothing)
        sched.step()
        return {"loss": loss, "correct": (out.argmax(1) == y).sum()}

    curve = fit(net, clean, step, epochs=p.epochs, batch_size=p.batch_size, gen=gen, phase="finetune")
    net.eval()
    return DefenseOutput(net, {"clean_acc": clean_acc(net, clean)}, curve)
