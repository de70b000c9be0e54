"""Shared pieces of the baseline defenses: fine-tuning with the one training loop, a batch loop
for defenses with their own objective, clean-only evaluation, and pruning helpers.

Everything here sees only the defender's clean subset. Pruning thresholds are chosen from
clean accuracy on that subset (never from test data or ASR): BackdoorBench's rule is "largest
pruning whose clean accuracy stays within ``acc_ratio`` of the unpruned model", measured there
on the clean *test* set; we measure it on the defender's data instead.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

from defense.data import Data
from defense.metrics import accuracy
from defense.train import Recipe, index_batches, make_batch, pick_device, seed_everything, train


# ----------------------------------------------------------------------------- copying, devices

def working_copy(model: nn.Module, device) -> nn.Module:
    """A deep copy on ``device``: no defense ever modifies the model it was given."""
    return copy.deepcopy(model).to(pick_device(device))


def finetune(model: nn.Module, clean: Data, *, epochs: int, batch_size: int, lr: float, momentum: float,
             weight_decay: float, schedule: str, seed: int, device, label_smoothing: float = 0.0) -> list[dict]:
    """Plain fine-tuning of ``model`` in place with ``defense.train.train`` (the one loop)."""
    if epochs <= 0:
        return []
    recipe = Recipe("defense", epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                    weight_decay=weight_decay, schedule=schedule, label_smoothing=label_smoothing)
    return train(model, clean, recipe, seed=seed, device=device, desc="fine-tune")


def fit(model: nn.Module, clean: Data, step: Callable[[torch.Tensor, torch.Tensor], dict], *, epochs: int,
        batch_size: int, gen: torch.Generator, phase: str, after_epoch: Callable[[dict], bool] | None = None,
        shuffle: bool = True) -> list[dict]:
    """The batch loop of defenses with their own objective (NAD, SAM, RNP, I-BAU): the same input
    pipeline as ``train`` (``index_batches`` -> ``make_batch``: augment, normalise), a custom
    ``step(x, y) -> {"loss": float, "correct": int}``. ``after_epoch(row)`` may return True to stop.
    Returns one row per epoch: {"phase", "epoch", "loss", "train_acc"}."""
    rows = []
    for epoch in range(epochs):
        # sums stay on the device (steps return tensors): one host sync per epoch, not per batch
        tot, correct, seen = 0.0, 0, 0
        for idx in index_batches(len(clean), batch_size, shuffle, gen):
            x, y = make_batch(clean, idx, gen, True)
            out = step(x, y)
            tot = tot + torch.as_tensor(out["loss"], device=x.device).detach().float() * len(y)
            correct = correct + torch.as_tensor(out.get("correct", 0), device=x.device)
            seen += len(y)
        row = {"phase": phase, "epoch": epoch + 1, "loss": float(tot) / max(seen, 1),
               "train_acc": int(correct) / max(seen, 1)}
        rows.append(row)
        if after_epoch is not None and after_epoch(row):
            break
    return rows


def cosine(opt: torch.optim.Optimizer, steps: int):
    """Per-step cosine annealing to 0 over ``steps`` (BackdoorBench's CosineAnnealingLR, stepped per batch)."""
    steps = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def clean_acc(model: nn.Module, clean: Data) -> float:
    """Accuracy on the defender's clean data, eval mode, no augmentation."""
    return accuracy(model, clean)


def within_bound(acc: float, acc0: float, acc_ratio: float) -> bool:
    """BackdoorBench's tolerance: relative clean-accuracy drop below ``acc_ratio``."""
    return acc0 <= 0 or (acc0 - acc) / acc0 <= acc_ratio


# ----------------------------------------------------------------------------- layers

def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier: the last ``nn.Linear`` in module order (``linear`` in tiny_cnn and
    PreAct-ResNet18, ``classifier`` in VGG19-BN)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("model has no nn.Linear classifier to prune in front of")
    return found[-1]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """BatchNorm2d layers: ANP and RNP perturb / mask their neurons (one per channel)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    if not found:
        raise ValueError("this defense masks BatchNorm2d neurons, and the model has none")
    return found


def bn_forward(model: nn.Module, x: torch.Tensor, layers: list[tuple[str, nn.BatchNorm2d]],
               weight_coef: list[torch.Tensor], bias_coef: list[torch.Tensor] | None) -> torch.Tensor:
    """Forward with each BN's affine parameters scaled per channel: weight * weight_coef,
    bias * bias_coef (bias unchanged when ``bias_coef`` is None). The model's own parameters are
    used detached: only the coefficients (masks, noise) receive gradients."""
    over = {}
    for i, (name, m) in enumerate(layers):
        over[f"{name}.weight"] = m.weight.detach() * weight_coef[i]
        over[f"{name}.bias"] = m.bias.detach() * (bias_coef[i] if bias_coef is not None else 1.0)
    return torch.func.functional_call(model, over, (x,), strict=False)


def prune_bn_neurons(model: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]], scores: list[torch.Tensor],
                     threshold: float) -> int:
    """Zero the BN weight of every neuron whose mask score is <= threshold (ANP / RNP pruning:
    the reference sets ``<bn>.weight[idx] = 0`` and keeps the bias). Returns the count."""
    mods = dict(model.named_modules())
    count = 0
    with torch.no_grad():
        for (name, _), s in zip(layers, scores):
            sel = s.to(mods[name].weight.device) <= threshold
            mods[name].weight[sel] = 0.0
            count += int(sel.sum())
    return count


def choose_bn_threshold(model: nn.Module, clean: Data, layers, scores, *, pruning_max: float,
                        pruning_step: float, acc_ratio: float) -> tuple[float | None, list[dict]]:
    """Sweep thresholds 0, step, ..., pruning_max (BackdoorBench's ``pruning_by: threshold``); on a
    copy of ``model`` prune neurons with score <= t and measure clean accuracy on the defender's
    data. Pick the largest t whose relative drop is within ``acc_ratio``: the most pruning the
    clean data allows. (BackdoorBench picks the lowest *test ASR* inside the bound, which a
    defender cannot compute.) Returns (threshold or None when even t=0 fails, curve)."""
    acc0 = clean_acc(model, clean)
    n_steps = int(round(pruning_max / pruning_step))
    curve, best = [], None
    for i in range(n_steps + 1):
        t = round(i * pruning_step, 10)
        m = copy.deepcopy(model)
        k = prune_bn_neurons(m, layers, scores, t)
        acc = clean_acc(m, clean)
        ok = within_bound(acc, acc0, acc_ratio)
        curve.append({"phase": "prune", "threshold": t, "pruned": k, "clean_acc": acc, "within_bound": ok})
        if ok:
            best = t
    return best, curve


# ----------------------------------------------------------------------------- weight masks

def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Hold weights at zero through fine-tuning: ``torch.nn.utils.prune.custom_from_mask`` (as
    BackdoorBench's FP does) reparametrises ``weight = weight_orig * weight_mask``."""
    mods = dict(model.named_modules())
    for name, mask in masks.items():
        torch_prune.custom_from_mask(mods[name], name="weight", mask=mask.to(mods[name].weight.device))


def bake_masks(model: nn.Module, names: Iterable[str]) -> None:
    """Make masks permanent (plain ``weight`` parameters again, zeros where masked) so the model
    saves and loads as its architecture's ordinary state dict."""
    mods = dict(model.named_modules())
    for name in names:
        torch_prune.remove(mods[name], "weight")


def seeded(seed: int, device) -> torch.Generator:
    """Seed torch globally (initial noise, dropout) and return the batch generator (CPU, as ``train``)."""
    return seed_everything(seed)


# ----------------------------------------------------------------------------- evidence of change

@torch.no_grad()
def model_change(before: nn.Module, after: nn.Module) -> dict:
    """What a defense did to the weights, measured on them (not taken from the method's word), as
    flat result columns: ``weights_changed``, how many parameter elements differ; and
    ``neurons_pruned``, how many units are newly zero: a BatchNorm channel whose weight became
    0 (CLP, ANP, RNP), a Conv2d / Linear output row that became all zero (NWC-FP), a Linear
    input column that became all zero (FP's classifier masks). A row with both at 0 is a model
    the defense returned unchanged."""
    a = dict(before.named_parameters())
    changed = 0
    for name, q in after.named_parameters():
        p = a.get(name)
        if p is None or p.shape != q.shape:
            changed += q.numel()
        else:
            changed += int((p.to(q.device) != q).sum())
    mods = dict(before.named_modules())
    pruned = 0
    for name, m in after.named_modules():
        old = mods.get(name)
        if type(old) is not type(m) or not hasattr(m, "weight") or m.weight is None or old.weight.shape != m.weight.shape:
            continue
        w_new, w_old = m.weight.detach(), old.weight.detach().to(m.weight.device)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            pruned += int(((w_new == 0) & (w_old != 0)).sum())
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            rows_new, rows_old = w_new.flatten(1).eq(0).all(1), w_old.flatten(1).eq(0).all(1)
            pruned += int((rows_new & ~rows_old).sum())
            if isinstance(m, nn.Linear):
                pruned += int((w_new.eq(0).all(0) & ~w_old.eq(0).all(0)).sum())
    return {"weights_changed": changed, "neurons_pruned": pruned}
