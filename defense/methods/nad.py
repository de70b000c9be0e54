"""NAD: Neural Attention Distillation (Li et al., ICLR 2021, arXiv 2101.05930).

1. Teacher: the backdoored model fine-tuned on the clean data for ``te_epochs``.
2. Student: the backdoored model trained on the clean data with cross-entropy plus attention
   distillation: at three layers, ``beta_i * MSE(A(student), A(teacher))`` where the attention
   map ``A(f) = sum_c |f_c|^p``, L2-normalised over space per image (Zagoruyko & Komodakis
   2017, as BackdoorBench's ``AT`` class).

Which layers, for any model: one probe forward records every submodule's output; for each
spatial resolution larger than 1x1, the outermost module (fewest dots in its name) that
outputs it, the last such one if several, is that stage's output (outermost, so that a
pre-activation BN of the next stage, which still runs at the old resolution, is not taken);
the deepest three resolutions are used, shallowest first (beta1, beta2, beta3). On PreAct-ResNet18 this picks
``layer2``, ``layer3``, ``layer4`` (the groups NAD's reference uses for WRN); on tiny_cnn and
VGG19-BN the post-ReLU output of the last conv block at each of the last three resolutions.

Defaults: BackdoorBench ``config/defense/nad/config.yaml``: te_epochs 10 (teacher and student
both run ``te_epochs``), lr 0.01, momentum 0.9, weight decay 1e-4, batch 256, beta1 500,
beta2 1000, beta3 1000, p 2.0. The learning rate is constant: BackdoorBench's
``adjust_learning_rate`` holds 0.01 for the first 20 epochs, and the teacher's cosine schedule
spans 100 epochs of which 10 run (under 3% decay), so we keep it constant for both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.data.augment import normalize
from defense.methods import DefenseOutput, register_defense
from defense.methods._common import clean_acc, finetune, fit, seeded, working_copy


@dataclass
class NADParams:
    te_epochs: int = 10  # BackdoorBench nad/config.yaml: teacher epochs (the student runs as many)
    lr: float = 0.01  # idem
    momentum: float = 0.9  # idem
    weight_decay: float = 1e-4  # idem
    batch_size: int = 256  # idem
    beta1: float = 500.0  # idem: shallowest of the three layers
    beta2: float = 1000.0  # idem
    beta3: float = 1000.0  # idem: deepest
    p: float = 2.0  # idem: power of the attention map

    def check(self):
        if self.te_epochs < 0:
            yield f"te_epochs must be >= 0, got {self.te_epochs}"
        if self.p <= 0:
            yield f"p must be > 0, got {self.p}"


def attention_map(fm: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """sum_c |f_c|^p, divided by its L2 norm over the spatial positions (per image)."""
    am = fm.abs().pow(p).sum(1, keepdim=True)
    return am / (am.norm(dim=(2, 3), keepdim=True) + eps)


def at_loss(fs: torch.Tensor, ft: torch.Tensor, p: float) -> torch.Tensor:
    return F.mse_loss(attention_map(fs, p), attention_map(ft, p))


@torch.no_grad()
def attention_layers(model: nn.Module, x: torch.Tensor, k: int = 3) -> list[str]:
    """Names of the modules whose outputs NAD distils (see the module docstring)."""
    seen: list[tuple[str, tuple[int, int]]] = []
    hooks = []
    for name, m in model.named_modules():
        if name:
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.append((name, tuple(out.shape[2:])))
                if isinstance(out, torch.Tensor) and out.ndim == 4 else None))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    best: dict[tuple[int, int], tuple[int, str]] = {}  # insertion order = order of first appearance
    for name, hw in seen:
        if hw[0] * hw[1] > 1:
            depth = name.count(".")
            if hw not in best or depth <= best[hw][0]:  # outermost module; the last one among equals
                best[hw] = (depth, name)
    names = [name for _, name in best.values()][-k:]
    if len(names) < k:
        raise ValueError(f"NAD needs {k} spatial stages, found {len(names)}: {names}")
    return names


class _Taps:
    """Forward hooks that keep the latest outputs of the named modules."""

    def __init__(self, model: nn.Module, names: list[str]):
        mods = dict(model.named_modules())
        self.out: dict[str, torch.Tensor] = {}
        self.hooks = [mods[n].register_forward_hook(self._keep(n)) for n in names]
        self.names = names

    def _keep(self, name):
        def hook(mod, inp, out):
            self.out[name] = out
        return hook

    def get(self) -> list[torch.Tensor]:
        return [self.out[n] for n in self.names]

    def remove(self):
        for h in self.hooks:
            h.remove()


@register_defense("nad", params=NADParams)
def defend(model, clean, p: NADParams, ctx):
    """Neural Attention Distillation: fine-tuned teacher, attention-distilled student."""
    teacher = working_copy(model, ctx.device)
    dev = next(teacher.parameters()).device
    clean = clean.to(dev)
    t_hist = finetune(teacher, clean, epochs=p.te_epochs, batch_size=p.batch_size, lr=p.lr, momentum=p.momentum,
                      weight_decay=p.weight_decay, schedule="constant", seed=ctx.seed, device=dev)
    teacher.eval()
    student = working_copy(model, dev)
    layers = attention_layers(student, normalize(clean.x[:2], clean.info))
    betas = (p.beta1, p.beta2, p.beta3)
    s_taps, t_taps = _Taps(student, layers), _Taps(teacher, layers)
    opt = torch.optim.SGD(student.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    gen = seeded(ctx.seed + 1, dev)

    def step(x, y):
        student.train()
        out = student(x)
        with torch.no_grad():
            teacher(x)
        loss = F.cross_entropy(out, y)
        for b, fs, ft in zip(betas, s_taps.get(), t_taps.get()):
            loss = loss + b * at_loss(fs, ft.detach(), p.p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "correct": (out.argmax(1) == y).sum()}

    try:
        s_curve = fit(student, clean, step, epochs=p.te_epochs, batch_size=p.batch_size, gen=gen, phase="student")
    finally:
        s_taps.remove()
        t_taps.remove()
    student.eval()
    diag = {"layers": layers, "teacher_clean_acc": clean_acc(teacher, clean), "clean_acc": clean_acc(student, clean)}
    curves = [{"phase": "teacher", **h} for h in t_hist] + s_curve
    return DefenseOutput(student, diag, curves)
