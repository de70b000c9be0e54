"""TSBD with ``n: auto``: the neuron ratio chosen from clean data alone (ours, issue 20).

The reference (GitHub ``linweiii/TSBD``) runs Stage 2 for each n of its sweep
{0.01, 0.05, 0.1, ..., 0.9} and chooses none; choosing on the validation split reads the
backdoor images, which a real defender does not have. Here:

1. A seeded share ``holdout`` of Dc is held out (``tsbd.split_holdout``); Stages 1a, 1b and 2
   never see it (``tsbd_prepare`` and ``defend`` split Dc the same way).
2. Stages 1a/1b once (``ctx.prepared``), then Stages 1c + 2 for the ladder values a rule asks for
   (``auto_ladder``); each purified model is scored on the held-out images (``rung_signals``).
3. The rule ``auto_rule`` (one of ``RULES``) picks the n. A rule is a plain function of a
   ``Ladder`` (the ladder values, the NWC knee, and a lazily computed rung per value), so the
   bench (bench/tsbd_auto_table.py) replays the same rule on recorded rungs.

The rules read only the model, Dc and the parameters: no poisoned image, index or target.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.data import Data
from defense.data.augment import normalize
from defense.methods import DefenseContext, DefenseOutput
from defense.methods.tsbd import AUTO_RULES, NWC, TSBDParams, _diagnostics, purify_with, split_holdout


# ---------------------------------------------------------------------------------------
# Held-out signals
# ---------------------------------------------------------------------------------------

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


def within_budget(m: dict, budget: float, z: float, key: str = "") -> bool:
    """Keep an n unless the held-out data show its drop exceeds ``budget`` by more than ``z``
    standard errors: drop - z * SE <= budget. With 100 held-out images and ~10 discordant ones
    the SE is ~3 points, so a bare ``drop <= budget`` would reject or keep on noise. ``key``
    "_ft" reads the drop against the Stage-2-only model instead of the original."""
    return m["drop" + key] - z * m["se" + key] <= budget


@torch.no_grad()
def _logits(model: nn.Module, data: Data) -> torch.Tensor:
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = torch.cat([model(normalize(data.x[i:i + 512].to(dev), data.info)).float().cpu()
                     for i in range(0, len(data), 512)])
    model.train(was)
    return out


def held_out_view(model: nn.Module, held: Data, prep: dict) -> dict:
    """What every rung is compared with: the original model's logits on the held-out images, their
    labels, and the class the clean-unlearned model (Stage 1a) predicts most on them (``suspect``:
    unlearning tends to fall onto the backdoor target; a clean-only guess, never checked here)."""
    unlearned = copy.deepcopy(model)
    unlearned.load_state_dict(prep["unlearned"])
    pu = _logits(unlearned, held).argmax(1)
    logits0 = _logits(model, held)
    return {"y": held.y.cpu(), "logits0": logits0, "pred0": logits0.argmax(1),
            "suspect": int(torch.bincount(pu, minlength=logits0.shape[1]).argmax()), "data": held}


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    lp = F.log_softmax(logits, 1)
    return -(lp.exp() * lp).sum(1)


def rung_signals(view: dict, net: nn.Module, ref_pred: torch.Tensor | None = None) -> dict:
    """The held-out clean signals of one purified model: the paired drop from the original
    (``paired_drop``), with ``ref_pred`` (the Stage-2-only model, n = 0) the same drop against it
    (``drop_ft``, ``se_ft``), the mean entropy and top-1 confidence shift, the mean KL from the
    original's softmax, and the mean probability of the ``suspect`` class on images of other
    classes before (``sus0``) and after (``sus``). ``pred`` is the purified model's predictions."""
    logits = _logits(net, view["data"])
    pred, y = logits.argmax(1), view["y"]
    m = paired_drop(view["pred0"], pred, y)
    if ref_pred is not None:
        r = paired_drop(ref_pred, pred, y)
        m.update(drop_ft=r["drop"], se_ft=r["se"])
    lp0, lp = F.log_softmax(view["logits0"], 1), F.log_softmax(logits, 1)
    other = y != view["suspect"]
    m.update(ent=float(_entropy(logits).mean()), ent0=float(_entropy(view["logits0"]).mean()),
             conf=float(lp.exp().max(1).values.mean()), conf0=float(lp0.exp().max(1).values.mean()),
             kl=float((lp0.exp() * (lp0 - lp)).sum(1).mean()),
             sus=float(lp.exp()[other, view["suspect"]].mean()) if other.any() else 0.0,
             sus0=float(lp0.exp()[other, view["suspect"]].mean()) if other.any() else 0.0, pred=pred)
    return m


