"""Choosing the tuned parameters with the uncertainty in view, and best.yaml (what a grid spec's
``params_from`` reads).

Validation metrics are binomial proportions over a finite split (20% of a 360-image test set is
72 images). Each trial's ACC, ASR and RA carry a Wilson score interval at ``tune.confidence``
(pooled over the trial's cells), and the choice is made on the pessimistic ends: a trial fits
``max_acc_drop`` when the drop's upper bound (the backdoored model's ACC minus the lower bound of
the trial's) fits, and the Pareto front is ranked by the pessimistic value of ``select`` (DER from
the lower ACC bound and the upper ASR bound). When the chosen trial's interval overlaps the
runner-up's, the split cannot tell them apart, and the warning says how many validation images
would.

Sources: Wilson, "Probable inference, the law of succession, and statistical inference" (JASA
1927); the normal-approximation sample size for two proportions (Fleiss, Statistical Methods for
Rates and Proportions, ch. 4).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from statistics import NormalDist
from typing import Any

from grid.tune.space import DIRECTIONS, TuneBlock


def wilson(p: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    if not n or p != p:  # no images, or NaN (no backdoor image in the split)
        return (float("nan"), float("nan"))
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def n_to_separate(p1: float, p2: float, confidence: float = 0.95) -> int | None:
    """Images needed for intervals of this half-width to separate ``p1`` from ``p2``."""
    d = abs(p1 - p2)
    if d < 1e-9:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return math.ceil(z * z * (math.sqrt(p1 * (1 - p1)) + math.sqrt(p2 * (1 - p2))) ** 2 / (d * d))


def trial_stats(per_cell: list[dict], confidence: float) -> dict:
    """Means over the trial's cells (the objectives) and pooled intervals, from the eval rows."""
    out: dict[str, Any] = {}
    for m, n_key in (("acc", "n_clean"), ("asr", "n_bd"), ("ra", "n_bd"), ("der", None),
                     ("bd_acc", "n_clean"), ("bd_asr", "n_bd")):
        vals = [float(r[m]) for r in per_cell]
        out[m] = sum(vals) / len(vals)
        if n_key:
            ns = [int(r.get(n_key) or 0) for r in per_cell]
            n = sum(ns)
            pooled = sum(v * k for v, k in zip(vals, ns)) / n if n else float("nan")
            out[f"{m}_n"] = n
            out[f"{m}_lo"], out[f"{m}_hi"] = wilson(pooled, n, confidence)
    out["acc_drop"] = out["bd_acc"] - out["acc"]
    # the backdoored model's ACC is measured on the same images: only the trial's ACC varies
    out["acc_drop_hi"] = out["bd_acc"] - out["acc_lo"]
    out["der_lo"] = (max(0.0, out["bd_asr"] - out["asr_hi"]) - max(0.0, out["bd_acc"] - out["acc_lo"]) + 1) / 2
    return out


def _pessimistic(t, select: str) -> float:
    st = t.user_attrs.get("stats", {})
    if select == "der":
        return st.get("der_lo", st.get("der", 0.0))
    if select == "asr":
        return -st.get("asr_hi", st.get("asr", 1.0))
    return st.get(f"{select}_lo", st.get(select, 0.0))


def pick_best(t: TuneBlock, study) -> tuple[Any, list, list[str]]:
    """(chosen trial, Pareto trials, warnings)."""
    from optuna.trial import TrialState

    warn: list[str] = []
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise ValueError(f"study '{study.study_name}' has no complete trial yet")
    front = study.best_trials if len(t.objectives) > 1 else done
    pool = front
    if t.max_acc_drop is not None:
        ok = [x for x in front if x.user_attrs.get("stats", {}).get("acc_drop_hi", 1.0) <= t.max_acc_drop + 1e-9]
        if not ok:  # off the front too: any complete trial that fits the budget beats one that breaks it
            ok = [x for x in done if x.user_attrs.get("stats", {}).get("acc_drop_hi", 1.0) <= t.max_acc_drop + 1e-9]
        pool = ok or front
    ranked = sorted(pool, key=lambda x: (_pessimistic(x, t.select), -x.number), reverse=True)
    best = ranked[0]
    st = best.user_attrs.get("stats", {})
    budget = t.max_acc_drop
    if budget is not None and st.get("acc_drop_hi", 0.0) > budget + 1e-9:
        warn.append(f"no trial keeps validation ACC within {100 * budget:.1f} points of the backdoored model's at "
                    f"{100 * t.confidence:.0f}% confidence; chose trial {best.number} anyway: ACC drop "
                    f"{100 * st.get('acc_drop', 0):.1f} points (up to {100 * st.get('acc_drop_hi', 0):.1f})")
    elif budget is None and st.get("acc_drop", 0.0) > 0.05:
        warn.append(f"the chosen trial {best.number} loses {100 * st['acc_drop']:.1f} points of validation ACC "
                    f"(up to {100 * st.get('acc_drop_hi', 0):.1f}); set tune.max_acc_drop to bound it")
    if len(ranked) > 1:
        other = ranked[1]
        so = other.user_attrs.get("stats", {})
        overlap = [m for m in ("acc", "asr") if m in st and m in so and not (
            st[f"{m}_hi"] < so[f"{m}_lo"] or so[f"{m}_hi"] < st[f"{m}_lo"])]
        if len(overlap) == 2:
            need = [n_to_separate(st[m], so[m], t.confidence) for m in ("acc", "asr")]
            need = [n for n in need if n]
            have = st.get("acc_n", 0)
            warn.append(f"the validation split ({have} images) cannot tell the chosen trial {best.number} from "
                        f"trial {other.number}: their ACC and ASR intervals overlap"
                        + (f"; about {min(need)} validation images would separate them" if need else ""))
    return best, front, warn


def best_doc(t: TuneBlock, study, study_name: str, storage: str, tuned_on: list[str]) -> dict:
    best, front, warn = pick_best(t, study)
    st = best.user_attrs.get("stats", {})
    ci = {m: [round(st[f"{m}_lo"], 6), round(st[f"{m}_hi"], 6)] for m in ("acc", "asr", "ra") if f"{m}_lo" in st}
    return {
        "defense": t.defense,
        "params": {**t.params, **best.params},
        "tuned_on": tuned_on,
        "study": study_name,
        "storage": storage,
        "objectives": {o: DIRECTIONS[o] for o in t.objectives},
        "trial": best.number,
        "values": dict(zip(t.objectives, best.values)),
        "interval": {"confidence": t.confidence, **ci, "n_images": st.get("acc_n")},
        "acc_drop": round(st.get("acc_drop", 0.0), 6),
        "acc_drop_upper": round(st.get("acc_drop_hi", 0.0), 6),
        "max_acc_drop": t.max_acc_drop,
        "split": "val",
        "warnings": warn,
        "pareto": [{"trial": x.number, "params": {**t.params, **x.params},
                    "values": dict(zip(t.objectives, x.values))} for x in front],
    }


def write_best(doc: dict, path: Path) -> Path:
    """best.yaml: what a grid spec reads with ``params_from: <file>`` (keys defense, params)."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("# written by `bdgrid tune`; chosen on the validation split\n"
                   + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    os.replace(tmp, path)
    return path
