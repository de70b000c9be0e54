"""TSBD ``n: auto`` against fixed n = 0.1, the validation oracle and FT, over the built-in attacks
(issue 20; README section tsbd, "n: auto"). Not a speed ratio: a table of ACC/ASR after.

Per (dataset, attack, defender seed) it records, in one process, on the same backdoored model:
- ``fixed``: TSBD n = 0.1 on all of Dc (the reference-faithful path, holdout 0);
- ``ft``: FT at its defaults (the floor);
- the whole ladder of TSBD with a held-out 20% of Dc (Stages 1a/1b once; Stages 1c + 2 for n = 0
  and every ``auto_ladder`` value, ascending, until the held-out drop and the validation drop both
  can be kept by the oracle or a budget rule): per rung the held-out clean signals (``tsbd_auto.rung_signals``) beside
  validation and test ACC/ASR.
``auto`` (every rule of ``tsbd_auto.RULES``) and the ``oracle`` (the rung with the lowest
validation ASR among those within 5 validation ACC points of the original; ties: smaller n) are
read off the recorded ladder: the rung models do not depend on the order they are visited in, so a
rule's choice equals what ``defend`` with ``n: auto`` returns (checked in tests/test_tsbd_auto.py).

Datasets: ``synthetic`` (4,000 / 1,000, the test fixtures' setting) and ``mnistfmt``: other
synthetic images (data seed 1), grey, cropped to 28x28 and written as MNIST idx files, read back
through bdgrid's ``mnist`` loader. Attacks at their defaults, the strengthened variants of
tests/test_attacks_asr.py where defaults do not implant in this setting.

    OMP_NUM_THREADS=1 nice -n 10 python bench/tsbd_auto_table.py --record bench/records/tsbd_auto.jsonl \\
        --datasets synthetic --attacks badnets,blended --seeds 0,1,2
    python bench/tsbd_auto_table.py --table bench/records/tsbd_auto.jsonl      # the README table
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import torch

from defense.attacks import AttackContext, run_attack
from defense.data import load_dataset
from defense.data.splits import defender_subset, val_test_indices
from defense.methods import DefenseContext, run_defense
from defense.methods.tsbd import NWC, TSBDParams, purify_with, split_holdout, tsbd_prepare
from defense.methods.tsbd_auto import RULES, SOFT_RULES, TENSORS, choose, held_out_view, nwc_knee, rung_signals, within_budget
from defense.models import create_model
from defense.resources import ResourceCache
from defense.train import get_recipe, train
from defense.trial import TrialConfig, evaluate, make_poisoned, train_backdoored

SMALL = dict(n_train=4000, n_test=1000)
DEFENDER_RATIO = 0.125  # 500 defender images, as tests/test_tsbd_e2e.py and test_tsbd_auto.py
ORACLE_BUDGET = 0.05  # the issue's ACC bound, on the validation split
# tests/test_attacks_asr.py: resources shortened; the strengthened triggers of its module docstring
ATTACK_PARAMS = {
    "badnets": {}, "blended": {}, "sig": {},
    "wanet": {"s": 2.0, "cross_ratio": 0.0},
    "inputaware": {"mask_epochs": 2, "width": 8, "cross_ratio": 0.0},
    "lf": {"steps": 100, "ref_epochs": 4, "eps": 0.15},
    "trojannn": {"iters": 100, "ref_epochs": 4},
    "ssba": {"epochs": 3, "width": 16, "batch_size": 32, "psnr": 20.0, "lr": 3e-3},
    # the optional attacks (tests/test_attacks_optional.py): LC at its defaults (its clean
    # reference model shortened as LF's), BppAttack with 2 squeeze levels (8 do not implant)
    "lc": {"ref_epochs": 4}, "bpp": {"squeeze_num": 2},
}
STRENGTHENED = {"wanet", "inputaware", "lf", "ssba", "bpp"}
SOFT_STOP = 0.10  # the ladder runs on while the true-class probability's drop is within this (the soft rules' budgets are below it)
KNEE_CAPS = (2.0, 2.5)  # auto_knee_cap values replayed beside the default (none)
SOFT_BUDGETS = [(0.04, 0.0), (0.05, 0.0), (0.06, 0.0), (0.07, 0.0), (0.08, 0.0), (0.05, 1.0)]
RECIPE = get_recipe("fast", batch_size=64, lr=0.1)  # tests/attack_setup.py: batch 64 keeps steps on 4,000 images


def say(f, **row) -> None:
    line = json.dumps(row, default=lambda v: round(v, 5) if isinstance(v, float) else str(v))
    print(line, flush=True)
    if f is not None:
        f.write(line + "\n")
        f.flush()


# ---------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------

def _write_idx(path: Path, a) -> None:
    import numpy as np

    a = np.ascontiguousarray(a, dtype=np.uint8)
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}i", *a.shape) + a.tobytes())


def _write_cifar(d: Path, tr, te) -> None:
    """CIFAR-10's python batches: pickled dicts, 'data' N x 3072 (the R, G, B planes), 'labels'."""
    import pickle

    d.mkdir(parents=True, exist_ok=True)
    chunks = [(f"data_batch_{i + 1}", idx) for i, idx in enumerate(torch.arange(len(tr.y)).chunk(5))]
    for name, x, y in [(n, tr.x[i], tr.y[i]) for n, i in chunks] + [("test_batch", te.x, te.y)]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": x.reshape(len(x), -1).numpy(), "labels": y.tolist()}, f, protocol=2)


