"""LC, label-consistent backdoor (Turner, Tsipras & Madry, 2019, "Label-consistent backdoor
attacks", arXiv 1912.02771), as BackdoorBench runs it (``attack/lc.py``,
``utils/bd_img_transform/lc.py``, ``resource/label-consistent/craft_adv_dataset.py``).

Clean label: only target-class training images are poisoned and keep their (correct) labels.
So that the model cannot classify them from their content alone and leans on the trigger, each
poisoned image is first made hard to classify by an untargeted L-inf PGD perturbation against a
clean reference model (maximise the cross-entropy of its true class, no random start, ``steps``
signed-gradient steps of ``step_size``, projected into the ``eps`` ball and [0, 1]); then the
trigger is stamped on it. Backdoor test images are non-target test images with the trigger only
(no perturbation), labelled with the target.

Trigger (BackdoorBench ``labelConsistentAttack``, from the authors' code): a 3x3 +-1
checkerboard-like pattern in each of the four corners (``all-corners``, the default; mirrored
left-right on the right-hand corners, so the trigger survives a horizontal flip) or only in the
bottom-right corner (``bottom-right``); ``+-255 * amplitude`` is added to every channel and the
result clipped, so at amplitude 1 the pattern is pure white/black. For images other than 32x32
the 32x32 pattern is resized nearest-neighbour, as BackdoorBench does.

Defaults and their source:
- ``amplitude`` 1: BackdoorBench ``config/attack/lc/default.yaml`` (``reduced_amplitude: 1``).
- ``eps`` 8, ``step_size`` 1.5, ``steps`` 100 (pixel levels of 255): the ``pgd_config`` of
  BackdoorBench's ``craft_adv_dataset.py`` (its attack script names the file ``..._16_train.npy``,
  but the crafting script uses eps 8).
- pratio 0.1 and what it is a fraction of: BackdoorBench ``attack/lc.py``: the poisoning rate is
  ALWAYS poisoned images / all training images, drawn from the target class only.

Rate cap (a bdgrid choice): when ``round(pratio * N)`` exceeds the number of target-class
images, every target-class image is poisoned, a ``UserWarning`` says so, and ``info`` records
``requested``, ``poisoned`` and ``capped``. (BackdoorBench's ``np.random.choice(...,
replace=False)`` raises there; e.g. GTSRB class 0 holds 0.5% of the set, below any usual rate.)

Deviations: BackdoorBench (like the paper) perturbs against an adversarially trained ResNet-18
checkpoint shipped as a file; bdgrid downloads nothing and uses the clean reference model of the
trial's dataset and architecture (resource ``clean_model``, shared with LF and TrojanNN, so a
grid trains it once). The perturbed images are rounded to uint8 (BackdoorBench truncates).

Resource ``lc_adv``: the perturbed versions of ALL target-class training images (``idx``,
``x`` uint8), keyed by dataset content, arch, target, seed, recipe, reference epochs and the PGD
settings; so trials at different rates (or triggers) share one resource.
``ref_epochs`` (None = the recipe's epochs) shortens the clean model's training for tests.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from defense.attacks import add, choose_poison, poison_with, register_attack
from defense.attacks._perbatch import quantize
from defense.data import Data
from defense.data.augment import normalize, to_float
from defense.resources import clean_reference_model, data_fingerprint, get_resource
from defense.train import pick_device

VERSION = "1"

# Top-left corner cell of the authors' pattern (+1 adds, -1 subtracts 255 * amplitude); the
# left-hand corners carry it as is, the right-hand corners its left-right mirror.
CORNER = torch.tensor([[1.0, -1.0, -1.0],
                       [-1.0, 1.0, -1.0],
                       [1.0, -1.0, 1.0]])


@dataclass
class LCParams:
    eps: float = 8.0  # PGD L-inf bound, pixel levels of 255 (BackdoorBench craft_adv_dataset.py)
    step_size: float = 1.5  # PGD step, pixel levels (BackdoorBench craft_adv_dataset.py)
    steps: int = 100  # PGD steps (BackdoorBench craft_adv_dataset.py)
    trigger: Literal["all-corners", "bottom-right"] = "all-corners"  # BackdoorBench labelConsistentAttack default
    amplitude: float = 1.0  # trigger strength in [0, 1] (BackdoorBench reduced_amplitude)
    batch_size: int = 256  # images per PGD batch (speed only)
    ref_epochs: int | None = None  # clean reference model epochs; None = the recipe's

    def check(self):
        if not 0 <= self.eps <= 255:
            yield "eps must be in [0, 255] (pixel levels)"
        if self.step_size <= 0:
            yield "step_size must be > 0"
        if self.steps < 0:
            yield "steps must be >= 0"
        if not 0 < self.amplitude <= 1:
            yield "amplitude must be in (0, 1]"
        if self.batch_size < 1:
            yield "batch_size must be >= 1"


# --------------------------------------------------------------------- trigger

def trigger_pattern(size: int, kind: str = "all-corners") -> torch.Tensor:
    """(size, size) float pattern in {-1, 0, +1}: drawn on a 32x32 grid, nearest-resized."""
    p = torch.zeros(32, 32)
    mirrored = CORNER.flip(1)
    p[-3:, -3:] = mirrored  # bottom-right: in both kinds
    if kind == "all-corners":
        p[:3, :3] = CORNER
        p[-3:, :3] = CORNER
        p[:3, -3:] = mirrored
    elif kind != "bottom-right":
        raise ValueError(f"unknown lc trigger {kind!r}")
    if size != 32:
        p = F.interpolate(p[None, None], size=(size, size), mode="nearest")[0, 0]
    return p


def stamp(x: torch.Tensor, pattern: torch.Tensor, amplitude: float) -> torch.Tensor:
    """uint8 images (B, C, H, W) with ``255 * amplitude * pattern`` added to every channel, clipped."""
    return add(x, (255.0 * amplitude) * pattern.to(x.device))


# --------------------------------------------------------------------- PGD (the resource)

def pgd_hard(model, x: torch.Tensor, y: torch.Tensor, info, p: LCParams, device) -> torch.Tensor:
    """Untargeted L-inf PGD on uint8 images (B, C, H, W) -> uint8 perturbed images: raise the
    model's loss on the true labels, so the images look unlike their (target) class."""
    eps, alpha = p.eps / 255.0, p.step_size / 255.0
    out = []
    for i in range(0, len(x), p.batch_size):
        x0 = to_float(x[i:i + p.batch_size].to(device))
        yy = y[i:i + p.batch_size].to(device)
        xa = x0.clone()
        for _ in range(p.steps):
            xa.requires_grad_(True)
            loss = F.cross_entropy(model(normalize(xa, info)), yy)
            (g,) = torch.autograd.grad(loss, xa)
            xa = xa.detach() + alpha * g.sign()
            xa = (x0 + (xa - x0).clamp(-eps, eps)).clamp(0, 1)
        out.append(quantize(xa.detach()).cpu())
    return torch.cat(out) if out else x[:0].cpu()


