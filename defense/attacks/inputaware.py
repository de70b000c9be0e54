"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): every image gets its own trigger.

Two small encoder-decoder CNNs: a mask generator M (one channel, squashed to near-binary by
``tanh(20 m - 10)``) and a pattern generator G (image channels, in [0, 1]). A backdoor image is
``x + (G(x) - x) * M(x)`` labelled with the target; a "cross" image is ``x + (G(x') - x) *
M(x')`` with the trigger of another image x', keeping its label, so a trigger only works on
the image it was made for. A diversity loss ``|x - x'| / |G(x) - G(x')|`` keeps patterns
input-dependent.

As in BackdoorBench (``attack/inputaware.py``), training has two phases:
1. M alone, ``mask_epochs`` epochs on the clean training set: loss ``lambda_norm *
   mean(relu(M(x) - mask_density)) + lambda_div * diversity``, Adam lr 0.01 betas (0.5, 0.9),
   lr x0.1 at epochs 10 and 20, batch 128. Here M is the upstream resource ``inputaware_mask``
   (cached, keyed by dataset content, params and seed); then M is frozen.
2. G and the classifier together. bdgrid has one training loop, so G is trained *inside the
   per-batch hook*: the hook builds backdoor and cross images that stay attached to G's graph,
   the loop's ``loss.backward()`` sends the classifier's cross-entropy into G, the hook adds
   the diversity loss's gradient, and G's own Adam (lr 0.01, betas (0.5, 0.9)) steps at the
   start of the next batch (and once more in ``finish``). That is BackdoorBench's joint step
   (one loss, both optimisers step) with G's update applied just before the next batch
   instead of just after this one: the same updates in the same order. BackdoorBench's G
   milestones (200+ epochs) lie past a 100-epoch run, so G's lr is constant.

Per batch, ``pratio`` of the images become backdoor images and as many again become cross
images (BackdoorBench: ``num_cross = num_bd``, i.e. cross ratio 1). The backdoor test set is
made after training with the trained G (``Poisoned.finish(model)``); to evaluate later in
another process, save ``poisoned.hook.state_dict()`` or the finished backdoor test set.

Defaults (BackdoorBench ``config/attack/inputaware/default.yaml``): mask_density 0.032,
lambda_div 1, lambda_norm 100, lr_G = lr_M = 0.01, clean_train_epochs (mask_epochs) 25;
generator width 32 channels for 32x32 inputs (their ``InputAwareGenerator``, 3 down/up steps).
``poison_idx`` is empty: the poisoned images are drawn anew in every batch
(``info['per_batch_rate']``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.attacks import Poisoned, register_attack
from defense.attacks._perbatch import empty_idx, nontarget, per_batch_count, quantize
from defense.data import Data
from defense.data.augment import normalize, to_float
from defense.resources import data_fingerprint, get_resource
from defense.train import index_batches, make_batch, pick_device

VERSION = "2"
EPS = 1e-7  # BackdoorBench EPSILON


@dataclass
class InputAwareParams:
    mask_density: float = 0.032  # target share of trigger pixels (BackdoorBench default)
    lambda_div: float = 1.0  # diversity loss weight (BackdoorBench default)
    lambda_norm: float = 100.0  # mask density loss weight (BackdoorBench default)
    lr_g: float = 0.01  # pattern generator Adam lr (BackdoorBench lr_G)
    lr_m: float = 0.01  # mask generator Adam lr (BackdoorBench lr_M)
    mask_epochs: int = 25  # mask generator pre-training epochs (BackdoorBench clean_train_epochs)
    cross_ratio: float = 1.0  # cross images per backdoor image (BackdoorBench: num_cross = num_bd)
    width: int = 32  # generator channels at full resolution (BackdoorBench: 32 for 3-channel data)
    batch_size: int = 128  # mask pre-training batch (BackdoorBench batch size)

    def check(self):
        if not 0 < self.mask_density < 1:
            yield "mask_density must be in (0, 1)"
        if self.mask_epochs < 0:
            yield "mask_epochs must be >= 0"
        if self.width < 2:
            yield "width must be >= 2"
        if self.cross_ratio < 0:
            yield "cross_ratio must be >= 0"


# --------------------------------------------------------------------- generators

def _conv(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    # BatchNorm momentum 0.05 as BackdoorBench's Conv2dBlock
    mods = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    return mods + [nn.ReLU(inplace=True)] if relu else mods


class Generator(nn.Sequential):
    """Encoder-decoder of the Input-aware paper: 3 (conv, conv, pool) steps down from ``width``
    channels, a middle conv, 3 (upsample, conv, conv) steps up, output ``tanh / 2 + 0.5``."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, steps: int = 3):
        layers: list[nn.Module] = []
        c, nxt = in_channels, width
        for i in range(steps):
            layers += _conv(c, nxt) + _conv(nxt, nxt) + [nn.MaxPool2d(2)]
            c = nxt
            if i < steps - 1:
                nxt *= 2
        layers += _conv(c, c)
        for i in range(steps):
            out = out_channels if i == steps - 1 else c // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear")] + _conv(c, c) + _conv(c, out, relu=i < steps - 1)
            c = out
        super().__init__(*layers)

    def forward(self, x):
        return torch.tanh(super().forward(x)) / (2 + EPS) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """Near-binary mask (BackdoorBench ``Threshold``)."""
    return torch.tanh(m * 20 - 10) / (2 + EPS) + 0.5


def diversity(a: torch.Tensor, b: torch.Tensor, pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """mean over pairs of RMS(a - b) / RMS(pa - pb)."""
    # + 1e-12 under the root: the gradient of sqrt at 0 is infinite, and two saturated masks can be
    # exactly equal in float32, which would turn the generator's weights into NaN
    di = (a - b).pow(2).mean(dim=(1, 2, 3)).add(1e-12).sqrt()
    dp = (pa - pb).pow(2).mean(dim=(1, 2, 3)).add(1e-12).sqrt()
    return (di / (dp + EPS)).mean()


# --------------------------------------------------------------------- mask resource

def train_mask(train: Data, p: InputAwareParams, seed: int, device, progress: bool = False) -> dict[str, torch.Tensor]:
    """Phase 1: the mask generator alone, on the clean training set."""
    from tqdm.auto import tqdm

    device = pick_device(device)
    info = train.info
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Generator(info.channels, 1, p.width).to(device)
    opt = torch.optim.Adam(net.parameters(), p.lr_m, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [10, 20], 0.1)  # BackdoorBench schedulerM
    gen = torch.Generator().manual_seed(seed + 11)
    data = train.to(device)
    net.train()
    for _ in tqdm(range(p.mask_epochs), desc="input-aware mask generator", unit="ep", leave=False,
                  disable=not progress):
        order2 = torch.randperm(len(data), generator=gen)  # the second, independently shuffled loader
        for i, idx in enumerate(index_batches(len(data), p.batch_size, True, gen)):
            idx2 = order2[i * p.batch_size: i * p.batch_size + len(idx)]
            x1, _ = make_batch(data, idx, gen, True)
            x2, _ = make_batch(data, idx2, gen, True)
            m1, m2 = threshold(net(x1)), threshold(net(x2))
            loss = p.lambda_norm * F.relu(m1 - p.mask_density).mean() + p.lambda_div * diversity(x1, x2, m1, m2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


# --------------------------------------------------------------------- per-batch hook

class InputAwareHook:
    """Per-batch poisoning that also trains the pattern generator G (see module docstring)."""

    def __init__(self, info, mask_state: dict, p: InputAwareParams, pratio: float, target: int, seed: int):
        self.info, self.p, self.pratio, self.target = info, p, pratio, target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.G = Generator(info.channels, info.channels, p.width)
        self.M = Generator(info.channels, 1, p.width)
        self.M.load_state_dict(mask_state)
        self.M.eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.G.parameters(), p.lr_g, betas=(0.5, 0.9))
        self.gen = torch.Generator().manual_seed(15_485_863 * seed + 5)
        self.pending = False  # G has gradients from the last batch that are not applied yet

    def _to(self, device):
        if next(self.G.parameters()).device != device:
            self.G.to(device)
            self.M.to(device)
            # Adam state follows its parameters lazily (created on the first step on that device)

    def flush(self):
        if self.pending:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.pending = False

    def trigger(self, x01: torch.Tensor, source01: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the trigger made from ``source01`` (default: the image itself) to ``x01``."""
        src = x01 if source01 is None else source01
        xn = normalize(src, self.info)
        pat, mask = self.G(xn), threshold(self.M(xn))
        return x01 + (pat - x01) * mask

    def __call__(self, x: torch.Tensor, y: torch.Tensor, model=None):
        self._to(x.device)
        self.flush()
        self.G.train()
        b = x.shape[0]
        nb = per_batch_count(self.pratio, b, self.gen)
        nc = min(per_batch_count(self.pratio * self.p.cross_ratio, b, self.gen), b - nb)
        if nb == 0 and nc == 0:
            return x, y
        shift = int(torch.randint(1, max(2, b), (), generator=self.gen)) if b > 1 else 0
        x2 = x.roll(shift, 0)  # a different image for every position: the "second loader"
        xn, x2n = normalize(x[: nb + nc], self.info), normalize(x2[: nb + nc], self.info)
        pat1 = self.G(xn[:nb]) if nb else None
        pat2 = self.G(x2n[nb:nb + nc]) if nc else None
        parts = []
        if nb:
            m1 = threshold(self.M(xn[:nb]))
            parts.append(x[:nb] + (pat1 - x[:nb]) * m1)
        if nc:
            m2 = threshold(self.M(x2n[nb:nb + nc]))
            parts.append(x[nb:nb + nc] + (pat2 - x[nb:nb + nc]) * m2)
        # diversity loss on the backdoor images and as many other images (BackdoorBench pairs
        # inputs1[:num_bd] with inputs2[num_bd: 2 num_bd]); its gradient goes to G only
        k = min(nb, nc)
        if k and self.p.lambda_div > 0:
            div = self.p.lambda_div * diversity(x[:k], x2[nb:nb + k], pat1[:k], pat2[:k])
            div.backward(retain_graph=True)
        self.pending = True
        out = torch.cat(parts + [x[nb + nc:]])
        y = y.clone()
        y[:nb] = self.target
        return out, y

    @torch.no_grad()
    def apply(self, x_uint8: torch.Tensor, device=None, batch_size: int = 512) -> torch.Tensor:
        """Backdoor uint8 images with their own triggers (eval mode), uint8 out."""
        self.flush()
        device = device or next(self.G.parameters()).device
        self._to(torch.device(device))
        self.G.eval()
        out = [quantize(self.trigger(to_float(x_uint8[i:i + batch_size].to(device)))).cpu()
               for i in range(0, len(x_uint8), batch_size)]
        return torch.cat(out) if out else x_uint8.clone()

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.flush()
        return {**{f"G.{k}": v for k, v in self.G.state_dict().items()},
                **{f"M.{k}": v for k, v in self.M.state_dict().items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.G.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("G.")})
        self.M.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("M.")})


@register_attack("inputaware", params=InputAwareParams, kind="training-controlled",
                 rate_of="each training batch (pratio backdoor + pratio*cross_ratio cross images)",
                 resources=("inputaware_mask",))
def inputaware(train: Data, test: Data, p: InputAwareParams, ctx):
    """Per-image triggers from a mask generator (resource) and a pattern generator trained with the classifier."""
    info = {"rate_of": "each training batch", "per_batch_rate": ctx.pratio,
            "per_batch_cross_rate": ctx.pratio * p.cross_ratio}
    mask_cfg = {"data": data_fingerprint(train), "seed": ctx.seed,
                **{k: v for k, v in asdict(p).items() if k in ("mask_density", "lambda_div", "lambda_norm", "lr_m",
                                                              "mask_epochs", "width", "batch_size")}}
    mask_state = get_resource(ctx.resources, "inputaware_mask", mask_cfg,
                              lambda: train_mask(train, p, ctx.seed, ctx.device, ctx.progress), VERSION, info)
    hook = InputAwareHook(train.info, mask_state, p, ctx.pratio, ctx.target, ctx.seed)
    bd_idx = nontarget(test, ctx.target)
    bd_true = test.y[bd_idx].cpu().clone()

    def finish(model=None):
        bx = hook.apply(test.x[bd_idx].cpu(), device=pick_device(ctx.device))
        return Data(bx, torch.full_like(bd_true, ctx.target), test.info), bd_idx, bd_true

    return Poisoned(train, empty_idx(), None, bd_idx, bd_true, hook=hook, finish=finish, info=info)
