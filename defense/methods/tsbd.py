"""TSBD: two-stage backdoor defense (Lin et al., NeurIPS 2024, arXiv 2405.20291).

Behaviour follows the authors' code (GitHub ``linweiii/TSBD``, ``tsbd.py`` with
``tsbd/config.yaml``, a BackdoorBench plug-in); every constant below is that code's value
unless marked "ours". The file reads top to bottom in the order the defense runs:

- Stage 1a ``clean_unlearn``: gradient ascent on the defender's clean data ``Dc`` until the
  eval-mode accuracy on (augmented) ``Dc`` is <= a threshold.
- Stage 1b ``neuron_weight_change``: per output channel, the L1 norm of the weight change
  between the backdoored and the unlearned model; one global ranking over all layers.
- Stage 1c ``zero_reinit``: on the *original* model, zero the largest-change weights of the
  top ``n`` share of neurons (pooled threshold for the share ``m``).
- Stage 2 ``activeness_finetune``: fine-tune on ``Dc`` with the gradient
  ``(1 - alpha) * g1 + alpha * g2``, ``g2`` taken at ``theta + r * g1 / ||g1||`` per tensor
  (first-order gradient-norm penalty, Zhao et al., ICML 2022, arXiv 2202.03599).

Stages 1a/1b do not depend on ``n``, ``m`` or any Stage-2 constant, so they are computed
once by ``tsbd_prepare`` (a ``torch.load(weights_only=True)``-safe dict) and shared by every
``n`` of a sweep or a tuning study (``shared=`` at registration).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.data import Data
from defense.methods import DefenseContext, DefenseOutput, register_defense
from defense.train import accel_for, autocast, index_batches, make_batch, pick_device, seed_everything


# ---------------------------------------------------------------------------------------
# Parameters (one typed place; source of each default in its comment)
# ---------------------------------------------------------------------------------------

@dataclass
class TSBDParams:
    # Neuron ratio n: share of all scored neurons (ranked by NWC) that Stage 1c touches. The
    # reference sweeps {0.01, 0.05, 0.1, ..., 0.9} and fixes none. Default "auto" (ours): n
    # chosen from held-out clean data by auto_rule (defense/methods/tsbd_auto.py). A number is
    # the reference-faithful fixed-n path, all of Dc in every stage (README, TSBD, "n: auto":
    # the fixed 0.1, the default until 2026-12, against auto, measured).
    n: float | str = "auto"
    # Weight ratio m: share of the pooled weights of the selected neurons that is zeroed
    # (config.yaml: m 0.7).
    m: float = 0.7
    # Which weights are scored: Conv2d kernels per output channel, or BatchNorm2d scales
    # (config.yaml: layer_type conv; the code also accepts bn).
    layer_type: Literal["conv", "bn"] = "conv"
    # Stage 1a: SGD lr (config.yaml: lr_un 1e-4); momentum 0.9 in both stages (hard-coded in
    # tsbd.py); no weight decay in either stage (config's wd is never passed to them).
    lr_un: float = 1e-4
    momentum: float = 0.9
    # Stop unlearning once eval-mode accuracy on augmented Dc is <= this (tsbd.py: 0.10).
    # Ours: "chance+margin" means 1/num_classes + un_margin (for 43/200-class datasets).
    un_threshold: float | str = 0.10
    un_margin: float = 0.0
    max_un_epochs: int = 1000  # config.yaml: epochs 1000
    # Ours (issue 15): stop Stage 1a once the stop check has predicted ONE class for every image
    # of Dc (so its accuracy is that class's share of Dc) for this many consecutive epochs, when
    # that share is above the threshold: a collapsed model whose accuracy can never fall further.
    # The reference runs on to max_un_epochs there (gradient ascent only grows the loss). 20:
    # measured on the README tour's BadNets model (README, TSBD, "collapse stop"), the first
    # one-class check came at epoch 130, the streak that stopped it ran 134-153, and run on for
    # 100 more epochs it never left the collapse (Dc accuracy 0.118 every epoch); 20 epochs are
    # 2% of max_un_epochs. 0 = never stop on a collapse (the reference).
    collapse_epochs: int = 20
    batch_size: int = 256  # config.yaml: batch_size 256, shuffle=False in both stages
    # The reference ranks neurons by the score as written to nwc.txt with '{:.4f}' (ties keep
    # layer order: Python's sort is stable). -1 ranks by the exact value (ours).
    nwc_decimals: int = 4
    # Stage 2: lr (config.yaml: lr_ft 0.01; its CosineAnnealingLR is never built for TSBD),
    # passes = ft_epochs + 1 (tsbd.py loops range(ft_epoch + 1); config: ft_epoch 20).
    ft_lr: float = 0.01
    ft_epochs: int = 20
    r: float = 0.05  # perturbation radius per tensor (config.yaml: r 0.05)
    alpha: float = 0.7  # weight of the perturbed gradient (config.yaml: alpha 0.7); 1 = SAM
    augment: bool = True  # training augmentation in both stages (BackdoorBench train transform)
    # Ours, opt-in: bf16 autocast of the forward passes on CUDA (weights and gradients stay fp32;
    # on the CPU too with DefenseContext(accel_on_cpu=True), decided by defense.train.accel_for).
    # Off by default because the reference trains in fp32, and Stage 1a's stop check and the NWC
    # ranking (scores ~1e-3 on small models, compared at 4 decimals) can move under bf16 rounding.
    bf16: bool = False
    # Ours (n: auto): the share of Dc held out, seeded, from Stages 1a, 1b and 2 to choose n on.
    # None means 0.2 when n is "auto" and 0 otherwise (the reference: all of Dc is used). It is a
    # shared parameter, so an auto run never reuses a fixed-n run's unlearning on the whole Dc.
    holdout: float | None = None
    # n: auto: the rule that picks n (tsbd_auto.RULES). knee_soft: at least the knee of the NWC
    # curve, above it the largest n whose held-out mean true-class probability is within
    # auto_prob_budget of the original's (tsbd_auto.soft_drop); it measured best of the rules
    # side by side (README, TSBD, "n: auto", bench/tsbd_auto_table.py). The accuracy rules
    # (knee_budget, budget, ...) read auto_budget: with 100 held-out images an accuracy drop's SE
    # is ~3 points. auto_z: standard errors a drop may exceed its budget by.
    auto_rule: str = "knee_soft"
    auto_budget: float = 0.02
    auto_z: float = 0.0
    # the soft rules (soft, knee_soft): the budget on the held-out mean true-class probability's
    # drop from the original (tsbd_auto.soft_drop), in probability points
    auto_prob_budget: float = 0.05
    # the knee rules, opt-in: the knee is a floor only while the knee rung's own drop is within
    # auto_knee_cap times the budget; past it they bisect below the knee. Off (None) by default:
    # 2 mended synthetic SSBA (a knee at 0.32 cost 9.6 ACC points) in the recordings the rules
    # were chosen on, and broke Blended on a defender seed recorded after (README, "n: auto").
    auto_knee_cap: float | None = None
    auto_ladder: tuple[float, ...] = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)  # tsbd.py's sweep

    def held_share(self) -> float:
        """``holdout`` resolved: None means 0.2 with n "auto", else 0. Derived on every call, not
        stored, so ``replace(p, n=0.3)`` of an auto p is the fixed-n path on all of Dc."""
        if self.holdout is not None:
            return self.holdout
        return 0.2 if self.n == "auto" else 0.0

    def canonical(self) -> dict:
        """The params as grid keys and result rows record them (registry.params_dict): holdout
        resolved, so an auto run never shares a fixed-n run's Stages 1a/1b on the whole Dc."""
        return {**asdict(self), "holdout": self.held_share()}

    def check(self):
        if isinstance(self.n, str):
            if self.n != "auto":
                yield f"n must be a number in [0, 1] or 'auto', got {self.n!r}"
        elif not 0.0 <= self.n <= 1.0:
            yield f"n must be in [0, 1], got {self.n} (or 'auto': chosen on held-out clean data)"
        for name in ("m", "alpha"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                yield f"{name} must be in [0, 1], got {v}"
        if not 0.0 <= self.held_share() < 1.0:
            yield f"holdout must be in [0, 1), got {self.holdout}"
        elif self.n == "auto" and self.held_share() == 0:
            yield "n: auto needs held-out clean data to choose n on: holdout must be > 0 (default 0.2)"
        if min(self.auto_budget, self.auto_z, self.auto_prob_budget, self.auto_knee_cap or 0) < 0:
            yield (f"auto_budget, auto_prob_budget, auto_z and auto_knee_cap must be >= 0, got {self.auto_budget}, "
                   f"{self.auto_prob_budget}, {self.auto_z}, {self.auto_knee_cap}")
        if self.n == "auto":
            rules = AUTO_RULES.get("rules", {})  # tsbd_auto's RULES, registered with this package
            if self.auto_rule not in rules:
                yield f"auto_rule must be one of {', '.join(rules)}, got {self.auto_rule!r}"
        if not self.auto_ladder or any(not 0.0 <= v <= 1.0 for v in self.auto_ladder):
            yield f"auto_ladder must be values in [0, 1], got {list(self.auto_ladder)}"
        for name in ("lr_un", "ft_lr"):
            if getattr(self, name) <= 0:
                yield f"{name} must be > 0, got {getattr(self, name)}"
        if self.r < 0:
            yield f"r must be >= 0, got {self.r}"
        if not 0.0 <= self.momentum < 1.0:
            yield f"momentum must be in [0, 1), got {self.momentum}"
        if self.batch_size < 1:
            yield f"batch_size must be >= 1, got {self.batch_size}"
        if self.collapse_epochs < 0:
            yield f"collapse_epochs must be >= 0 (0 never stops on a collapse), got {self.collapse_epochs}"
        if self.max_un_epochs < 1:
            yield f"max_un_epochs must be >= 1, got {self.max_un_epochs}"
        if self.ft_epochs < -1:
            yield f"ft_epochs must be >= -1 (-1 skips Stage 2), got {self.ft_epochs}"
        if isinstance(self.un_threshold, str):
            if self.un_threshold != "chance+margin":
                yield f"un_threshold must be a number in [0, 1] or 'chance+margin', got {self.un_threshold!r}"
        elif not 0.0 <= self.un_threshold <= 1.0:
            yield f"un_threshold must be in [0, 1], got {self.un_threshold}"

    def threshold(self, num_classes: int) -> float:
        if self.un_threshold == "chance+margin":
            return 1.0 / num_classes + self.un_margin
        return float(self.un_threshold)


# Parameters that Stages 1a/1b depend on: a sweep or a study computes them once per value.
SHARED = ("layer_type", "lr_un", "momentum", "un_threshold", "un_margin", "max_un_epochs",
          "collapse_epochs", "batch_size", "augment", "bf16", "holdout")


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _autocast(device: torch.device, p: TSBDParams, on_cpu: bool = False):
    """bf16 autocast when ``p.bf16`` on CUDA (or on the CPU with ``on_cpu``: the GPU path in CI),
    decided where training decides it (``defense.train.accel_for``)."""
    return autocast(accel_for(p, device, on_cpu))


def _generator(seed: int, device: torch.device) -> torch.Generator:
    """Seed the global RNG (dropout) and return the augmentation stream, on the data's device
    (a CUDA generator keeps crops and flips on the GPU, as ``defense.train.train`` does)."""
    gen = seed_everything(seed)
    return torch.Generator(device=device).manual_seed(seed) if device.type == "cuda" else gen


def _batches(data: Data, p: TSBDParams, gen: torch.Generator):
    """Dc in its stored order every epoch (reference: DataLoader(shuffle=False)), augmented."""
    for idx in index_batches(len(data), p.batch_size, False, None):
        yield make_batch(data, idx, gen, p.augment)


@torch.no_grad()
def _augmented_accuracy(model: nn.Module, data: Data, p: TSBDParams, gen: torch.Generator,
                        device: torch.device, on_cpu: bool = False) -> tuple[float, bool]:
    """The reference's stop check: eval mode, Dc through the *training* transform, / |Dc|.

    Also returns whether every prediction was the same class (a collapsed model: ours)."""
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros(data.info.num_classes, dtype=torch.bool, device=device)
    with _autocast(device, p, on_cpu):
        for x, y in _batches(data, p, gen):
            pred = model(x).argmax(1)
            correct += (pred == y).sum()
            seen[pred] = True
    model.train(was)
    return int(correct) / max(1, len(data)), int(seen.sum()) == 1  # one host sync per check


class _Progress:
    """A stage's progress: every line to ``ctx.log`` (the grid keeps them in <out>/logs/), and a
    tqdm bar on stderr when ``ctx.progress`` (``bdgrid trial``), so a long stage is never silent."""

    def __init__(self, ctx: DefenseContext, total: int, desc: str):
        self.ctx, self.bar = ctx, None
        if ctx.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="ep", leave=False)

    def step(self, msg: str, **postfix) -> None:
        self.ctx.log(msg)
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def split_holdout(clean: Data, share: float, seed: int) -> tuple[Data, Data | None]:
    """(the part of Dc the stages use, the held-out part or None). Seeded from ``seed`` and the
    size of Dc alone: the held-out images are ``int(len * share)`` of a random permutation."""
    k = int(len(clean) * share)
    if k <= 0:
        return clean, None
    perm = torch.randperm(len(clean), generator=torch.Generator().manual_seed(30_011 * seed + 3))
    perm = perm.to(clean.y.device)
    return clean.subset(perm[k:].sort().values), clean.subset(perm[:k].sort().values)


