"""Measurements behind the TSBD numbers in README (section tsbd) and the thresholds of
tests/test_tsbd_e2e.py and tests/test_tsbd_auto.py. Not a test (pytest does not collect it).

    PYTHONPATH=. python tests/measure_tsbd.py spread badnets,blended 0,1,2,3 1 0.2,0.3,0.4
    PYTHONPATH=. python tests/measure_tsbd.py collapse badnets 100 0.3
    PYTHONPATH=. python tests/measure_tsbd.py ladder badnets fixture 0
    PYTHONPATH=. python tests/measure_tsbd.py auto blended,badnets fixture 0,1 0.2

Models: tiny_cnn, synthetic, 10% poisoning, `fast` recipe 12 epochs, seed 0; "fixture" = the
test fixtures' 4,000/1,000 images (defender ratio 0.125), "readme" = the default 10,000/2,000
(defender ratio 0.05); both give 500 defender images. Trained once and cached (state_dict,
loaded with weights_only=True) under $BDGRID_MEASURE (default /tmp/bdgrid-measure). One JSON
line per measurement on stdout; CPU times are process CPU seconds.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from defense.data import load_dataset
from defense.data.splits import defender_subset, val_test_indices
from defense.methods import DefenseContext, run_defense
from defense.methods.tsbd import NWC, TSBDParams, defend, purify_with, split_holdout, tsbd_prepare
from defense.methods.tsbd_auto import nwc_knee, paired_drop, within_budget
from defense.metrics import predict
from defense.models import create_model
from defense.trial import TrialConfig, evaluate, make_poisoned, train_backdoored

SETTINGS = {"fixture": dict(n_train=4000, n_test=1000), "readme": dict(n_train=10000, n_test=2000)}
RATIO = {"fixture": 0.125, "readme": 0.05}  # both: 500 defender images
LADDER = TSBDParams().auto_ladder


def say(**row) -> None:
    print(json.dumps(row, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)), flush=True)


def model_for(attack: str, setting: str) -> dict:
    cfg = TrialConfig(attack=attack, seed=0, pratio=0.1, epochs=12, dataset_params=SETTINGS[setting], device="cpu")
    train, test = load_dataset("synthetic", **SETTINGS[setting])
    poisoned = make_poisoned(cfg, train, test)
    path = Path(os.environ.get("BDGRID_MEASURE", "/tmp/bdgrid-measure")) / f"model_{attack}_{setting}_0.pt"
    if path.exists():
        model = create_model("tiny_cnn", train.info.num_classes, train.info.channels, train.info.size)
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        model, _ = train_backdoored(cfg, poisoned)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.eval()
    val_idx, test_idx = val_test_indices(len(test), 0.2, seed=0)
    ev = lambda m, idx: evaluate(m, test, poisoned, idx, cfg.target, "cpu")  # noqa: E731
    return dict(model=model, train=train, val=lambda m: ev(m, val_idx), test=lambda m: ev(m, test_idx))


def dc(d: dict, setting: str, seed: int):
    return defender_subset(d["train"], RATIO[setting], seed)[0]


def spread(attacks, seeds, threads, ns):
    """tests/test_tsbd_e2e.py's quantities per defender seed and thread count, for every n."""
    for atk in attacks.split(","):
        d = model_for(atk, "fixture")
        say(attack=atk, before_val=d["val"](d["model"]), before_test=d["test"](d["model"]))
        for seed in map(int, seeds.split(",")):
            for th in map(int, threads.split(",")):
                torch.set_num_threads(th)
                clean, p, ctx = dc(d, "fixture", seed), TSBDParams(n=0.1, un_threshold=0.2), DefenseContext(seed=seed)
                t0 = time.process_time()
                prep = tsbd_prepare(d["model"], clean, p, ctx)
                tp = time.process_time() - t0
                for n in map(float, ns.split(",")):
                    t1 = time.process_time()
                    out = defend(d["model"], clean, replace(p, n=n), replace(ctx, prepared=prep))
                    v, t = d["val"](out.model), d["test"](out.model)
                    say(attack=atk, seed=seed, threads=th, n=n, ue=prep["unlearn_epochs"], val_acc=v["acc"],
                        val_asr=v["asr"], test_acc=t["acc"], test_asr=t["asr"], cpu_prep=tp,
                        cpu_ft=time.process_time() - t1)


def collapse(attack, extra, ns):
    """Stage 1a with the collapse stop (reference threshold 0.10) against running on ``extra``
    epochs past it (collapse_epochs=0): stop-check accuracy, NWC top-k overlap, ASR/ACC after."""
    torch.set_num_threads(1)
    d = model_for(attack, "readme")
    m, clean, ctx, p = d["model"], dc(d, "readme", 0), DefenseContext(seed=0), TSBDParams(n=0.1)
    say(attack=attack, before_test=d["test"](m))
    t0 = time.process_time()
    a = tsbd_prepare(m, clean, p, ctx)
    E = a["unlearn_epochs"]
    say(stop=E, collapsed=a["unlearn_collapsed"], share=a["dc_class_share"], cpu=time.process_time() - t0,
        first_one_class_epoch=next((r["epoch"] for r in a["curve"] if r["collapsed"]), None))
    pr = replace(p, collapse_epochs=0, max_un_epochs=E + int(extra))
    t0 = time.process_time()
    b = tsbd_prepare(m, clean, pr, ctx)
    after = b["curve"][E:]
    say(ran=len(b["curve"]), cpu=time.process_time() - t0, left_collapse=[r["epoch"] for r in after if not r["collapsed"]],
        acc_after_stop=sorted({r["dc_acc"] for r in after}),
        prefix_equal=[r["dc_acc"] for r in b["curve"][:E]] == [r["dc_acc"] for r in a["curve"]])
    na, nb = NWC.from_dict(a["nwc"]), NWC.from_dict(b["nwc"])
    for n in LADDER:
        k = int(na.total * n)
        say(n=n, k=k, top_k_overlap=len(set(na.ranking[:k]) & set(nb.ranking[:k])) / max(1, k))
    for n in map(float, ns.split(",")):
        for which, prep, pp in (("stop", a, p), ("run_on", b, pr)):
            t = d["test"](defend(m, clean, replace(pp, n=n), replace(ctx, prepared=prep)).model)
            say(n=n, which=which, test_acc=t["acc"], test_asr=t["asr"])


