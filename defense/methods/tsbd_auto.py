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


TENSORS = ("pred", "ptrue")  # per-image signals: compared between rungs, not recorded


def within_budget(m: dict, budget: float, z: float, key: str = "", soft: bool = False) -> bool:
    """Keep an n unless the held-out data show its drop exceeds ``budget`` by more than ``z``
    standard errors: drop - z * SE <= budget. With 100 held-out images and ~10 discordant ones
    the SE is ~3 points, so a bare ``drop <= budget`` would reject or keep on noise. ``key``
    "_ft" reads the drop against the Stage-2-only model instead of the original; ``soft`` the
    drop of the true class's probability (``pdrop``, ``pse``) instead of accuracy's."""
    pre = "p" if soft else ""
    return m[pre + "drop" + key] - z * m[pre + "se" + key] <= budget


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


def soft_drop(p0: torch.Tensor, p1: torch.Tensor) -> tuple[float, float]:
    """Mean drop of the true class's probability from ``p0`` to ``p1`` (per image, same images)
    and its paired standard error. Unlike 0/1 accuracy it counts every image's change, not only
    the few that cross the decision boundary, so on 100 images its SE is a fraction of the
    accuracy drop's."""
    d = (p0 - p1).double()
    h = len(d)
    se = float(d.std(unbiased=True)) / math.sqrt(h) if h > 1 else 0.0
    return float(d.mean()) if h else 0.0, se