def nwc_knee(nwc: NWC) -> float:
    """Share of neurons before the knee of the sorted NWC curve (the point farthest from the
    chord between its ends; Satopaa et al. 2011, "Kneedle")."""
    v = torch.tensor(sorted((float(t) for s in nwc.neuron.values() for t in s.tolist()), reverse=True))
    if len(v) < 3 or float(v[0] - v[-1]) <= 0:
        return 0.0
    x = torch.linspace(0, 1, len(v))
    yn = (v - v[-1]) / (v[0] - v[-1])
    return float(x[int(torch.argmax((1 - x) - yn))])


# ---------------------------------------------------------------------------------------
# Rules: a Ladder in, a ladder index out
# ---------------------------------------------------------------------------------------

class Ladder:
    """The ladder values ``ns`` (ascending), the NWC ``knee``, the parameters ``p``, and
    ``rung(i)`` / ``ref()``: the held-out signals of n = ns[i] / of n = 0, computed on first use
    by ``compute(n, ref_pred)`` (a Stage 1c + 2 run in ``defend_auto``, a recorded row in the
    bench). ``visited`` lists the n values computed, in order."""

    def __init__(self, ns, knee: float, p: TSBDParams, compute: Callable):
        self.ns, self.knee, self.p, self._compute = tuple(ns), knee, p, compute
        self._rungs: dict = {}
        self._ref = None
        self.visited: list[float] = []

    def ref(self) -> dict:
        if self._ref is None:
            self._ref = self._compute(0.0, None)
            self.visited.append(0.0)
        return self._ref

    def rung(self, i: int) -> dict:
        if i not in self._rungs:
            self._rungs[i] = self._compute(self.ns[i], self._ref.get("pred") if self._ref else None)
            self.visited.append(self.ns[i])
        return self._rungs[i]

    def knee_index(self) -> int:
        """The smallest ladder value at or above the knee (the last one if none is)."""
        return next((i for i, n in enumerate(self.ns) if n >= self.knee), len(self.ns) - 1)