def class_share(data: Data) -> float:
    """The largest class's share of ``data``: where a collapsed model's accuracy settles."""
    counts = torch.bincount(data.y.cpu(), minlength=data.info.num_classes)
    return float(counts.max()) / max(1, len(data))


# ---------------------------------------------------------------------------------------
# Stage 1a: clean unlearning
# ---------------------------------------------------------------------------------------

def clean_unlearn(model: nn.Module, clean: Data, p: TSBDParams, ctx: DefenseContext) -> tuple[nn.Module, list[dict]]:
    """Gradient ascent on CE over Dc (SGD lr_un, momentum, no weight decay, train mode) until
    the augmented eval-mode accuracy on Dc is <= the threshold, or ``max_un_epochs``, or (ours)
    the stop check has predicted one class for all of Dc for ``collapse_epochs`` epochs in a row.

    Returns a new model (``model`` is not touched) and one row per epoch (``collapsed``: the
    stop check predicted a single class that epoch).
    """
    device = pick_device(ctx.device)
    gen = _generator(ctx.seed, device)
    clean = clean.to(device)
    net = copy.deepcopy(model).to(device)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=p.lr_un, momentum=p.momentum)
    thr = p.threshold(clean.info.num_classes)
    curve, streak = [], 0
    bar = _Progress(ctx, p.max_un_epochs, "tsbd unlearn")
    for epoch in range(1, p.max_un_epochs + 1):
        net.train()
        # running sums stay on the device: no host sync per batch, one per epoch (the stop check)
        tot = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        nb = 0
        for x, y in _batches(clean, p, gen):
            with _autocast(device, p, ctx.accel_on_cpu):
                out = net(x)
                loss = F.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            (-loss).backward()  # ascent
            opt.step()
            tot += loss.detach()
            correct += (out.argmax(1) == y).sum()
            nb += 1
        dc_acc, one_class = _augmented_accuracy(net, clean, p, gen, device, ctx.accel_on_cpu)
        loss_v = float(tot) / max(1, nb)
        curve.append({"phase": "unlearn", "epoch": epoch, "loss": loss_v,
                      "train_acc": int(correct) / max(1, len(clean)), "dc_acc": dc_acc, "collapsed": one_class})
        bar.step(f"tsbd unlearn epoch {epoch}/{p.max_un_epochs}: loss {loss_v:.4f} dc_acc {dc_acc:.4f} "
                 f"(stop at <= {thr:.3f}){' one class' if one_class else ''}", dc_acc=f"{dc_acc:.3f}")
        if dc_acc <= thr:
            break
        streak = streak + 1 if one_class else 0
        if p.collapse_epochs and streak >= p.collapse_epochs:
            break
    bar.close()
    net.eval()
    return net, curve


