"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022, arXiv 2110.03735).

A minimax problem: the inner player finds a universal perturbation ``delta`` (one image-sized
tensor added to every input) that maximises the loss; the outer player updates the model to
classify clean images correctly even with ``delta`` applied. The outer gradient accounts for
how the inner optimum moves with the weights (implicit hypergradient): with the fixed-point
map ``Phi(delta, w) = delta - a * grad_delta L_in(delta, w)``, the hypergradient is
``grad_w L_out + (d Phi / d w)^T v`` where ``v = sum_{k<K} (d Phi / d delta)^T^k grad_delta L_out``
(K fixed-point iterations; the ``fixed_point`` routine of hypertorch that I-BAU uses).

Per round, as BackdoorBench's ``defense/i-bau.py``:
1. ``delta = 0``; one pass over the clean data with SGD (lr 10) on
   ``-CE(f(x + delta), f(x).argmax) + 0.001 ||delta||^2`` (labels: the model's own predictions).
2. One pass over the clean data: per batch, the hypergradient above with
   ``L_in = -CE(f(x + delta), y) + 0.001 ||delta||^2`` (fixed-point step a = 0.1) and
   ``L_out = CE(f(x with delta on a random 1% of the batch), y)``, then an Adam step.
The model stays in eval mode throughout (the reference calls ``model.eval()``), so BatchNorm
running statistics are not changed. Perturbations are added in normalised input space, as
there. Deviation: the reference's inner loss reads the first batch of the epoch every time;
we use the current batch (both are stochastic estimates of the same Jacobian).

Defaults: BackdoorBench ``config/defense/i-bau/config.yaml``: n_rounds 5, K 5, Adam lr 1e-4
(betas 0.9, 0.999, no weight decay), batch 256; ``i-bau.py``: delta lr 10, regulariser 0.001,
fixed-point step 0.1, outer patch portion 0.01.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defense.methods import DefenseOutput, register_defense
from defense.methods._common import clean_acc, fit, seeded, working_copy


@dataclass
class IBAUParams:
    n_rounds: int = 5  # BackdoorBench i-bau/config.yaml
    K: int = 5  # idem: fixed-point iterations
    lr: float = 1e-4  # idem: outer Adam learning rate
    batch_size: int = 256  # idem
    delta_lr: float = 10.0  # i-bau.py: SGD lr of the perturbation search
    reg: float = 0.001  # i-bau.py: weight of ||delta||^2
    inner_lr: float = 0.1  # i-bau.py: step of the fixed-point map (GradientDescent(loss_inner, 0.1))
    portion: float = 0.01  # i-bau.py: share of each outer batch that carries delta

    def check(self):
        if self.n_rounds < 0 or self.K < 0:
            yield "n_rounds and K must be >= 0"
        if not 0 <= self.portion <= 1:
            yield f"portion must be in [0, 1], got {self.portion}"


def hypergradient(net, params, delta, x, y, p: IBAUParams, gen) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Implicit hypergradient of the outer loss w.r.t. ``params`` (fixed-point method, K steps)."""
    d = delta.detach().requires_grad_(True)
    n = len(x)
    sel = torch.randperm(n, generator=gen)[: int(n * p.portion)].to(x.device)
    carry = torch.zeros(n, 1, 1, 1, device=x.device)
    carry[sel] = 1.0
    o_loss = F.cross_entropy(net(x + carry * d), y)
    g = torch.autograd.grad(o_loss, [d] + params, allow_unused=True)
    g_d = g[0] if g[0] is not None else torch.zeros_like(d)
    g_w = [gi if gi is not None else torch.zeros_like(w) for gi, w in zip(g[1:], params)]
    inner = -F.cross_entropy(net(x + d), y) + p.reg * d.pow(2).sum()
    mapped = d - p.inner_lr * torch.autograd.grad(inner, d, create_graph=True)[0]
    v = torch.zeros_like(d)
    for _ in range(p.K):
        v_prev = v
        v = torch.autograd.grad(mapped, d, grad_outputs=v, retain_graph=True)[0] + g_d
        if float((v - v_prev).norm()) < 1e-10:
            break
    g_map = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    grads = [gw + gm if gm is not None else gw for gw, gm in zip(g_w, g_map)]
    return grads, o_loss.detach()


@register_defense("ibau", params=IBAUParams)
def defend(model, clean, p: IBAUParams, ctx):
    """Implicit Backdoor Adversarial Unlearning (universal-perturbation minimax, implicit hypergradient)."""
    net = working_copy(model, ctx.device)
    dev = next(net.parameters()).device
    clean = clean.to(dev)
    gen = seeded(ctx.seed, dev)
    net.eval()
    params = [q for q in net.parameters() if q.requires_grad]
    outer = torch.optim.Adam(params, lr=p.lr, betas=(0.9, 0.999), weight_decay=0.0)
    shape = (1, clean.info.channels, clean.info.size, clean.info.size)
    curves, deltas = [], []
    for rnd in range(p.n_rounds):
        delta = torch.zeros(shape, device=dev, requires_grad=True)
        d_opt = torch.optim.SGD([delta], lr=p.delta_lr)

        def search(x, y):
            with torch.no_grad():
                pseudo = net(x).argmax(1)
            loss = -F.cross_entropy(net(x + delta), pseudo) + p.reg * delta.pow(2).sum()
            d_opt.zero_grad(set_to_none=True)
            loss.backward()
            d_opt.step()
            return {"loss": loss.detach()}

        curves += fit(net, clean, search, epochs=1, batch_size=p.batch_size, gen=gen, phase=f"perturb{rnd + 1}")
        deltas.append(float(delta.detach().norm()))

        def unlearn(x, y):
            grads, loss = hypergradient(net, params, delta, x, y, p, gen)
            outer.zero_grad(set_to_none=True)
            for q, g in zip(params, grads):
                q.grad = g.detach()
            outer.step()
            return {"loss": loss}

        curves += fit(net, clean, unlearn, epochs=1, batch_size=p.batch_size, gen=gen, phase=f"unlearn{rnd + 1}")
    net.eval()
    return DefenseOutput(net, {"delta_norm": deltas, "clean_acc": clean_acc(net, clean)}, curves)