def adversarial_target_images(train: Data, p: LCParams, ctx, info: dict) -> dict[str, torch.Tensor]:
    """The ``lc_adv`` resource: PGD-perturbed copies of every target-class training image."""
    cfg = {"data": data_fingerprint(train), "arch": ctx.arch, "target": ctx.target, "seed": ctx.seed,
           "recipe": asdict(ctx.recipe) if ctx.recipe is not None else None, "ref_epochs": p.ref_epochs,
           "eps": p.eps, "step_size": p.step_size, "steps": p.steps}

    def compute():
        idx = torch.nonzero(train.y.cpu() == ctx.target).flatten()
        model = clean_reference_model(train, ctx, p.ref_epochs, log=info)
        model.requires_grad_(False)
        device = pick_device(ctx.device)
        x = pgd_hard(model, train.x[idx.to(train.x.device)], train.y[idx.to(train.y.device)], train.info, p, device)
        return {"idx": idx, "x": x}

    return get_resource(ctx.resources, "lc_adv", cfg, compute, VERSION, info)


# --------------------------------------------------------------------- the attack

@register_attack("lc", params=LCParams, kind="clean-label",
                 rate_of="training set, drawn from target-class images only (labels kept; capped at the class size)",
                 resources=("clean_model", "lc_adv"))
def lc(train, test, p: LCParams, ctx):
    """Label-consistent: PGD-perturbed target-class images with a corner trigger, labels kept."""
    info: dict = {}
    requested = int(round(ctx.pratio * len(train)))
    idx = choose_poison(train.y, ctx.pratio, ctx.target, ctx.seed, clean_label=True)
    if len(idx) < requested:
        warnings.warn(f"lc: pratio {ctx.pratio} asks for {requested} images but the target class has "
                      f"{len(idx)}; poisoning all of them (rate {len(idx) / len(train):.4f})", stacklevel=2)
    res = adversarial_target_images(train, p, ctx, info)
    dev = train.x.device
    pos = torch.searchsorted(res["idx"], idx.cpu())  # rows of the resource for the poisoned images
    base = train.x.clone()
    base[idx.to(dev)] = res["x"][pos].to(dev)
    pattern = trigger_pattern(train.x.shape[-1], p.trigger)
    out = poison_with(Data(base, train.y, train.info), test, idx.to(dev),
                      lambda x: stamp(x, pattern, p.amplitude), ctx.target, relabel=False)
    out.info.update(info, rate_of="training set, target class only", requested=requested, poisoned=len(idx),
                    capped=len(idx) < requested, pattern=pattern)
    return out