# ---------------------------------------------------------------------------------------
# Stage 1b: neuron weight change
# ---------------------------------------------------------------------------------------

def scored_layers(model: nn.Module, layer_type: str = "conv") -> list[str]:
    """Module names whose weights TSBD scores, in registration order (the reference's order).

    Shortcut / downsample convolutions are skipped (tsbd.py skips names containing
    'shortcut'; 'downsample' is torchvision's name for the same thing).
    """
    kind = {"conv": nn.Conv2d, "bn": nn.BatchNorm2d}.get(layer_type)
    if kind is None:
        raise ValueError(f"layer_type must be conv or bn, got {layer_type!r}")
    return [name for name, mod in model.named_modules()
            if isinstance(mod, kind) and "shortcut" not in name and "downsample" not in name]


@dataclass
class NWC:
    """Neuron weight change of every scored layer, and the global ranking."""

    layer_type: str
    neuron: dict[str, torch.Tensor]  # layer -> (C_out,) L1 change per output channel
    weight: dict[str, torch.Tensor]  # layer -> (C_out, fan_in) |change| per weight
    ranking: list[tuple[str, int]] = field(default_factory=list)  # highest NWC first

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.neuron.values())

    def to_dict(self) -> dict:
        """Plain dict of tensors/strings (round-trips through torch.load(weights_only=True))."""
        return {"layer_type": self.layer_type, "layers": list(self.neuron),
                "neuron": {k: v.cpu() for k, v in self.neuron.items()},
                "weight": {k: v.cpu() for k, v in self.weight.items()}}

    @classmethod
    def from_dict(cls, d: dict, decimals: int = 4) -> "NWC":
        neuron = {k: d["neuron"][k] for k in d["layers"]}
        weight = {k: d["weight"][k] for k in d["layers"]}
        return cls(d["layer_type"], neuron, weight, rank_neurons(neuron, decimals))


