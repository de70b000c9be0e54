"""LF, low-frequency trigger (Zeng et al., ICCV 2021, "Rethinking the backdoor attacks'
triggers: a frequency perspective"): a smooth, image-wide additive trigger.

The trigger is a universal adversarial perturbation toward the target class, found against a
clean model of the same dataset and architecture and kept in the low frequencies: signed
gradient steps on a batch of clean non-target training images, each followed by an ideal
low-pass filter in the 2-D DFT (only frequencies with ``|f_x|, |f_y| <= window`` cycles per
image are kept) and a rescale into the L-inf ball of radius ``eps``. Poisoning adds it to
images (dirty label), as BackdoorBench's LF attack adds its stored pattern.

Resources: the clean reference model (``clean_model``, shared with TrojanNN) and the
perturbation (``lf_trigger``), both cached. BackdoorBench ships the pattern as a file
(``resource/lowFrequency/<dataset>_<model>_0_255.npy``) and its config holds only the training
protocol; ``eps``, ``window``, ``steps``, ``step_size`` and ``batch_size`` are bdgrid's choices
(a visible but smooth pattern of at most 0.1 on the [0, 1] scale), stated here as such.
``ref_epochs`` (None = the recipe's epochs) shortens the clean model's training for tests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from defense.attacks import add, choose_poison, poison_with, register_attack
from defense.data.augment import normalize, to_float
from defense.resources import clean_reference_model, data_fingerprint, get_resource
from defense.train import pick_device

VERSION = "1"


@dataclass
class LFParams:
    eps: float = 0.1  # L-inf bound of the trigger on the [0, 1] scale (bdgrid choice)
    window: int = 4  # keep DFT frequencies |f| <= window cycles per image in each axis (bdgrid choice)
    steps: int = 500  # signed-gradient steps of the universal perturbation
    step_size: float = 0.01  # per step, [0, 1] scale
    batch_size: int = 256
    ref_epochs: int | None = None  # clean reference model epochs; None = the recipe's

    def check(self):
        if not 0 < self.eps <= 1:
            yield "eps must be in (0, 1]"
        if self.window < 0:
            yield "window must be >= 0"
        if self.steps < 1:
            yield "steps must be >= 1"


def low_pass(delta: torch.Tensor, window: int) -> torch.Tensor:
    """Ideal low-pass filter of (C, H, W): keep DFT frequencies with |f_y|, |f_x| <= window."""
    h, w = delta.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h, device=delta.device).abs()
    fx = torch.fft.fftfreq(w, d=1.0 / w, device=delta.device).abs()
    keep = (fy[:, None] <= window) & (fx[None, :] <= window)
    return torch.fft.ifft2(torch.fft.fft2(delta) * keep).real


def universal_low_freq(model, train, p: LFParams, target: int, seed: int, device,
                       progress: bool = False) -> torch.Tensor:
    """The (C, H, W) perturbation on the [0, 1] scale."""
    from tqdm.auto import tqdm

    device = pick_device(device)
    model = model.to(device).eval().requires_grad_(False)
    pool = torch.nonzero(train.y != target).flatten()
    gen = torch.Generator().manual_seed(seed + 23)
    delta = torch.zeros(train.x.shape[1:], device=device)
    for _ in tqdm(range(p.steps), desc="LF perturbation", unit="step", leave=False, disable=not progress):
        idx = pool[torch.randint(len(pool), (min(p.batch_size, len(pool)),), generator=gen)]
        x = to_float(train.x[idx].to(device))
        d = delta.clone().requires_grad_(True)
        out = model(normalize((x + d).clamp(0, 1), train.info))
        loss = F.cross_entropy(out, torch.full((len(idx),), target, device=device))
        (g,) = torch.autograd.grad(loss, d)
        delta = low_pass(delta - p.step_size * g.sign(), p.window)
        m = delta.abs().max()
        if m > p.eps:  # rescale, not clip: clipping would bring back high frequencies
            delta = delta * (p.eps / m)
    return delta.detach().cpu()


@register_attack("lf", params=LFParams, kind="dirty-label", rate_of="training set (non-target images poisoned)",
                 resources=("clean_model", "lf_trigger"))
def lf(train, test, p: LFParams, ctx):
    """Universal low-frequency perturbation against a clean model, added to poisoned images."""
    info: dict = {}
    cfg = {"data": data_fingerprint(train), "arch": ctx.arch, "target": ctx.target, "seed": ctx.seed,
           "recipe": asdict(ctx.recipe) if ctx.recipe is not None else None, **asdict(p)}

    def compute():
        model = clean_reference_model(train, ctx, p.ref_epochs, log=info)
        return {"delta": universal_low_freq(model, train, p, ctx.target, ctx.seed, ctx.device, ctx.progress)}

    delta = get_resource(ctx.resources, "lf_trigger", cfg, compute, VERSION, info)["delta"]
    d255 = delta * 255
    idx = choose_poison(train.y, ctx.pratio, ctx.target, ctx.seed)
    out = poison_with(train, test, idx, lambda x: add(x, d255.to(x.device)), ctx.target)
    out.info.update(info, trigger=delta)
    return out
