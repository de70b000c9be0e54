"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021, arXiv 2110.14430).

Every BatchNorm neuron (channel) gets a mask m in [0, 1] and multiplicative noise: the BN
computes ``gamma * (m + d) * x_hat + beta * (1 + d_b)``. Per batch: draw ``d, d_b`` uniform in
``[-eps, eps]``, take ``anp_steps`` signed-gradient ascent steps of size ``eps / anp_steps`` on
the loss, then update the masks by SGD on
``alpha * CE(masked, no noise) + (1 - alpha) * CE(masked, adversarial noise)`` and clip them to
[0, 1]. Neurons whose mask ends low are the ones the backdoor needs; they are pruned by
zeroing the BN weight of the *original* model (the reference's ``pruning``).

The pruning threshold is chosen from clean data only: thresholds 0, 0.05, ..., 0.9 (the
reference's ``pruning_by: threshold`` grid); the largest one whose clean accuracy on the
defender's data stays within ``acc_ratio`` (relative) of the unpruned model's is kept.
BackdoorBench instead keeps the threshold with the lowest *test ASR* within the bound, which
needs poisoned test data a defender does not have. The model's masks are found in train
mode on a copy (BatchNorm uses batch statistics, as the reference's ``mask_train``); the
copy's running statistics are thrown away.

Defaults: BackdoorBench ``config/defense/anp/config.yaml``: anp_eps 0.4, anp_steps 1,
anp_alpha 0.2, mask lr 0.2 (SGD momentum 0.9), nb_iter 2000 batches of 256 drawn with
replacement, pruning_max 0.9, pruning_step 0.05, acc_ratio 0.1.
Works on models with BatchNorm2d layers (tiny_cnn, PreAct-ResNet18, VGG19-BN).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defense.methods import DefenseOutput, register_defense
from defense.methods._common import (bn_forward, bn_layers, choose_bn_threshold, clean_acc, prune_bn_neurons,
                                     seeded, working_copy)
from defense.train import make_batch


@dataclass
class ANPParams:
    anp_eps: float = 0.4  # BackdoorBench anp/config.yaml: noise bound
    anp_steps: int = 1  # idem: ascent steps on the noise per batch
    anp_alpha: float = 0.2  # idem: weight of the natural loss
    lr: float = 0.2  # idem: mask learning rate (SGD, momentum 0.9)
    nb_iter: int = 2000  # idem: mask-training batches
    batch_size: int = 256  # idem
    pruning_max: float = 0.9  # idem: largest threshold tried
    pruning_step: float = 0.05  # idem
    acc_ratio: float = 0.1  # idem: tolerated relative clean-accuracy drop (on the defender's data here)

    def check(self):
        if self.anp_eps < 0:
            yield f"anp_eps must be >= 0, got {self.anp_eps}"
        if self.anp_steps < 1:
            yield f"anp_steps must be >= 1, got {self.anp_steps}"
        if not 0 <= self.anp_alpha <= 1:
            yield f"anp_alpha must be in [0, 1], got {self.anp_alpha}"
        if not 0 < self.pruning_step <= self.pruning_max <= 1:
            yield "need 0 < pruning_step <= pruning_max <= 1"
        if not 0 <= self.acc_ratio < 1:
            yield f"acc_ratio must be in [0, 1), got {self.acc_ratio}"


def train_masks(model, clean, p: ANPParams, gen: torch.Generator) -> tuple[list[torch.Tensor], list[dict]]:
    """ANP's mask optimisation on a copy of ``model``; returns per-layer masks (detached) and a curve."""
    net = working_copy(model, next(model.parameters()).device)
    net.train()
    for q in net.parameters():
        q.requires_grad_(False)
    layers = bn_layers(net)
    dev = next(net.parameters()).device
    masks = [torch.ones(m.num_features, device=dev, requires_grad=True) for _, m in layers]
    noise = [torch.zeros(m.num_features, device=dev, requires_grad=True) for _, m in layers]
    noise_b = [torch.zeros(m.num_features, device=dev, requires_grad=True) for _, m in layers]
    mask_opt = torch.optim.SGD(masks, lr=p.lr, momentum=0.9)
    step_size = p.anp_eps / p.anp_steps
    # loss/accuracy sums stay on the device; the host reads them every 100 batches (the curve)
    curve, tot, correct, seen = [], torch.zeros((), device=dev), torch.zeros((), dtype=torch.long, device=dev), 0
    for it in range(p.nb_iter):
        idx = torch.randint(0, len(clean), (p.batch_size,), generator=gen)  # RandomSampler(replacement=True)
        x, y = make_batch(clean, idx, gen, True)
        if p.anp_eps > 0:
            with torch.no_grad():  # random start in the eps-box (the reference's reset(rand_init=True))
                for d in noise + noise_b:
                    d.copy_(torch.empty(d.shape).uniform_(-p.anp_eps, p.anp_eps, generator=gen))
            for _ in range(p.anp_steps):
                coef = [m.detach() + d for m, d in zip(masks, noise)]
                loss_noise = -F.cross_entropy(bn_forward(net, x, layers, coef, [1 + d for d in noise_b]), y)
                grads = torch.autograd.grad(loss_noise, noise + noise_b)
                with torch.no_grad():  # SGD on -loss with the sign of the gradient: ascent on the loss
                    for d, g in zip(noise + noise_b, grads):
                        d.sub_(step_size * g.sign())
            loss_rob = F.cross_entropy(bn_forward(net, x, layers, [m + d.detach() for m, d in zip(masks, noise)],
                                                  [1 + d.detach() for d in noise_b]), y)
        else:
            loss_rob = torch.zeros((), device=dev)
        out = bn_forward(net, x, layers, masks, None)
        loss = p.anp_alpha * F.cross_entropy(out, y) + (1 - p.anp_alpha) * loss_rob
        mask_opt.zero_grad(set_to_none=True)
        loss.backward()
        mask_opt.step()
        with torch.no_grad():
            for m in masks:
                m.clamp_(0.0, 1.0)
        tot += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
        if (it + 1) % 100 == 0 or it + 1 == p.nb_iter:
            curve.append({"phase": "mask", "iter": it + 1, "loss": float(tot) / seen, "train_acc": int(correct) / seen})
            tot.zero_(), correct.zero_()
            seen = 0
    return [m.detach() for m in masks], curve


def prune_by_masks(model, clean, masks, *, pruning_max, pruning_step, acc_ratio):
    """Choose the threshold on clean data, prune a copy of ``model``; returns (model, diagnostics, curve)."""
    net = working_copy(model, next(model.parameters()).device)
    layers = bn_layers(net)
    t, curve = choose_bn_threshold(net, clean, layers, masks, pruning_max=pruning_max, pruning_step=pruning_step,
                                   acc_ratio=acc_ratio)
    n = prune_bn_neurons(net, layers, masks, t) if t is not None else 0
    net.eval()
    per_layer = {name: int((m <= t).sum()) if t is not None else 0 for (name, _), m in zip(layers, masks)}
    diag = {"threshold": t, "n_pruned": n, "n_neurons": int(sum(len(m) for m in masks)),
            "pruned_per_layer": {k: v for k, v in per_layer.items() if v}, "clean_acc": clean_acc(net, clean),
            "mask_scores": {name: [round(float(v), 6) for v in m.tolist()] for (name, _), m in zip(layers, masks)},
            "mask_quantiles": [float(q) for q in torch.quantile(torch.cat(masks).float().cpu(),
                                                                torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))]}
    return net, diag, curve


def warn_if_unpruned(who: str, diag: dict, curve: list[dict], acc_ratio: float, hint: str, log) -> None:
    """Say so when no threshold kept clean accuracy within the bound: the method then returns the
    model unpruned, and its row in a table equals "no defense" for a reason the table cannot show."""
    if diag["threshold"] is not None:
        return
    first = next((r for r in curve if r["phase"] == "prune"), None)
    at0 = (f"; even threshold 0 prunes {first['pruned']} neurons whose mask reached 0 and leaves clean accuracy "
           f"{first['clean_acc']:.3f} (unpruned {diag['clean_acc']:.3f})") if first else ""
    msg = (f"{who}: no pruning threshold keeps clean accuracy within acc_ratio {acc_ratio} of the unpruned "
           f"model, so the model is returned unpruned{at0}. {hint}")
    log(msg)
    warnings.warn(msg, stacklevel=3)


@register_defense("anp", params=ANPParams)
def defend(model, clean, p: ANPParams, ctx):
    """Adversarial Neuron Pruning; threshold from clean accuracy on the defender's data."""
    base = working_copy(model, ctx.device)
    clean = clean.to(next(base.parameters()).device)
    gen = seeded(ctx.seed, ctx.device)
    masks, mask_curve = train_masks(base, clean, p, gen)
    net, diag, prune_curve = prune_by_masks(base, clean, masks, pruning_max=p.pruning_max,
                                            pruning_step=p.pruning_step, acc_ratio=p.acc_ratio)
    # measured on tiny_cnn (240 BN neurons, BadNets): eps 0.4 drove 30 masks to 0 and no threshold
    # passed; eps 0.1 pruned 30 neurons at threshold 0.75 and cut ASR 0.985 -> 0.362
    warn_if_unpruned("anp", diag, prune_curve, p.acc_ratio, "On a small network the default noise bound "
                     "anp_eps 0.4 can break too many neurons: try anp_eps 0.1-0.2, or a larger acc_ratio.", ctx.log)
    return DefenseOutput(net, diag, mask_curve + prune_curve)