def rank_neurons(neuron: dict[str, torch.Tensor], decimals: int = 4) -> list[tuple[str, int]]:
    """All neurons of all layers, highest NWC first, no per-layer normalisation.

    The reference sorts the scores read back from '{:.4f}'-formatted text with a stable sort
    (ties keep layer, then channel, order); ``decimals=-1`` sorts the exact values.
    """
    rows = []
    for layer, v in neuron.items():
        for j, s in enumerate(v.tolist()):
            rows.append((float(f"{s:.{decimals}f}") if decimals >= 0 else s, layer, j))
    rows.sort(key=lambda t: t[0], reverse=True)  # stable, like the reference's sorted()
    return [(layer, j) for _, layer, j in rows]


@torch.no_grad()
def neuron_weight_change(model0: nn.Module, model_u: nn.Module, layer_type: str = "conv",
                         decimals: int = 4) -> NWC:
    """NWC_j = sum |W_u[j] - W_0[j]| over output channel j of every scored layer."""
    neuron, weight = {}, {}
    for name in scored_layers(model0, layer_type):
        w0 = model0.get_submodule(name).weight.detach().float()
        wu = model_u.get_submodule(name).weight.detach().float().to(w0.device)
        change = (wu - w0).reshape(w0.shape[0], -1).abs().cpu()
        weight[name] = change
        neuron[name] = change.sum(dim=1)
    return NWC(layer_type, neuron, weight, rank_neurons(neuron, decimals))