def load(dataset: str, root: Path):
    if dataset == "synthetic":
        return load_dataset("synthetic", **SMALL)
    if dataset == "cifarfmt":  # added after the rules were chosen: the out-of-sample check
        d = root / "cifarfmt"
        if not (d / "cifar-10-batches-py" / "test_batch").exists():
            _write_cifar(d / "cifar-10-batches-py", *load_dataset("synthetic", seed=2, **SMALL))
        return load_dataset("cifar10", str(d))
    if dataset != "mnistfmt":
        raise SystemExit(f"unknown dataset {dataset!r}: synthetic, mnistfmt or cifarfmt")
    d = root / "mnistfmt"
    if not (d / "t10k-labels-idx1-ubyte").exists():
        d.mkdir(parents=True, exist_ok=True)
        tr, te = load_dataset("synthetic", seed=1, **SMALL)
        grey = lambda x: x.float().mean(1)[:, 2:30, 2:30].round().to(torch.uint8).numpy()  # noqa: E731
        for name, a in [("train-images-idx3-ubyte", grey(tr.x)), ("train-labels-idx1-ubyte", tr.y.numpy()),
                        ("t10k-images-idx3-ubyte", grey(te.x)), ("t10k-labels-idx1-ubyte", te.y.numpy())]:
            _write_idx(d / name, a)
    return load_dataset("mnist", str(d))


def backdoored(dataset: str, attack: str, train_set, test_set, cache: ResourceCache, root: Path):
    """(model, poisoned, how). BadNets and Blended on synthetic: the test fixtures' path (trial
    config, ``fast`` 12 epochs); the rest: tests/attack_setup.py's batch-64 recipe, 8 epochs
    (Input-aware 12). The model's state is cached under ``root`` (weights_only load)."""
    fixture = dataset == "synthetic" and attack in ("badnets", "blended")
    info = train_set.info
    if fixture:
        cfg = TrialConfig(attack=attack, seed=0, pratio=0.1, epochs=12, dataset_params=SMALL, device="cpu")
        poisoned = make_poisoned(cfg, train_set, test_set)
    else:
        ctx = AttackContext(target=0, pratio=0.1, seed=0, arch="tiny_cnn", device="cpu", resources=cache,
                            recipe=replace(RECIPE, epochs=8))
        poisoned = run_attack(attack, train_set, test_set, ATTACK_PARAMS[attack], ctx)
    path = root / f"model_{dataset}_{attack}.pt"
    # a hook that trains with the model (Input-aware's pattern generator) is cached beside it:
    # without it a cached model meets an untrained trigger and looks not implanted
    stateful = hasattr(poisoned.hook, "state_dict")
    hook_path = path.with_suffix(".hook.pt")
    model = create_model("tiny_cnn", info.num_classes, info.channels, info.size)
    cached = path.exists() and (hook_path.exists() or not stateful)
    if cached:
        model.load_state_dict(torch.load(path, weights_only=True))
        if stateful:
            poisoned.hook.load_state_dict(torch.load(hook_path, weights_only=True))
    elif fixture:
        model, _ = train_backdoored(cfg, poisoned)
    else:
        torch.manual_seed(0)
        epochs = 12 if attack == "inputaware" else 8
        train(model, poisoned.train, replace(RECIPE, epochs=epochs), seed=0, device="cpu", hook=poisoned.hook)
    if not cached:
        torch.save(model.state_dict(), path)
        if stateful:
            torch.save(poisoned.hook.state_dict(), hook_path)
    model.eval()
    return model, poisoned, "fixture (fast, 12 ep)" if fixture else "batch-64 recipe"