def rung_signals(view: dict, net: nn.Module, ref: dict | None = None) -> dict:
    """The held-out clean signals of one purified model: the paired drop from the original
    (``paired_drop``), with ``ref`` (the signals of the Stage-2-only model, n = 0) the same drop against it
    (``drop_ft``, ``se_ft``), the true-class probability (``pacc``) and its paired drop from the
    original and from ``ref`` (``pdrop``/``pse``, ``pdrop_ft``/``pse_ft``: ``soft_drop``), the mean
    entropy and top-1 confidence shift, the mean KL from the original's softmax, and the mean
    probability of the ``suspect`` class on images of other classes before (``sus0``) and after
    (``sus``). ``pred`` and ``ptrue`` are the purified model's predictions and true-class probabilities."""
    logits = _logits(net, view["data"])
    pred, y = logits.argmax(1), view["y"]
    m = paired_drop(view["pred0"], pred, y)
    lp0, lp = F.log_softmax(view["logits0"], 1), F.log_softmax(logits, 1)
    ptrue0, ptrue = lp0.exp().gather(1, y[:, None])[:, 0], lp.exp().gather(1, y[:, None])[:, 0]
    m["pdrop"], m["pse"] = soft_drop(ptrue0, ptrue)
    if ref is not None:
        r = paired_drop(ref["pred"], pred, y)
        m.update(drop_ft=r["drop"], se_ft=r["se"])
        if ref.get("ptrue") is not None:
            m["pdrop_ft"], m["pse_ft"] = soft_drop(ref["ptrue"], ptrue)
    other = y != view["suspect"]
    m.update(pacc=float(ptrue.mean()), pacc0=float(ptrue0.mean()),
             ent=float(_entropy(logits).mean()), ent0=float(_entropy(view["logits0"]).mean()),
             conf=float(lp.exp().max(1).values.mean()), conf0=float(lp0.exp().max(1).values.mean()),
             kl=float((lp0.exp() * (lp0 - lp)).sum(1).mean()),
             sus=float(lp.exp()[other, view["suspect"]].mean()) if other.any() else 0.0,
             sus0=float(lp0.exp()[other, view["suspect"]].mean()) if other.any() else 0.0, pred=pred, ptrue=ptrue)
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
    by ``compute(n, ref)`` (``ref``: the n = 0 rung's signals or None; a Stage 1c + 2 run in ``defend_auto``, a recorded row in the
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
            self._rungs[i] = self._compute(self.ns[i], self._ref)
            self.visited.append(self.ns[i])
        return self._rungs[i]

    def knee_index(self) -> int:
        """The smallest ladder value at or above the knee (the last one if none is)."""
        return next((i for i, n in enumerate(self.ns) if n >= self.knee), len(self.ns) - 1)


def _bisect(lad: Ladder, keep: Callable[[dict], bool], lo: int = -1, hi: int | None = None) -> int:
    """The largest index kept, assuming (as any early exit does) that a break stays broken as n
    grows: about log2(len) + 1 rungs. Indices <= ``lo`` are taken as kept and those >= ``hi`` as
    broken, without a run; -1 if none is kept."""
    hi = len(lad.ns) if hi is None else hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if keep(lad.rung(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def _agree_keeps(s: dict, p: TSBDParams) -> bool:
    d = 1 - s["agree"]
    return d - p.auto_z * math.sqrt(max(d * (1 - d), 1e-12) / s["held_out"]) <= 2 * p.auto_budget


# rule -> (what keeps a rung, measured against n = 0, at least the knee); "knee" keeps nothing
RULE_KEEPS: dict[str, tuple[Callable[[dict, TSBDParams], bool] | None, bool, bool]] = {
    # the held-out ACC drop from the original (the first version)
    "budget": (lambda s, p: within_budget(s, p.auto_budget, p.auto_z), False, False),
    # the same against the Stage-2-only model (n = 0, the same fine-tuning, nothing zeroed): the
    # held-out images are training images the original fitted and every fine-tuned model partly
    # forgets, whatever n is; this charges n only for the zeroing
    "budget_ft": (lambda s, p: within_budget(s, p.auto_budget, p.auto_z, "_ft"), True, False),
    # disagreement with the original, minus z binomial SE, <= 2 * auto_budget
    "agree": (_agree_keeps, False, False),
    # the NWC knee alone: no accuracy check, one Stage-2 run
    "knee": (None, False, True),
    "knee_budget": (lambda s, p: within_budget(s, p.auto_budget, p.auto_z, "_ft"), True, True),
    # the held-out true-class probability's drop from the original (soft_drop) within
    # auto_prob_budget: every image counts, not only those that cross the decision boundary
    "soft": (lambda s, p: within_budget(s, p.auto_prob_budget, p.auto_z, soft=True), False, False),
    "knee_soft": (lambda s, p: within_budget(s, p.auto_prob_budget, p.auto_z, soft=True), False, True),
}


# the rules whose budget is auto_prob_budget (the true-class probability); the rest read auto_budget
SOFT_RULES = ("soft", "knee_soft")


def _rule(name: str) -> Callable[[Ladder], int]:
    keep, against_ref, knee_floor = RULE_KEEPS[name]

    def rule(lad: Ladder) -> int:
        k = lad.knee_index() if knee_floor else -1
        if keep is None:
            lad.rung(k)
            return k
        if against_ref:
            lad.ref()
        kept = lambda s: keep(s, lad.p)  # noqa: E731
        i = _bisect(lad, kept, lo=k)
        c = lad.p.auto_knee_cap
        if c is not None and k >= 0 and i == k:  # nothing above the knee kept: is the knee within the cap?
            # (a rung kept above it vouches for it: drops grow with n)
            loose = replace(lad.p, auto_budget=c * lad.p.auto_budget, auto_prob_budget=c * lad.p.auto_prob_budget)
            if not keep(lad.rung(k), loose):  # past it: no floor, the largest kept below the knee
                i = _bisect(lad, kept, hi=k)
        return max(i, 0)
    rule.__name__ = rule.__qualname__ = f"rule_{name}"
    return rule


# A rule: a Ladder in, the chosen index out: at least the knee where it says so; above it, by
# bisection, the largest n its keep-predicate keeps
RULES: dict[str, Callable[[Ladder], int]] = {name: _rule(name) for name in RULE_KEEPS}


def choose(rule: str, rungs: list[dict], knee: float, p: TSBDParams, ref: dict | None = None) -> tuple[float, list[float]]:
    """Replay ``rule`` on recorded rungs (dicts of ``rung_signals`` with their ``n``; ``ref`` the
    n = 0 rung): (chosen n, n values the rule would have run). Rungs not recorded (the bench stops
    past a large drop) count as far over budget."""
    by_n = {r["n"]: r for r in rungs}
    far = {"drop": 1.0, "se": 0.0, "drop_ft": 1.0, "se_ft": 0.0, "pdrop": 1.0, "pse": 0.0, "pdrop_ft": 1.0,
           "pse_ft": 0.0, "agree": 0.0, "held_out": 1}
    lad = Ladder(p.auto_ladder, knee, p, lambda n, _ref: (ref or {"pred": None}) if n == 0.0 else by_n.get(n, far))
    i = RULES[rule](lad)
    return lad.ns[i], lad.visited


# ---------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------

def defend_auto(model: nn.Module, clean: Data, p: TSBDParams, ctx: DefenseContext, prep: dict,
                nwc: NWC) -> DefenseOutput:
    """TSBD with n chosen on held-out clean data by ``p.auto_rule``; the purified model of the chosen n."""
    stages_part, held = split_holdout(clean, p.held_share(), ctx.seed)
    if held is None:
        raise ValueError(f"n: auto needs held-out clean data: holdout {p.held_share()} of {len(clean)} images is none")
    view = held_out_view(model, held, prep)
    models = {}

    def compute(n: float, ref):
        net, counts, curve = purify_with(model, stages_part, nwc, replace(p, n=n), ctx)
        s = rung_signals(view, net, ref)
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
        row = {k: v for k, v in s.items() if k not in TENSORS}
        if n > 0:
            keep = RULE_KEEPS[p.auto_rule][0] or RULE_KEEPS["budget_ft" if "drop_ft" in s else "budget"][0]
            row["within_budget"] = keep(s, p)
        rows.append({"n": n, **row, "chosen": n == chosen})
    if not any(r.get("within_budget") for r in rows if r["n"] > 0) and p.auto_rule != "knee":
        what = (f"mean true-class probability within {p.auto_prob_budget}" if p.auto_rule in SOFT_RULES
                else f"clean accuracy within {p.auto_budget}")
        msg = (f"tsbd n: auto ({p.auto_rule}): no n of {list(ladder)} kept held-out {what} of the "
               f"reference's; using n={chosen}")
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