# ---------------------------------------------------------------------------------------
# Stage 1c: zero reinitialisation
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def zero_reinit(model0: nn.Module, nwc: NWC, n: float, m: float) -> tuple[nn.Module, dict[str, dict]]:
    """Copy ``model0``; in its top ``int(total * n)`` neurons zero every weight whose change is
    >= tau, tau = the smallest of the ``int(m * pool)`` largest pooled changes.

    Returns the model and, per layer, {"neurons": selected, "weights": zeroed}. Biases and
    BatchNorm parameters (for ``conv``) are untouched; nothing is masked afterwards.
    """
    model = copy.deepcopy(model0)
    top = nwc.ranking[: int(nwc.total * n)]
    counts: dict[str, dict] = {}
    pool = [nwc.weight[layer][j] for layer, j in top]
    k = int(sum(len(t) for t in pool) * m)
    if not top or k == 0:  # the reference would fail on min([]); we zero nothing
        return model, counts
    tau = torch.topk(torch.cat(pool), k).values.min()
    for layer, j in top:
        mask = nwc.weight[layer][j] >= tau
        w = model.get_submodule(layer).weight
        w.data[j][mask.to(w.device).view(w.shape[1:])] = 0.0  # logical order: any memory format
        c = counts.setdefault(layer, {"neurons": 0, "weights": 0})
        c["neurons"] += 1
        c["weights"] += int(mask.sum())
    return model, counts


