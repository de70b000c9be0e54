"""TSBD with ``n: auto``: the neuron ratio chosen from clean data alone (ours, issue 20).

The reference (GitHub ``linweiii/TSBD``) runs Stage 2 for each n of its sweep
{0.01, 0.05, 0.1, ..., 0.9} and chooses none; choosing on the validation split reads the
backdoor images, which a real defender does not have. Here:

1. A seeded share ``holdout`` of Dc is held out (``tsbd.split_holdout``); Stages 1a, 1b and 2
   never see it (``tsbd_prepare`` and ``defend`` split Dc the same way).
2. Stages 1a/1b once (``ctx.prepared``), then Stages 1c + 2 for values of ``auto_ladder``.
3. Each purified model is scored on the held-out images against the original model
   (``within_budget``); the chosen n is the largest ladder value that stays within budget.
   ``bisect`` assumes, as an early exit does, that accuracy only falls as n grows, and visits
   about log2(11) + 1 values; ``ascend`` walks up from the smallest and stops at the first break.

The rule reads only the model, Dc and the parameters: no poisoned image, index or target.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch
import torch.nn as nn

from defense.data import Data
from defense.methods import DefenseContext, DefenseOutput
from defense.methods.tsbd import AUTO_RULES, NWC, TSBDParams, _diagnostics, purify_with, split_holdout
from defense.metrics import predict


def paired_drop(pred0: torch.Tensor, pred: torch.Tensor, y: torch.Tensor) -> dict:
    """Held-out clean accuracy of the original (``pred0``) and purified (``pred``) models on the
    same images, their difference and its paired standard error, and their agreement.

    The drop is estimated on the same images for both models, so its uncertainty comes from the
    discordant images only: with b = right before and wrong after, c = the reverse, over h images,
    drop = (b - c) / h and SE = sqrt(b + c - (b - c)^2 / h) / h (the standard error of a paired
    difference of proportions, the one behind McNemar's test)."""
    h = max(1, len(y))
    r0, r1 = pred0 == y, pred == y
    b, c = int((r0 & ~r1).sum()), int((~r0 & r1).sum())
    se = math.sqrt(max(0.0, b + c - (b - c) ** 2 / h)) / h
    return {"acc0": float(r0.float().mean()), "acc": float(r1.float().mean()), "drop": (b - c) / h,
            "se": se, "agree": float((pred0 == pred).float().mean()), "held_out": len(y)}


def within_budget(m: dict, budget: float, z: float) -> bool:
    """Keep an n unless the held-out data show its drop exceeds ``budget`` by more than ``z``
    standard errors: drop - z * SE <= budget. With 100 held-out images and ~10 discordant ones
    the SE is ~3 points, so a bare ``drop <= budget`` would reject or keep on noise."""
    return m["drop"] - z * m["se"] <= budget


def nwc_knee(nwc: NWC) -> float:
    """Share of neurons before the knee of the sorted NWC curve (the point farthest from the
    chord between its ends; Satopaa et al. 2011, "Kneedle"). A clean-only signal reported
    beside the ladder (README, TSBD, "n: auto"); it does not choose n."""
    v = torch.tensor(sorted((float(t) for s in nwc.neuron.values() for t in s.tolist()), reverse=True))
    if len(v) < 3 or float(v[0] - v[-1]) <= 0:
        return 0.0
    x = torch.linspace(0, 1, len(v))
    yn = (v - v[-1]) / (v[0] - v[-1])
    return float(x[int(torch.argmax((1 - x) - yn))])


def _order(ladder: tuple[float, ...], search: str):
    """Yield ladder indices to visit; ``send`` each visited index's verdict (True = keep)."""
    if search == "ascend":
        for i in range(len(ladder)):
            if not (yield i):
                return
        return
    lo, hi = -1, len(ladder)  # invariant: every index <= lo kept, every index >= hi broken
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (yield mid):
            lo = mid
        else:
            hi = mid


def defend_auto(model: nn.Module, clean: Data, p: TSBDParams, ctx: DefenseContext, prep: dict,
                nwc: NWC) -> DefenseOutput:
    """TSBD with n chosen on held-out clean data; the purified model of the chosen n."""
    stages_part, held = split_holdout(clean, p.holdout, ctx.seed)
    if held is None:
        raise ValueError(f"n: auto needs held-out clean data: holdout {p.holdout} of {len(clean)} images is none")
    ladder = tuple(sorted(set(float(v) for v in p.auto_ladder)))
    pred0 = predict(model, held).cpu()
    y = held.y.cpu()
    rungs, models = [], {}
    walk = _order(ladder, p.auto_search)
    i = next(walk, None)
    while i is not None:
        q = replace(p, n=ladder[i])
        net, counts, curve = purify_with(model, stages_part, nwc, q, ctx)
        m = paired_drop(pred0, predict(net, held).cpu(), y)
        ok = within_budget(m, p.auto_budget, p.auto_z)
        rungs.append({"n": ladder[i], **m, "within_budget": ok})
        ctx.log(f"tsbd auto n={ladder[i]}: held-out acc {m['acc']:.4f} (original {m['acc0']:.4f}, drop "
                f"{m['drop']:.4f} +- {m['se']:.4f}, agree {m['agree']:.4f}) {'keep' if ok else 'over budget'}")
        models[i] = (net, counts, curve)
        try:
            i = walk.send(ok)
        except StopIteration:
            i = None
    kept = [j for j, r in zip([ladder.index(r["n"]) for r in rungs], rungs) if r["within_budget"]]
    if kept:
        best = max(kept)
    else:  # even the smallest n breaks the budget: keep it (the least damage), and say so
        best = 0 if 0 in models else min(models)
        msg = (f"tsbd n: auto: no n of {list(ladder)} kept held-out clean accuracy within {p.auto_budget} "
               f"of the original's; using n={ladder[best]}")
        ctx.log(msg)
        warnings.warn(msg, stacklevel=2)
    net, counts, curve = models[best]
    chosen = ladder[best]
    for r in rungs:
        r["chosen"] = r["n"] == chosen
    diag = _diagnostics(prep, nwc, counts, curve, replace(p, n=chosen))
    diag.update({"chosen_n": chosen, "auto_ladder": sorted(rungs, key=lambda r: r["n"]),
                 "auto_within_budget": bool(kept), "auto_held_out": len(held), "nwc_knee_n": nwc_knee(nwc)})
    return DefenseOutput(net, diag, prep["curve"] + curve)


AUTO_RULES["n"] = defend_auto  # TSBD's defend() calls it for n: auto
