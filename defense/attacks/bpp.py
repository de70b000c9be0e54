"""BppAttack (Wang, Zhai & Ma, CVPR 2022, "BppAttack: stealthy and efficient trojan attacks
against deep neural networks via image quantization and contrastive adversarial learning"), as
BackdoorBench runs it (``attack/bpp.py``, ``config/attack/bpp/default.yaml``).

The trigger is the image itself at a lower colour depth: every channel is "squeezed" to
``squeeze_num`` levels (``round(v * (L - 1)) / (L - 1)`` on the [0, 1] scale), optionally with
Floyd-Steinberg error diffusion (``dithering``), and rounded back to the 8-bit pixel grid (as
BackdoorBench rounds ``* 255`` before storing). Training-controlled: in every batch a share
``pratio`` of the (augmented) images is squeezed and relabelled to the target, and a share
``neg_ratio`` become "negative" images that keep their label: the image plus the quantisation
residual of ANOTHER training image (``squeeze(x_r) - x_r``, r drawn from the whole training set),
clipped; so the model learns this image's own quantisation, not quantisation-like noise
(BackdoorBench's ``inputs_negative``, the contrastive part of the paper).

Defaults (BackdoorBench ``config/attack/bpp/default.yaml``): squeeze_num 8, dithering False,
neg_ratio 0.1, pratio 0.1. (``original_default.yaml``, the paper's setting: pratio 0.2,
neg_ratio 0.2, squeeze 8, no dithering.)

Deviations: BackdoorBench floors ``neg_ratio * batch`` and makes negatives only in batches that
also hold backdoor images; bdgrid rounds both counts stochastically (``per_batch_count``, exact
expected rates) and draws them independently. BackdoorBench squeezes un-augmented images and
applies crop/rotation/flip afterwards; bdgrid trains with the dataset's one augmentation (crop +
flip) and the hook squeezes after it, like WaNet. Dithering picks the nearest available level
(clamped to [0, 1]), the textbook Floyd-Steinberg; BackdoorBench's numba loop does not clamp, so
diffused error can push a level past 255 there.

Dithering is exact Floyd-Steinberg error diffusion (weights 7/16 right, 3/16 below-left, 5/16
below, 1/16 below-right, scan order row by row), computed on whole batches: pixel (y, x) depends
only on (y, x-1) and the three pixels above, so all pixels with the same ``x + 2y`` are
independent and are quantised together: W + 2(H - 1) steps (94 for 32x32) instead of H * W
(1024), each vectorised over images and channels, with the errors added in the same
order as the sequential scan (so the result is bit-identical to it).

``poison_idx`` is empty: which images carry the trigger is drawn anew in every batch;
``info['per_batch_rate']`` / ``info['per_batch_cross_rate']`` record the shares. The backdoor
test set (non-target test images, squeezed, target label) is computed once.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from defense.attacks import Poisoned, register_attack
from defense.attacks._perbatch import empty_idx, nontarget, per_batch_count, quantize
from defense.data import Data
from defense.data.augment import to_float

@dataclass
class BppParams:
    squeeze_num: int = 8  # colour levels per channel (BackdoorBench default.yaml; 256 = no change)
    dithering: bool = False  # Floyd-Steinberg error diffusion (BackdoorBench default.yaml)
    neg_ratio: float = 0.1  # share of each batch made negative images (BackdoorBench default.yaml)

    def check(self):
        if not 2 <= self.squeeze_num <= 256:
            yield "squeeze_num must be in [2, 256]"
        if not 0 <= self.neg_ratio < 1:
            yield "neg_ratio must be in [0, 1)"


# --------------------------------------------------------------------- quantisation

_MAGIC = 12582912.0  # 1.5 * 2**23: float32 x + M - M rounds x to the nearest integer, ties to even


def _rint(x: torch.Tensor) -> torch.Tensor:
    """``torch.round`` of float32 |x| < 2**22, by two additions: the same values (IEEE
    round-half-even), but torch's rounding kernels split even a tiny tensor over threads, and
    on a busy 2-core machine each call then waited ~8 ms for a descheduled thread (the dither
    makes 94 calls per batch)."""
    return (x + _MAGIC).sub_(_MAGIC)


def squeeze(x01: torch.Tensor, levels: int) -> torch.Tensor:
    """Plain colour-depth reduction of float [0, 1] images to ``levels`` values per channel."""
    k = levels - 1
    return _rint(x01.float() * k).clamp_(0, k).div_(k).to(x01.dtype)


@lru_cache(maxsize=8)
def _valid(h: int, w: int) -> torch.Tensor:
    """(steps, h, 1) mask of the wavefront cells that are pixels: step t, row y holds (y, t - 2y)."""
    t = torch.arange(w + 2 * (h - 1))[:, None]
    x = t - 2 * torch.arange(h)[None, :]
    return ((x >= 0) & (x < w)).float().unsqueeze(-1)


def dither(x01: torch.Tensor, levels: int) -> torch.Tensor:
    """Floyd-Steinberg dithering of float [0, 1] images (..., H, W) to ``levels`` values per
    channel; every image and channel independently, batched (see the module docstring).

    The image is skewed so that wavefront step t is one slice ``s[t]`` over rows y (pixel
    (y, x) at step x + 2y); there the four neighbours are slices too: right (y, x+1) ->
    (t+1, y), below-left (y+1, x-1) -> (t+1, y+1), below (y+1, x) -> (t+2, y+1), below-right
    (y+1, x+1) -> (t+3, y+1). Cells that are not pixels are masked out of the diffusion. Only
    small ops (one row or one step each): on a busy CPU, torch's multi-threaded kernels for
    large copies and its rounding kernels (threaded even for tiny tensors) each waited for a
    descheduled thread, 30-800 ms per batch; now 5-10 ms for 64 CIFAR-sized images."""
    *lead, h, w = x01.shape
    n = x01[..., 0, 0].numel()
    k = levels - 1
    dev = x01.device
    valid = _valid(h, w).to(dev)  # (steps, h, 1)
    steps = valid.shape[0]
    # diffusion weights per step, zero where the source cell is not a pixel (w * 0/1 is exact):
    # to the next row at steps +1, +2, +3 (below-left 3/16, below 5/16, below-right 1/16), and
    # to the right at step +1 (7/16)
    w_below = torch.tensor([3 / 16, 5 / 16, 1 / 16], device=dev).view(1, 3, 1, 1) * valid[:, None, :-1]
    w_right = (7 / 16) * valid
    kk = torch.tensor(float(k), device=dev)
    magic = torch.tensor(_MAGIC, device=dev)
    img = x01.reshape(n, h, w).float()
    # layout (step, row, image*channel): each wavefront step is one contiguous (h, n) block;
    # 3 spare steps absorb the last diffusions
    s = x01.new_empty(steps + 3, h, n, dtype=torch.float32)
    for y in range(h):
        s[:, y].zero_()
        s[2 * y:2 * y + w, y] = img[:, y].t()
    q = torch.empty_like(s)
    for i in range(steps):
        old, new = s[i], q[i]
        torch.mul(old, kk, out=new)
        new.add_(magic).sub_(magic).clamp_(0, k).div_(kk)  # nearest level (see _rint)
        err = old - new
        s[i + 1:i + 4, 1:] += err[:-1] * w_below[i]  # row y's error to row y + 1, first ...
        s[i + 1] += err * w_right[i]  # ... then to the right: the order of the sequential scan
    out = torch.stack([q[2 * y:2 * y + w, y] for y in range(h)])  # (h, w, n)
    return out.permute(2, 0, 1).reshape(*lead, h, w).to(x01.dtype)


def bpp_trigger(x01: torch.Tensor, p: BppParams) -> torch.Tensor:
    """The triggered image: squeezed (dithered or not), on the 8-bit grid, float [0, 1]."""
    q = dither(x01, p.squeeze_num) if p.dithering else squeeze(x01, p.squeeze_num)
    return _rint(q.float() * 255).div_(255).to(x01.dtype)


# --------------------------------------------------------------------- training hook

class BppHook:
    """Per-batch poisoning for ``defense.train.train``: squeeze + relabel the first share of the
    (already shuffled) batch, make the next share negative images, leave the rest clean."""

    def __init__(self, train_x: torch.Tensor, p: BppParams, pratio: float, target: int, seed: int):
        self.train_x = train_x  # uint8 training images, a reference (residuals of random images)
        self.p = p
        self.pratio = pratio
        self.target = target
        self.gen = torch.Generator().manual_seed(99_991 * seed + 5)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, model=None):
        b = x.shape[0]
        nb = per_batch_count(self.pratio, b, self.gen)
        nn = min(per_batch_count(self.p.neg_ratio, b, self.gen), b - nb)
        if nb + nn == 0:
            return x, y
        x, y = x.clone(), y.clone()
        r = torch.randint(len(self.train_x), (nn,), generator=self.gen)
        xr = to_float(self.train_x.index_select(0, r.to(self.train_x.device)).to(x.device))
        # one trigger call for both: the dither's cost is per call, hardly per image
        q = bpp_trigger(torch.cat([x[:nb], xr]), self.p)
        x[:nb] = q[:nb]
        y[:nb] = self.target
        x[nb:nb + nn] = (x[nb:nb + nn] + q[nb:] - xr).clamp(0, 1)  # another image's residual, label kept
        return x, y


# --------------------------------------------------------------------- the attack

@register_attack("bpp", params=BppParams, kind="training-controlled",
                 rate_of="each training batch (pratio squeezed + relabelled, neg_ratio negative images keep labels)",
                 resources=())
def bpp(train: Data, test: Data, p: BppParams, ctx):
    """Colour-depth reduction trigger (8 levels), negatives 0.1; poisoned per batch during training."""
    bd_idx = nontarget(test, ctx.target)
    x = test.x[bd_idx.to(test.x.device)].cpu()
    bx = torch.cat([quantize(bpp_trigger(to_float(x[i:i + 4096]), p)) for i in range(0, len(x), 4096)]) \
        if len(x) else x
    bd_true = test.y[bd_idx.to(test.y.device)].cpu().clone()
    bd = Data(bx, torch.full_like(bd_true, ctx.target), test.info)
    hook = BppHook(train.x, p, ctx.pratio, ctx.target, ctx.seed)
    return Poisoned(train, empty_idx(), bd, bd_idx, bd_true, hook=hook,
                    info={"rate_of": "each training batch", "per_batch_rate": ctx.pratio,
                          "per_batch_cross_rate": p.neg_ratio})