# ---------------------------------------------------------------------------------------
# Stage 2: activeness-aware fine-tuning
# ---------------------------------------------------------------------------------------

def activeness_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                    r: float, alpha: float, amp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Stage-2 mini-batch, in place; returns (loss, correct) of the post-step forward, as
    0-d tensors on the model's device (the caller sums them: no host sync per batch).

    Equals the reference's per-batch procedure (deep copy, g1, per-tensor perturbation,
    g2, mix, step, extra forward) without the copy: parameters are restored from a saved
    copy (exact), and buffers (BatchNorm running statistics) are restored after the g1/g2
    passes, so that only the final train-mode forward updates them, once, at the new weights.
    """
    amp = amp or _null()
    params = [q for q in model.parameters() if q.requires_grad]
    buffers = [b.detach().clone() for b in model.buffers()]
    model.train()
    with amp:
        loss1 = F.cross_entropy(model(x).float(), y)
    g1 = torch.autograd.grad(loss1, params, allow_unused=True)
    saved = []
    with torch.no_grad():
        for q, g in zip(params, g1):
            saved.append(q.detach().clone())
            if g is None:
                continue
            norm = g.norm()
            # Guard: a zero (or non-finite) g1 would give NaN in the reference; skip its
            # perturbation. torch.where keeps this on the device (no host sync per tensor).
            ok = (norm > 0) & torch.isfinite(norm)
            q.add_(torch.where(ok, g / torch.where(ok, norm, 1.0), 0.0) * r)
    with amp:
        loss2 = F.cross_entropy(model(x).float(), y)
    g2 = torch.autograd.grad(loss2, params, allow_unused=True)
    with torch.no_grad():
        for q, s in zip(params, saved):
            q.copy_(s)
        for b, s in zip(model.buffers(), buffers):
            b.copy_(s)
    for q, a, b in zip(params, g1, g2):
        if a is None and b is None:
            q.grad = None
            continue
        a = torch.zeros_like(q) if a is None else a
        b = torch.zeros_like(q) if b is None else b
        q.grad = (1 - alpha) * a + alpha * b
    opt.step()
    with torch.no_grad(), amp:  # the reference's logging forward: it updates BN running stats
        out = model(x).float()
        loss = F.cross_entropy(out, y)
    return loss.detach(), (out.argmax(1) == y).sum()


def activeness_finetune(model: nn.Module, clean: Data, p: TSBDParams, ctx: DefenseContext) -> list[dict]:
    """Fine-tune ``model`` in place on Dc for ``ft_epochs + 1`` passes; one row per pass.

    Rows carry the reference's logged values: mean batch loss and accuracy of the post-step
    train-mode forward (augmented Dc).
    """
    device = pick_device(ctx.device)
    # Seeded separately from Stage 1 so that a run with ctx.prepared equals one without.
    gen = _generator(ctx.seed + 1, device)
    clean = clean.to(device)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=p.ft_lr, momentum=p.momentum)
    amp = _autocast(device, p, ctx.accel_on_cpu)
    curve = []
    bar = _Progress(ctx, p.ft_epochs + 1, f"tsbd finetune n={p.n}")
    for epoch in range(p.ft_epochs + 1):
        tot = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        nb = 0
        for x, y in _batches(clean, p, gen):
            loss, c = activeness_step(model, x, y, opt, p.r, p.alpha, amp)
            tot += loss
            correct += c
            nb += 1
        row = {"phase": "finetune", "epoch": epoch + 1, "loss": float(tot) / max(1, nb),  # one sync per pass
               "train_acc": int(correct) / max(1, len(clean))}
        curve.append(row)
        bar.step(f"tsbd finetune (n={p.n}) pass {epoch + 1}/{p.ft_epochs + 1}: loss {row['loss']:.4f} "
                 f"acc {row['train_acc']:.4f}", acc=f"{row['train_acc']:.3f}")
    bar.close()
    model.eval()
    return curve


# ---------------------------------------------------------------------------------------
# The defense: prepare (Stages 1a/1b, shared), defend (1c + 2), sweep
# ---------------------------------------------------------------------------------------

def tsbd_prepare(model: nn.Module, clean: Data, p: TSBDParams, ctx: DefenseContext) -> dict:
    """Stages 1a/1b. The result holds only tensors, numbers, strings, lists and dicts, so it
    round-trips through ``torch.save`` / ``torch.load(weights_only=True)``. With ``holdout``
    > 0 only the part of Dc that is not held out is used."""
    clean, _ = split_holdout(clean, p.held_share(), ctx.seed)
    unlearned, curve = clean_unlearn(model, clean, p, ctx)
    thr = p.threshold(clean.info.num_classes)
    reached = bool(curve) and curve[-1]["dc_acc"] <= thr
    share = class_share(clean)
    # collapsed: the run ended on the collapse stop (a streak of one-class stop checks)
    collapsed = (not reached and p.collapse_epochs > 0 and len(curve) >= p.collapse_epochs
                 and all(r["collapsed"] for r in curve[-p.collapse_epochs:]))
    if not reached:
        # the reference runs on to max_un_epochs; say why it did not stop, since the usual
        # cause has a one-line fix
        last = curve[-1]["dc_acc"] if curve else float("nan")
        how = (f"stopped after {len(curve)} epochs: the stop check predicted one class for all of Dc "
               f"for {p.collapse_epochs} epochs in a row (a collapsed model; collapse_epochs=0 runs on "
               f"to max_un_epochs as the reference)" if collapsed else f"ran all {len(curve)} epochs")
        msg = (f"tsbd: clean unlearning {how} without reaching un_threshold {thr:.3f} "
               f"(last Dc accuracy {last:.3f}; the largest class holds {share:.3f} of Dc, and a collapsed model "
               f"settles there). Set un_threshold above it (e.g. {min(1.0, share + 0.02):.2f}) or "
               f"'chance+margin' with a margin; see README, TSBD.")
        ctx.log(msg)
        warnings.warn(msg, stacklevel=2)
    nwc = neuron_weight_change(model, unlearned, p.layer_type)
    ctx.log(f"tsbd NWC: {nwc.total} neurons in {len(nwc.neuron)} {p.layer_type} layers ranked")
    return {"unlearned": {k: v.detach().cpu() for k, v in unlearned.state_dict().items()},
            "nwc": nwc.to_dict(), "curve": curve, "unlearn_epochs": len(curve), "unlearn_reached": reached,
            "unlearn_collapsed": collapsed, "dc_class_share": share}


def _diagnostics(prep: dict, nwc: NWC, counts: dict, ft_curve: list[dict], p: TSBDParams, top_k: int = 20) -> dict:
    top = []
    for layer, j in nwc.ranking[:top_k]:
        top.append([layer, j, float(nwc.neuron[layer][j])])
    return {
        "unlearn_epochs": int(prep["unlearn_epochs"]),
        "unlearn_reached_threshold": bool(prep.get("unlearn_reached", True)),
        "unlearn_collapsed": bool(prep.get("unlearn_collapsed", False)),
        "dc_class_share": float(prep.get("dc_class_share", float("nan"))),
        "unlearn_curve": prep["curve"],
        "n_neurons": nwc.total,
        "n_selected": int(nwc.total * float(p.n)),
        "nwc_top": top,
        "zeroed": counts,
        "weights_zeroed": sum(c["weights"] for c in counts.values()),
        "finetune_curve": ft_curve,
    }


# parameter -> the rule that chooses it from clean data when the spec says "auto"
AUTO_RULES: dict = {}


# baseline: a study that tunes n starts from the reference-faithful fixed n (tune's trial 0)
@register_defense("tsbd", params=TSBDParams, prepare=tsbd_prepare, shared=SHARED, baseline={"n": 0.1})
def defend(model: nn.Module, clean: Data, p: TSBDParams, ctx: DefenseContext) -> DefenseOutput:
    """TSBD (Lin et al., NeurIPS 2024): NWC-based zero reinitialisation, then activeness-aware
    fine-tuning. Uses ``ctx.prepared`` (Stages 1a/1b) when given, computes it otherwise."""
    prep = ctx.prepared if ctx.prepared is not None else tsbd_prepare(model, clean, p, ctx)
    if prep["nwc"]["layer_type"] != p.layer_type:
        raise ValueError(f"prepared NWC is for layer_type {prep['nwc']['layer_type']!r}, params ask {p.layer_type!r}")
    nwc = NWC.from_dict(prep["nwc"], p.nwc_decimals)
    if p.n == "auto":
        # the rule registers itself here (defense/methods/tsbd_auto.py, imported with this package),
        # so this module does not import the one that builds on it
        return AUTO_RULES["n"](model, clean, p, ctx, prep, nwc)
    purified, counts, ft_curve = purify_with(model, split_holdout(clean, p.held_share(), ctx.seed)[0], nwc, p, ctx)
    diag = _diagnostics(prep, nwc, counts, ft_curve, p)
    diag["chosen_n"] = float(p.n)
    return DefenseOutput(purified, diag, prep["curve"] + ft_curve)


def purify_with(model: nn.Module, clean: Data, nwc: NWC, p: TSBDParams, ctx: DefenseContext):
    """Stages 1c and 2 for ``p.n`` on ``clean`` (the stages' part of Dc): (model, counts, curve)."""
    purified, counts = zero_reinit(model, nwc, float(p.n), p.m)
    return purified, counts, activeness_finetune(purified, clean, p, ctx)


def tsbd_sweep(model: nn.Module, clean: Data, p: TSBDParams, ns, ctx: DefenseContext) -> dict[float, DefenseOutput]:
    """Fixed-n TSBD for every neuron ratio in ``ns`` (``p.n`` is not used), computing Stages
    1a/1b once, on what every fixed-n run uses (all of Dc unless ``p.holdout`` says otherwise)."""
    fixed = replace(p, n=0.0)  # Stages 1a/1b do not read n, only the fixed path's holdout
    prep = ctx.prepared if ctx.prepared is not None else tsbd_prepare(model, clean, fixed, ctx)
    return {n: defend(model, clean, replace(fixed, n=float(n)), replace(ctx, prepared=prep)) for n in ns}
