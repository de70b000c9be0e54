"""RNP: Reconstructive Neuron Pruning (Li et al., ICML 2023, arXiv 2305.14876).

1. Unlearn: gradient ascent on the clean cross-entropy of a copy of the model (SGD lr 0.01,
   momentum 0.9, wd 5e-4, lr x0.1 at epochs 10 and 20) until its training accuracy on the
   clean data is <= ``clean_threshold``, at most ``unlearning_epochs`` epochs.
2. Recover: on the unlearned model, learn a mask in [0, 1] per BatchNorm neuron (multiplying
   the BN weight, as the reference's ``MaskBatchNorm2d``) by minimising ``alpha * CE`` on the
   clean data, weights frozen. Clean behaviour comes back through the clean neurons; the
   backdoor neurons, not needed for it, keep low masks.
3. Prune: zero the BN weight of the *original* model's neurons whose mask is <= a threshold.

The threshold is chosen from clean data only, as for ANP: thresholds 0, 0.05, ..., 0.9, the
largest whose clean accuracy on the defender's data is within ``acc_ratio`` (relative) of the
unpruned model's. (BackdoorBench keeps the one with the lowest test ASR, which a defender
cannot measure.)

Defaults: BackdoorBench ``defense/rnp.py`` argparser and ``config/defense/rnp/config.yaml``:
alpha 0.2, clean_threshold 0.20, unlearning_lr 0.01, recovering_lr 0.2, unlearning_epochs 20,
recovering_epochs 20, schedule [10, 20], pruning_max 0.9, pruning_step 0.05, acc_ratio 0.1,
batch 256. The reference calls ``clip_grad_norm_(max_norm=20)`` before ``backward()``, where it
has no effect; we clip after ``backward()`` (``clip_norm``, 0 turns it off). The reference
uses 1% of the training set (``ratio 0.01``); here the defender's subset is what the grid
gives (5% by default).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from defense.methods import DefenseOutput, register_defense
from defense.methods._common import bn_forward, bn_layers, fit, seeded, working_copy
from defense.methods.anp import prune_by_masks, warn_if_unpruned


@dataclass
class RNPParams:
    clean_threshold: float = 0.20  # BackdoorBench rnp.py: stop unlearning at this clean training accuracy
    unlearning_lr: float = 0.01  # idem
    unlearning_epochs: int = 20  # idem
    schedule: list[int] = field(default_factory=lambda: [10, 20])  # idem: lr x0.1 at these epochs
    clip_norm: float = 20.0  # idem (max_norm), applied after backward here
    recovering_lr: float = 0.2  # idem: mask SGD lr (momentum 0.9)
    recovering_epochs: int = 20  # idem
    alpha: float = 0.2  # idem: loss weight in recovery
    batch_size: int = 256  # BackdoorBench rnp/config.yaml
    pruning_max: float = 0.9  # rnp.py
    pruning_step: float = 0.05  # rnp.py
    acc_ratio: float = 0.1  # rnp/config.yaml (on the defender's data here)

    def check(self):
        if not 0 <= self.clean_threshold <= 1:
            yield f"clean_threshold must be in [0, 1], got {self.clean_threshold}"
        if not 0 < self.pruning_step <= self.pruning_max <= 1:
            yield "need 0 < pruning_step <= pruning_max <= 1"
        if not 0 <= self.acc_ratio < 1:
            yield f"acc_ratio must be in [0, 1), got {self.acc_ratio}"
        if self.unlearning_epochs < 0 or self.recovering_epochs < 0:
            yield "epochs must be >= 0"


def unlearn(model, clean, p: RNPParams, gen) -> tuple[torch.nn.Module, list[dict]]:
    """Gradient ascent on clean data until training accuracy <= clean_threshold (a copy)."""
    net = working_copy(model, next(model.parameters()).device)
    opt = torch.optim.SGD(net.parameters(), lr=p.unlearning_lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(p.schedule), gamma=0.1)

    def step(x, y):
        net.train()
        out = net(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        (-loss).backward()
        if p.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=p.clip_norm)
        opt.step()
        return {"loss": loss.detach(), "correct": (out.argmax(1) == y).sum()}

    def after(row):
        sched.step()
        return row["train_acc"] <= p.clean_threshold

    curve = fit(net, clean, step, epochs=p.unlearning_epochs, batch_size=p.batch_size, gen=gen,
                phase="unlearn", after_epoch=after)
    return net, curve


def recover_masks(unlearned, clean, p: RNPParams, gen) -> tuple[list[torch.Tensor], list[dict]]:
    """Masks on the unlearned model's BN weights, trained to restore clean accuracy."""
    net = unlearned
    for q in net.parameters():
        q.requires_grad_(False)
    layers = bn_layers(net)
    dev = next(net.parameters()).device
    masks = [torch.ones(m.num_features, device=dev, requires_grad=True) for _, m in layers]
    opt = torch.optim.SGD(masks, lr=p.recovering_lr, momentum=0.9)

    def step(x, y):
        net.train()
        out = bn_forward(net, x, layers, masks, None)
        loss = p.alpha * F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for m in masks:
                m.clamp_(0.0, 1.0)
        return {"loss": loss.detach(), "correct": (out.argmax(1) == y).sum()}

    curve = fit(net, clean, step, epochs=p.recovering_epochs, batch_size=p.batch_size, gen=gen, phase="recover")
    return [m.detach() for m in masks], curve


@register_defense("rnp", params=RNPParams)
def defend(model, clean, p: RNPParams, ctx):
    """Reconstructive Neuron Pruning; threshold from clean accuracy on the defender's data."""
    base = working_copy(model, ctx.device)
    clean = clean.to(next(base.parameters()).device)
    gen = seeded(ctx.seed, ctx.device)
    unlearned, un_curve = unlearn(base, clean, p, gen)
    masks, rec_curve = recover_masks(unlearned, clean, p, gen)
    net, diag, prune_curve = prune_by_masks(base, clean, masks, pruning_max=p.pruning_max,
                                            pruning_step=p.pruning_step, acc_ratio=p.acc_ratio)
    warn_if_unpruned("rnp", diag, prune_curve, p.acc_ratio, "Masks of neurons that clean accuracy needs reached "
                     "0 too (see diagnostics mask_quantiles); a larger acc_ratio accepts more accuracy loss.", ctx.log)
    diag["unlearn_epochs"] = len(un_curve)
    diag["unlearn_final_acc"] = un_curve[-1]["train_acc"] if un_curve else None
    return DefenseOutput(net, diag, un_curve + rec_curve + prune_curve)