def _bisect(lad: Ladder, keep: Callable[[dict], bool], lo: int = -1) -> int:
    """The largest index kept, assuming (as any early exit does) that a break stays broken as n
    grows: about log2(len) + 1 rungs. Indices <= ``lo`` are taken as kept without a run; -1 if
    none is kept."""
    hi = len(lad.ns)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if keep(lad.rung(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def rule_budget(lad: Ladder) -> int:
    """Largest n whose held-out ACC drop from the original is within ``auto_budget`` (+ ``auto_z`` SE)."""
    p = lad.p
    return max(0, _bisect(lad, lambda s: within_budget(s, p.auto_budget, p.auto_z)))


def rule_budget_ft(lad: Ladder) -> int:
    """As ``budget``, the drop measured against the Stage-2-only model (n = 0, the same fine-tuning,
    nothing zeroed; one more rung): the held-out images are training images the original fitted
    and every fine-tuned model partly forgets, whatever n is; this charges n only for the zeroing."""
    p = lad.p
    lad.ref()
    return max(0, _bisect(lad, lambda s: within_budget(s, p.auto_budget, p.auto_z, "_ft")))


def rule_agree(lad: Ladder) -> int:
    """Largest n whose disagreement with the original, minus one binomial SE, is <= 2 * auto_budget."""
    def keep(s):
        d = 1 - s["agree"]
        return d - lad.p.auto_z * math.sqrt(max(d * (1 - d), 1e-12) / s["held_out"]) <= 2 * lad.p.auto_budget
    return max(0, _bisect(lad, keep))


def rule_knee(lad: Ladder) -> int:
    """The NWC knee alone: no accuracy check, one Stage-2 run."""
    i = lad.knee_index()
    lad.rung(i)
    return i


def rule_knee_budget(lad: Ladder) -> int:
    """At least the knee; above it, the largest n within the budget against the Stage-2-only model."""
    p, k = lad.p, lad.knee_index()
    lad.ref()
    return max(k, _bisect(lad, lambda s: within_budget(s, p.auto_budget, p.auto_z, "_ft"), lo=k))


RULES: dict[str, Callable[[Ladder], int]] = {
    "budget": rule_budget, "budget_ft": rule_budget_ft, "agree": rule_agree,
    "knee": rule_knee, "knee_budget": rule_knee_budget,
}


def choose(rule: str, rungs: list[dict], knee: float, p: TSBDParams, ref: dict | None = None) -> tuple[float, list[float]]:
    """Replay ``rule`` on recorded rungs (dicts of ``rung_signals`` with their ``n``; ``ref`` the
    n = 0 rung): (chosen n, n values the rule would have run). Rungs not recorded (the bench stops
    past a large drop) count as far over budget."""
    by_n = {r["n"]: r for r in rungs}
    far = {"drop": 1.0, "se": 0.0, "drop_ft": 1.0, "se_ft": 0.0, "agree": 0.0, "held_out": 1}
    lad = Ladder(p.auto_ladder, knee, p, lambda n, _ref: (ref or {"pred": None}) if n == 0.0 else by_n.get(n, far))
    i = RULES[rule](lad)
    return lad.ns[i], lad.visited


# ---------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------

def defend_auto(model: nn.Module, clean: Data, p: TSBDParams, ctx: DefenseContext, prep: dict,
                nwc: NWC) -> DefenseOutput:
    """TSBD with n chosen on held-out clean data by ``p.auto_rule``; the purified model of the chosen n."""
    stages_part, held = split_holdout(clean, p.holdout, ctx.seed)
    if held is None:
        raise ValueError(f"n: auto needs held-out clean data: holdout {p.holdout} of {len(clean)} images is none")
    view = held_out_view(model, held, prep)
    models = {}

    def compute(n: float, ref_pred):
        net, counts, curve = purify_with(model, stages_part, nwc, replace(p, n=n), ctx)
        s = rung_signals(view, net, ref_pred)
        models[n] = (net, counts, curve)
        ft = f", against n=0 {s['drop_ft']:.4f} +- {s['se_ft']:.4f}" if "drop_ft" in s else ""
        ctx.log(f"tsbd auto n={n}: held-out acc {s['acc']:.4f} (original {s['acc0']:.4f}, drop "
                f"{s['drop']:.4f} +- {s['se']:.4f}{ft}, agree {s['agree']:.4f})")
        return s

    ladder = tuple(sorted(set(float(v) for v in p.auto_ladder)))
    lad = Ladder(ladder, nwc_knee(nwc), p, compute)
    chosen = ladder[RULES[p.auto_rule](lad)]
    lad.rung(ladder.index(chosen))  # a rule may choose a rung it did not run (e.g. below its floor)
    rows = []
    for n in sorted(lad.visited):
        s = lad.ref() if n == 0.0 else lad.rung(ladder.index(n))
        row = {k: v for k, v in s.items() if k != "pred"}
        if n > 0:
            row["within_budget"] = within_budget(s, p.auto_budget, p.auto_z, "_ft" if "drop_ft" in s else "")
        rows.append({"n": n, **row, "chosen": n == chosen})
    if not any(r.get("within_budget") for r in rows if r["n"] > 0) and p.auto_rule != "knee":
        msg = (f"tsbd n: auto ({p.auto_rule}): no n of {list(ladder)} kept held-out clean accuracy within "
               f"{p.auto_budget} of the reference's; using n={chosen}")
        ctx.log(msg)
        warnings.warn(msg, stacklevel=2)
    net, counts, curve = models[chosen]
    diag = _diagnostics(prep, nwc, counts, curve, replace(p, n=chosen))
    diag.update({"chosen_n": chosen, "auto_rule": p.auto_rule, "auto_ladder": rows,
                 "auto_within_budget": any(r.get("within_budget") and r["chosen"] for r in rows),
                 "auto_held_out": len(held), "auto_suspect_class": view["suspect"], "nwc_knee_n": lad.knee})
    return DefenseOutput(net, diag, prep["curve"] + curve)


AUTO_RULES["n"] = defend_auto  # TSBD's defend() calls it for n: auto
AUTO_RULES["rules"] = RULES  # and TSBDParams.check reads the rule names here (tsbd imports nothing of this module)