def ladder(attacks, setting, seeds):
    """Every rung of n: auto's ladder (ascending; stops two rungs past the ACC rule's first
    break): the held-out signals beside val/test ACC and ASR, CPU per rung."""
    torch.set_num_threads(1)
    for atk in attacks.split(","):
        d = model_for(atk, setting)
        m = d["model"]
        say(attack=atk, setting=setting, before_val=d["val"](m), before_test=d["test"](m))
        for seed in map(int, seeds.split(",")):
            clean, p, ctx = dc(d, setting, seed), TSBDParams(n="auto", un_threshold=0.2), DefenseContext(seed=seed)
            t0 = time.process_time()
            prep = tsbd_prepare(m, clean, p, ctx)
            nwc = NWC.from_dict(prep["nwc"], p.nwc_decimals)
            part, held = split_holdout(clean, p.held_share(), seed)
            pred0 = predict(m, held)
            say(attack=atk, seed=seed, cpu_prep=time.process_time() - t0, ue=prep["unlearn_epochs"], knee=nwc_knee(nwc))
            broke = 0
            for n in LADDER:
                t1 = time.process_time()
                net = purify_with(m, part, nwc, replace(p, n=n), ctx)[0]
                r = paired_drop(pred0, predict(net, held), held.y)
                v, t = d["val"](net), d["test"](net)
                ok = within_budget(r, p.auto_budget, p.auto_z)
                say(attack=atk, seed=seed, n=n, **r, ok=ok, val_acc=v["acc"], val_asr=v["asr"], test_acc=t["acc"],
                    test_asr=t["asr"], cpu_rung=time.process_time() - t1)
                broke += not ok
                if broke >= 2:
                    break


def reference(attacks, setting, seeds, ns):
    """The held-out drop against the original model and against a Stage-2-only model (n = 0: no
    zeroing, the same fine-tuning): the held-out images are training images the original model
    fitted, which the fine-tuned models partly forget whatever n is."""
    torch.set_num_threads(1)
    for atk in attacks.split(","):
        d = model_for(atk, setting)
        m = d["model"]
        for seed in map(int, seeds.split(",")):
            clean, p, ctx = dc(d, setting, seed), TSBDParams(n="auto", un_threshold=0.2), DefenseContext(seed=seed)
            prep = tsbd_prepare(m, clean, p, ctx)
            nwc = NWC.from_dict(prep["nwc"], p.nwc_decimals)
            part, held = split_holdout(clean, p.held_share(), seed)
            pred0 = predict(m, held)
            ft0 = purify_with(m, part, nwc, replace(p, n=0.0), ctx)[0]
            predf = predict(ft0, held)
            t = d["test"](ft0)
            say(attack=atk, seed=seed, n=0.0, original=paired_drop(pred0, predf, held.y), test_acc=t["acc"], test_asr=t["asr"])
            for n in map(float, ns.split(",")):
                net = purify_with(m, part, nwc, replace(p, n=n), ctx)[0]
                pr, t = predict(net, held), d["test"](net)
                say(attack=atk, seed=seed, n=n, original=paired_drop(pred0, pr, held.y),
                    finetuned=paired_drop(predf, pr, held.y), test_acc=t["acc"], test_asr=t["asr"])


def auto(attacks, setting, seeds, fixed):
    """n: auto through the registry (the grid's path) against one fixed-n run on all of Dc:
    test ACC/ASR and CPU time, the two sides alternating from seed to seed."""
    torch.set_num_threads(1)
    for atk in attacks.split(","):
        d = model_for(atk, setting)
        m, b = d["model"], d["test"](d["model"])
        for i, seed in enumerate(map(int, seeds.split(","))):
            sides = [("auto", {"n": "auto", "un_threshold": 0.2}), ("fixed", {"n": float(fixed), "un_threshold": 0.2})]
            for name, params in sides[::-1] if i % 2 else sides:
                t0, w0 = time.process_time(), time.perf_counter()
                out = run_defense("tsbd", m, dc(d, setting, seed), params, DefenseContext(seed=seed))
                cpu, wall = time.process_time() - t0, time.perf_counter() - w0
                t, g = d["test"](out.model), out.diagnostics
                say(attack=atk, seed=seed, side=name, chosen_n=g["chosen_n"], cpu=cpu, wall=wall, before_acc=b["acc"],
                    before_asr=b["asr"], test_acc=t["acc"], test_asr=t["asr"], ue=g["unlearn_epochs"],
                    ladder=[(r["n"], r["acc"], r["drop"], r["se"], r["agree"], r["within_budget"])
                            for r in g.get("auto_ladder", [])], knee=g.get("nwc_knee_n"))


if __name__ == "__main__":
    {"spread": spread, "collapse": collapse, "ladder": ladder, "reference": reference, "auto": auto}[sys.argv[1]](*sys.argv[2:])