# ---------------------------------------------------------------------------------------
# One (dataset, attack, seed)
# ---------------------------------------------------------------------------------------

def record(f, dataset, attack, seed, model, poisoned, train_set, test_set, how, have: dict, full: bool = False):
    """Record one (dataset, attack, seed); ``have`` holds what a previous, interrupted run recorded
    for it ({kind: row}, rungs under ("rung", n)), which is not run again (the n = 0 rung is: the
    later rungs' drop against it needs its predictions; it is deterministic). ``full``: every rung
    of the ladder, past the stop below (a rule may choose a rung the stop skipped)."""
    val_idx, test_idx = val_test_indices(len(test_set), 0.2, seed=0)
    ev = lambda m, idx: evaluate(m, test_set, poisoned, idx, 0, "cpu")  # noqa: E731
    v0, t0 = ev(model, val_idx), ev(model, test_idx)
    key = dict(dataset=dataset, attack=attack, seed=seed)
    if "before" not in have:
        say(f, kind="before", **key, how=how, strengthened=attack in STRENGTHENED, val=v0, test=t0)
    if t0["asr"] < 0.5:
        say(f, kind="skip", **key, why=f"not implanted: test ASR {t0['asr']:.3f}")
        return
    clean, _ = defender_subset(train_set, DEFENDER_RATIO, seed)
    ctx = DefenseContext(device="cpu", seed=seed)
    base = dict(un_threshold=0.2)

    # the reference-faithful fixed n = 0.1 on all of Dc, and FT
    if "fixed" not in have:
        c0 = time.process_time()
        out = run_defense("tsbd", model, clean, {**base, "n": 0.1}, ctx)
        say(f, kind="fixed", **key, n=0.1, cpu=time.process_time() - c0, test=ev(out.model, test_idx),
            val=ev(out.model, val_idx), ue=out.diagnostics["unlearn_epochs"])
    if "ft" not in have:
        c0 = time.process_time()
        out = run_defense("ft", model, clean, {}, ctx)
        say(f, kind="ft", **key, cpu=time.process_time() - c0, test=ev(out.model, test_idx), val=ev(out.model, val_idx))

    # the held-out ladder, ascending, until no budget rule and not the oracle can keep a rung:
    # validation drop > ORACLE_BUDGET, the held-out drop (against the original and against
    # n = 0) over 2 points + 1 SE (the rules' default budget) and the true-class probability's
    # drop over SOFT_STOP. Rungs past it are not run; a replay
    # counts them as over budget (as the rules' bisection assumes).
    p = TSBDParams(n="auto", **base)
    c0 = time.process_time()
    prep = tsbd_prepare(model, clean, p, ctx)
    nwc = NWC.from_dict(prep["nwc"], p.nwc_decimals)
    part, held = split_holdout(clean, p.held_share(), seed)
    view = held_out_view(model, held, prep)
    if "prep" not in have:
        say(f, kind="prep", **key, cpu=time.process_time() - c0, ue=prep["unlearn_epochs"], knee=nwc_knee(nwc),
            held=len(held), suspect=view["suspect"], suspect_is_target=view["suspect"] == 0)
    ref, low = None, tuple(n for n in p.auto_ladder if n < 0.1)
    # the rungs below 0.1 only when 0.1 is over a budget: a rule's bisection reaches them only
    # then, and the oracle would not prefer them (higher ASR) while 0.1 is within its budget
    order = [0.0] + [n for n in p.auto_ladder if n >= 0.1]
    for n in order:
        if ("rung", n) in have and n > 0:
            r = have[("rung", n)]
            sig, v = r["sig"], r["val"]
        else:
            c0 = time.process_time()
            net = purify_with(model, part, nwc, replace(p, n=n), ctx)[0]
            cpu = time.process_time() - c0
            sig = rung_signals(view, net, ref)
            if n == 0.0:
                ref = sig
            v, t = ev(net, val_idx), ev(net, test_idx)
            if ("rung", n) not in have:
                say(f, kind="rung", **key, n=n, cpu=cpu, sig={k: x for k, x in sig.items() if k not in TENSORS}, val=v, test=t)
        if n == 0.1 and low and (v0["acc"] - v["acc"] > ORACLE_BUDGET or not within_budget(sig, 0.02, 1.0)
                                 or not within_budget(sig, 0.02, 1.0, "_ft")
                                 or not within_budget(sig, TSBDParams().auto_prob_budget, 0.0, soft=True)):
            order[order.index(0.1) + 1:order.index(0.1) + 1] = list(low)
        if (not full and v0["acc"] - v["acc"] > ORACLE_BUDGET and n >= 0.1 and not within_budget(sig, 0.02, 1.0)
                and not within_budget(sig, 0.02, 1.0, "_ft") and not within_budget(sig, SOFT_STOP, 0.0, soft=True)):
            rest = order[order.index(n) + 1:]
            del order[order.index(n) + 1:]
            order.extend(x for x in rest if x < 0.1)  # the low rungs still run; the higher ones do not
    say(f, kind="done", **key)


