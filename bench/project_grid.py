"""PROJECTED H100-hours for the full CIFAR-10 paper grid, from measured per-stage times.

Every number this prints is a projection (labelled PROJECTED), not a measurement.

The grid (issue 9): CIFAR-10, PreAct-ResNet18, 8 attacks x 3 poisoning rates x 3 seeds = 72
backdoored models; on each, TSBD and 8 baselines (648 defense runs); every model evaluated once.

Inputs are the JSON files of ``bench/train_speed.py`` and ``bench/tsbd_speed.py``; their stage
times are WALL seconds (``_common.Timer``), measured in separate runs.

- From a GPU run at CIFAR scale (PreAct-ResNet18, 50,000/10,000): the measured times are used as
  they are (on the GPU that ran them).
- From a CPU run (tiny_cnn, small synthetic): each stage's wall seconds are turned into
  *image-pass equivalents* (seconds x the measured training images/s of the same model and
  recipe, wall too), scaled linearly to CIFAR sizes (training set 50,000, defender set 2,500,
  test set 10,000), and divided by an H100 training throughput for PreAct-ResNet18
  (``--h100-img-s``, an ASSUMPTION, printed as such). Default 18,000 img/s: Myrtle's 18-layer
  ResNet trained 35 CIFAR-10 epochs in 297 s on one V100 in fp16 (myrtle.ai "How to Train Your
  ResNet", part 1: about 5,900 img/s), times about 3 for an H100 over a V100 on small convnets
  (our assumption; ``gpu_check.sh`` replaces it with a measurement). Evaluation is forward only,
  yet it is converted at the training rate: conservative.

Baselines: their measured times (``tsbd_speed.py --baselines ...``), each scaled by what its cost
grows with (``BASELINE_SCALE``): epochs over the defender's data scale with its size (FT, FP, NAD,
I-BAU, RNP, FT-SAM); ANP runs a fixed number of batches (2,000 x 256, BackdoorBench) whatever the
data size, so only the per-image rate changes; CLP reads weights only (scaled by the parameter
count, an upper bound). A baseline of ``BASELINES`` that was not measured is costed at the
LARGEST measured one: ``gpu_check.sh`` runs them cheapest first under a time cap, so the missing
ones are the expensive ones, and the mean would underestimate them.
NWC and zero reinitialisation work per weight: their seconds are scaled by the parameter count
ratio (PreAct-ResNet18 / the measured model), an upper bound.

Partial inputs (a ``partial`` flag in a JSON, a baseline not measured, no TSBD timing, or no
measured baseline at all): every per-stage projection is printed, the missing ones marked, and
NO grid total is printed or written (``totals`` is null), since any total would hide a guess.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import fmt_s

GRID = dict(attacks=8, rates=3, seeds=3, baselines=8)
BASELINES = ("ft", "fp", "nad", "anp", "clp", "ibau", "rnp", "ftsam")  # the grid's 8
# what each baseline's cost grows with; anything not named here: passes over the defender's data
BASELINE_SCALE = {"anp": "fixed_batches", "clp": "weights"}
CIFAR = dict(n_train=50_000, n_clean=2_500, n_test=10_000)


def _params(arch: str) -> int:
    from defense.models import count_params, create_model

    return count_params(create_model(arch))


def project(train: dict, tsbd: dict, h100_img_s: float = 18_000.0, tsbd_ns: int = 1,
            measured_baselines: dict | None = None, partial_inputs: tuple[str, ...] = ()) -> dict:
    """Per-stage seconds on one H100 for one model / one defense, and the grid total in hours
    (None when any input is partial: ``partial`` names why)."""
    runs = {r["label"]: r for r in train["runs"]}
    ours = tsbd["results"].get("ours", {}).get("times")
    partial = list(partial_inputs)
    on_gpu = train["machine"].startswith("GPU") and train["arch"] == "preact_resnet18"
    if on_gpu:
        conv = {"train_scale": 1.0, "clean_scale": 1.0, "test_scale": 1.0, "to_h100": 1.0, "param_scale": 1.0}
        how = f"measured wall times on {train['machine'].split(';')[0]} at CIFAR scale"
    else:
        ips = runs["fast"]["img_per_s_steady"]  # tiny model's CPU training rate: seconds -> image passes
        conv = {"train_scale": CIFAR["n_train"] / train["n_train"], "clean_scale": CIFAR["n_clean"] / tsbd["n_clean"],
                "test_scale": CIFAR["n_test"] / tsbd["n_test"], "to_h100": ips / h100_img_s,
                "param_scale": _params("preact_resnet18") / _params(train["arch"])}
        how = (f"CPU {train['arch']} wall times x {ips:.0f} img/s (measured) -> image passes, scaled to CIFAR "
               f"sizes, / {h100_img_s:.0f} img/s (ASSUMED H100 PreAct-ResNet18 rate)")
    k = conv["to_h100"]
    per = {
        "attack_fast": runs["fast"]["train_s"] * conv["train_scale"] * k,
        "attack_paper100": runs["paper"]["train_s"] / runs["paper"]["epochs"] * 100 * conv["train_scale"] * k,
    }
    if ours is None:
        partial.append("no TSBD timing (tsbd_speed ran without side 'ours')")
        tsbd_one = None
    else:
        per.update({
            "tsbd_unlearn": ours["unlearn"] * conv["clean_scale"] * k,
            # NWC and zero-reinit work per weight, not per image: scale by the parameter count
            "tsbd_nwc": ours["nwc"] * conv["param_scale"],
            "tsbd_zero_reinit": ours["zero_reinit"] * conv["param_scale"],
            "tsbd_finetune": ours["finetune"] * conv["clean_scale"] * k,
            "eval": ours["final_eval"] * conv["test_scale"] * k,
        })
        tsbd_one = per["tsbd_unlearn"] + per["tsbd_nwc"] + tsbd_ns * (per["tsbd_zero_reinit"] + per["tsbd_finetune"])

    def scaled(name: str, sec: float) -> float:
        kind = BASELINE_SCALE.get(name, "defender_data")
        if kind == "weights":
            return sec * conv["param_scale"]
        return sec * k * (1.0 if kind == "fixed_batches" else conv["clean_scale"])

    mb = measured_baselines or {}
    for name, b in mb.items():
        per[f"baseline_{name}"] = scaled(name, b["defend_s"])
    missing = [n for n in BASELINES if n not in mb]
    costed_missing = {}
    if mb and missing:
        largest = max(per[f"baseline_{n}"] for n in mb)
        costed_missing = {n: largest for n in missing}
        partial.append(f"baselines not measured: {', '.join(missing)} (each costed at the largest measured)")
    elif not mb:
        partial.append("no baseline measured")
    base_s = sum(per[f"baseline_{n}"] for n in mb if n in BASELINES) + sum(costed_missing.values()) if mb else None
    per["baselines_all"] = base_s
    models = GRID["attacks"] * GRID["rates"] * GRID["seeds"]
    defenses = 1 + len(BASELINES)
    parts_by_recipe = {}
    for recipe in ("fast", "paper100"):
        parts = {"attack training": models * per[f"attack_{recipe}"],
                 "TSBD": models * tsbd_one if tsbd_one is not None else None,
                 "baselines": models * base_s if base_s is not None else None,
                 "evaluation": models * (1 + defenses) * per["eval"] if "eval" in per else None}
        parts_by_recipe[recipe] = {n: (v / 3600 if v is not None else None) for n, v in parts.items()}
    totals = None if partial else {r: {"parts_h": ph, "hours": sum(ph.values())} for r, ph in parts_by_recipe.items()}
    return {"how": how, "per_stage_s": per, "tsbd_one_s": tsbd_one, "models": models,
            "defense_runs": models * defenses, "parts_h": parts_by_recipe, "totals": totals, "partial": partial,
            "costed_missing_s": costed_missing, "h100_img_s": h100_img_s, "h100_rate_assumed": not on_gpu,
            "tsbd_ns": tsbd_ns}


def report(p: dict) -> str:
    lines = [f"# projection: {p['how']}",
             f"# grid: {p['models']} backdoored models, {p['defense_runs']} defense runs "
             f"(TSBD with {p['tsbd_ns']} n value(s) + {len(BASELINES)} baselines)",
             "PROJECTED per-stage seconds on one H100, one model / one defense:"]
    for k, v in p["per_stage_s"].items():
        lines.append(f"  {k:18s} {fmt_s(v):>9s}")
    for n, v in p["costed_missing_s"].items():
        lines.append(f"  baseline_{n:9s} {fmt_s(v):>9s}  (NOT MEASURED: costed at the largest measured baseline)")
    for recipe, ph in p["parts_h"].items():
        parts = ", ".join(f"{n} {'?' if h is None else format(h, '.2f') + 'h'}" for n, h in ph.items())
        if p["totals"] is None:
            lines.append(f"PROJECTED parts, attack recipe {recipe}: {parts}; NO TOTAL: inputs partial")
        else:
            t = p["totals"][recipe]
            top = max(t["parts_h"], key=t["parts_h"].get)
            lines.append(f"PROJECTED H100-hours, attack recipe {recipe}: {t['hours']:.2f} h ({parts}); "
                         f"dominated by {top}")
    for why in p["partial"]:
        lines.append(f"PARTIAL INPUT: {why}")
    if p["h100_rate_assumed"]:
        lines.append(f"ASSUMED: H100 PreAct-ResNet18 training rate {p['h100_img_s']:.0f} img/s (--h100-img-s)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train_json")
    ap.add_argument("tsbd_json")
    ap.add_argument("--h100-img-s", type=float, default=18_000.0, help="ASSUMED H100 training rate for CPU inputs")
    ap.add_argument("--tsbd-ns", type=int, default=1, help="neuron ratios per TSBD run (11 = the reference sweep)")
    ap.add_argument("--baselines-json", default=None,
                    help="a tsbd_speed --baselines JSON with measured baseline times (default: those in tsbd_json)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    tsbd = json.loads(Path(a.tsbd_json).read_text())
    partial = []
    if tsbd.get("partial"):
        partial.append(f"{a.tsbd_json} is marked partial (its run was stopped)")
    if a.baselines_json:
        bj = json.loads(Path(a.baselines_json).read_text())
        mb = bj.get("baselines") or {}
        if bj.get("partial"):
            partial.append(f"{a.baselines_json} is marked partial (its run was stopped)")
    else:
        mb = tsbd.get("baselines") or {}
    p = project(json.loads(Path(a.train_json).read_text()), tsbd, a.h100_img_s, a.tsbd_ns, mb, tuple(partial))
    print(report(p))
    if a.json:
        Path(a.json).write_text(json.dumps(p, indent=1))
    return p


if __name__ == "__main__":
    main()