# ---------------------------------------------------------------------------------------
# The table, from recorded rows
# ---------------------------------------------------------------------------------------

def oracle(rungs: list[dict], v0_acc: float) -> dict | None:
    """n tuned on the validation split: the recorded rung (n > 0) with the lowest validation ASR
    among those within ORACLE_BUDGET validation ACC of the original's ``v0_acc`` (ties: smaller
    n); None if none is."""
    ok = [r for r in rungs if r["n"] > 0 and v0_acc - r["val"]["acc"] <= ORACLE_BUDGET]
    return min(ok, key=lambda r: (r["val"]["asr"], r["n"])) if ok else None


def summarise(rows: list[dict], rule: str, budget: float | None = None, z: float | None = None,
              cap: float | None = None) -> list[dict]:
    """One row per (dataset, attack, seed): before, fixed 0.1, auto (``rule``), oracle, FT."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["attack"], r["seed"]), []).append(r)
    out = []
    for key, rs in groups.items():
        by = {r["kind"]: r for r in rs if r["kind"] != "rung"}
        rungs = sorted({r["n"]: r for r in rs if r["kind"] == "rung"}.values(), key=lambda r: r["n"])  # a resumed run repeats
        row = dict(zip(("dataset", "attack", "seed"), key), before=by["before"]["test"],
                   strengthened=by["before"]["strengthened"], skip=by.get("skip", {}).get("why"))
        if not row["skip"] and "done" not in by:
            row["skip"] = "not run to the end (time)"
        if row["skip"] or "prep" not in by or not rungs:
            out.append(row)
            continue
        ladder = [r for r in rungs if r["n"] > 0]
        if rule in SOFT_RULES and any("pdrop" not in r["sig"] for r in ladder):
            row["skip"] = "no true-class probabilities recorded (an earlier recording)"
            out.append(row)
            continue
        p = TSBDParams(n="auto")
        if budget is not None:
            p = replace(p, **{"auto_prob_budget" if rule in SOFT_RULES else "auto_budget": budget})
        p = replace(p, auto_z=p.auto_z if z is None else z, auto_knee_cap=cap)
        n_auto, visited = choose(rule, [dict(r["sig"], n=r["n"]) for r in ladder], by["prep"]["knee"], p)
        auto = next((r for r in ladder if r["n"] == n_auto), None)
        if auto is None:  # the ladder skipped that rung (below 0.1 while 0.1 was within every budget)
            row["skip"] = f"rule chose n={n_auto}, a rung not recorded"
            out.append(row)
            continue
        orc = oracle(ladder, by["before"]["val"]["acc"]) or ladder[0]
        rung_cpu = {r["n"]: r["cpu"] for r in rungs}
        row.update(fixed=by["fixed"]["test"], ft=by["ft"]["test"], auto=auto["test"], auto_n=n_auto,
                   oracle=orc["test"], oracle_n=orc["n"], knee=by["prep"]["knee"],
                   # a visited rung the ladder did not run (past its stop) at the mean rung's cost
                   cpu_auto=by["prep"]["cpu"] + sum(rung_cpu.get(n, sum(rung_cpu.values()) / len(rung_cpu))
                                                    for n in visited), visited=len(visited),
                   cpu_fixed=by["fixed"]["cpu"], complete=len(ladder) == len(TSBDParams().auto_ladder)
                   or ladder[-1]["sig"]["drop"] > 0.10)
        out.append(row)
    return out


def table(rows: list[dict], rule: str) -> str:
    pct = lambda m: f"{100 * m['acc']:.1f} / {100 * m['asr']:.1f}"  # noqa: E731
    lines = ["| dataset | attack | seed | before | TSBD n=0.1 | TSBD auto (n) | oracle (n) | FT | CPU s auto / fixed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summarise(rows, rule):
        name = r["attack"] + (" (strengthened)" if r["strengthened"] else "")
        if r.get("skip") or "auto" not in r:
            lines.append(f"| {r['dataset']} | {name} | {r['seed']} | {pct(r['before'])} | "
                         f"{r.get('skip') or 'not run'} | | | | |")
            continue
        lines.append(f"| {r['dataset']} | {name} | {r['seed']} | {pct(r['before'])} | {pct(r['fixed'])} | "
                     f"{pct(r['auto'])} ({r['auto_n']}) | {pct(r['oracle'])} ({r['oracle_n']}) | {pct(r['ft'])} | "
                     f"{r['cpu_auto']:.0f} / {r['cpu_fixed']:.0f} |")
    return "\n".join(lines)


def compare(rows: list[dict]) -> str:
    """Every rule (and budget) side by side: runs within the issue's bound (ASR <= 10%, drop <= 5
    points), runs within 5 ASR points of the oracle at no more than 2 ACC points more lost, mean
    ASR and ACC drop, mean Stage-2 runs."""
    lines = ["| rule | budget, z | within bound | near oracle | mean ASR | mean ACC drop | worst ASR | worst drop | Stage-2 runs |",
             "|---|---|---|---|---|---|---|---|---|"]

    def line(name: str, budget: str, s: list[dict], side: str = "auto", runs: float | None = None) -> str:
        runs = sum(r["visited"] for r in s) / len(s) if runs is None else runs
        drop = [r["before"]["acc"] - r[side]["acc"] for r in s]
        asr = [r[side]["asr"] for r in s]
        bound = sum(a <= 0.10 and d <= 0.05 for a, d in zip(asr, drop))
        near = sum(r[side]["asr"] <= r["oracle"]["asr"] + 0.05 and r["oracle"]["acc"] - r[side]["acc"] <= 0.02
                   for r in s)
        return (f"| {name} | {budget} | {bound}/{len(s)} | {near}/{len(s)} | {100 * sum(asr) / len(s):.1f} | "
                f"{100 * sum(drop) / len(s):.1f} | {100 * max(asr):.1f} | {100 * max(drop):.1f} | {runs:.1f} |")

    # the references on the same runs: the fixed n = 0.1 default and the validation oracle (11 rungs)
    s = [r for r in summarise(rows, "knee") if "auto" in r]
    lines += [line("fixed n = 0.1", "-", s, "fixed", 1), line("oracle (validation)", "-", s, "oracle", len(TSBDParams().auto_ladder))]
    for rule in RULES:
        for budget, z in ([(None, None)] if rule == "knee" else SOFT_BUDGETS if rule in SOFT_RULES else
                          [(0.02, 1.0), (0.02, 0.0), (0.05, 1.0), (0.05, 0.0)]):
            s = [r for r in summarise(rows, rule, budget, z) if "auto" in r]
            if s:
                lines.append(line(rule, "-" if budget is None else f"{budget}, {z:g}", s))
    # the default rule with the opt-in knee cap
    for cap in KNEE_CAPS:
        s = [r for r in summarise(rows, "knee_soft", 0.05, 0.0, cap=cap) if "auto" in r]
        lines.append(line(f"knee_soft, auto_knee_cap {cap:g}", "0.05, 0", s))
    # the default's CPU time against one fixed-n run, measured in the same process
    ratio = sorted(r["cpu_auto"] / r["cpu_fixed"] for r in summarise(rows, TSBDParams().auto_rule) if "auto" in r)
    lines += ["", f"CPU s, {TSBDParams().auto_rule} / fixed n = 0.1: median {statistics.median(ratio):.2f}x "
              f"(min {ratio[0]:.2f}x, max {ratio[-1]:.2f}x) over {len(ratio)} runs"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", help="run and append JSON lines here")
    ap.add_argument("--table", help="print the README table (and the rule comparison) from this JSONL "
                    "(or several, comma-separated: the comparison counts every run)")
    ap.add_argument("--rule", default=TSBDParams().auto_rule)
    ap.add_argument("--datasets", default="synthetic,mnistfmt")
    ap.add_argument("--attacks", default=",".join(ATTACK_PARAMS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="every rung of the ladder, past the stop (reruns the cells "
                    "whose recorded ladder stopped early; recorded rungs are not run again)")
    ap.add_argument("--root", default=os.environ.get("BDGRID_MEASURE", str(Path(tempfile.gettempdir()) / "bdgrid-auto")))
    a = ap.parse_args()
    if a.table:
        rows = []
        for i, path in enumerate(a.table.split(",")):  # several recordings: the later ones' datasets marked
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    r["dataset"] += f" ({Path(path).stem})" if i else ""
                    rows.append(r)
        print(table(rows, a.rule))
        print()
        print(compare(rows))
        return
    if not a.record:
        raise SystemExit("give --record OUT.jsonl (run) or --table OUT.jsonl (print)")
    torch.set_num_threads(a.threads)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    cache = ResourceCache(root / "resources")
    have: dict = {}  # resume: what a previous run recorded, per (dataset, attack, seed)
    if Path(a.record).exists():
        for line in Path(a.record).read_text().splitlines():
            r = json.loads(line)
            k = (r["dataset"], r["attack"], r["seed"])
            have.setdefault(k, {})[("rung", r["n"]) if r["kind"] == "rung" else r["kind"]] = r
    done = {k for k, v in have.items() if "skip" in v or ("done" in v and not (
        a.full and any(("rung", n) not in v for n in TSBDParams().auto_ladder)))}
    Path(a.record).parent.mkdir(parents=True, exist_ok=True)
    with open(a.record, "a") as f:
        for ds in a.datasets.split(","):
            tr, te = load(ds, root)
            for atk in a.attacks.split(","):
                todo = [s for s in map(int, a.seeds.split(",")) if (ds, atk, s) not in done]
                if not todo:
                    continue
                try:
                    model, poisoned, how = backdoored(ds, atk, tr, te, cache, root)
                except Exception as e:  # noqa: BLE001 - one attack failing must not lose the others' rows
                    say(f, kind="skip", dataset=ds, attack=atk, seed=todo[0], why=f"error: {type(e).__name__}: {e}")
                    continue
                for s in todo:
                    record(f, ds, atk, s, model, poisoned, tr, te, how, have.get((ds, atk, s), {}), a.full)


if __name__ == "__main__":
    main()
