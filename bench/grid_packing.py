"""Grid packing: trials per hour with 1, 2 and 4 trials sharing one GPU (GPU only).

A small grid (PreAct-ResNet18, synthetic 10,000/2,000, BadNets and Blended, 4 seeds, defenses
``none`` and ``tsbd``, the fast recipe for a few epochs) runs through bdgrid's own runner
(``grid.spec.parse_spec`` -> ``grid.run.execute_plan`` on local Ray) once per packing factor k,
every stage asking Ray for ``num_gpus = 1/k``: Ray then runs k stages on the GPU at once. Each
run writes to a fresh output folder, so nothing is cached between them. Reported: wall time of
the whole grid (data stage included), trials (attack x seed cells) per hour, and the gain over
k = 1. Small trials (a defense on 5% of the data, a short attack training) leave most of an H100
idle in kernel-launch gaps; packing fills those gaps.

Side by side in one process and one Ray session: the packing factors run in alternating order
over ``--reps`` repetitions (1 2 4, 4 2 1, 1 2 4, ...), each into its own fresh folder, and the
gain of k over k = 1 is taken within a repetition and printed as median (min, max, n), in wall
time and beside it the CPU time of every process (driver, Ray daemons and workers:
``_common.TreeTimer``).

    .venv/bin/python bench/grid_packing.py                 # on a GPU machine
    .venv/bin/python bench/grid_packing.py --per-gpu 1,2,4 --seeds 4 --epochs 4 --reps 3

Without a GPU it says so and exits 0. ``--cpu-smoke`` runs the same code path on the CPU with
``num_cpus = 1/k`` slices of one CPU (a check that the script works, not a measurement).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import TreeTimer, alternating, fmt_s, fmt_spread, machine, spread, write_json

import yaml


def grid_spec(name: str, k: int, a, gpu: bool) -> str:
    """The packing grid as spec YAML: every compute stage asks for 1/k of a GPU (or of a CPU)."""
    share = {"cpus": 1, "gpus": 1.0 / k} if gpu else {"cpus": 1.0 / k, "gpus": 0}
    spec = {
        "name": name,
        "datasets": [{"name": "synthetic", "params": {"n_train": a.n_train, "n_test": a.n_test}}],
        "archs": [a.arch],
        "attacks": a.attacks.split(","),
        "pratios": [0.1],
        "seeds": list(range(a.seeds)),
        "defenses": [{"name": d} for d in a.defenses.split(",")],
        "recipe": "fast",
        "epochs": a.epochs,
        "retries": 0,
        "resources": {kind: dict(share) for kind in ("resource", "attack", "prepare", "defense", "eval")}
        | {"data": {"cpus": 1, "gpus": 0}},
    }
    return yaml.safe_dump(spec, sort_keys=False)


def run_k(k: int, a, gpu: bool, out: Path) -> dict:
    from grid.run import execute_plan
    from grid.spec import parse_spec

    text = grid_spec(f"packing-k{k}", k, a, gpu)
    ls, problems = parse_spec(text, f"packing-k{k}")
    if problems:
        raise SystemExit("packing spec does not parse:\n" + "\n".join(str(p) for p in problems))
    with TreeTimer() as t:
        res = execute_plan(ls, out, show_progress=False)
    if not res.ok:
        raise SystemExit(f"k={k}: {len(res.failed)} stages failed: {list(res.failed.values())[:3]}")
    cells = len(a.attacks.split(",")) * a.seeds
    evals = sum(1 for s in res.plan.stages.values() if s.kind == "eval")
    return {"k": k, "wall_s": t.s, "cpu_s": t.cpu, "cells": cells, "evals": evals, "stages_run": len(res.done),
            "trials_per_hour": cells / t.s * 3600, "cpu_s_per_trial": t.cpu / cells}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-gpu", default="1,2,4", help="packing factors k to compare (trials per GPU)")
    ap.add_argument("--arch", default="preact_resnet18")
    ap.add_argument("--n-train", type=int, default=10_000)
    ap.add_argument("--n-test", type=int, default=2_000)
    ap.add_argument("--attacks", default="badnets,blended")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--defenses", default="none,tsbd")
    ap.add_argument("--epochs", type=int, default=4, help="fast-recipe epochs of each attack training")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each k, alternating order (>= 3)")
    ap.add_argument("--no-warmup", action="store_true", help="measure cold: the first side then pays the workers' start-up")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the code path on the CPU (not a measurement)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available()
    print(f"# grid_packing: {machine()}")
    if not gpu and not a.cpu_smoke:
        print("grid_packing needs a GPU (it measures trials sharing one GPU); none here, nothing to do.")
        return 0
    from grid.run import connect

    import ray

    ks = [int(x) for x in a.per_gpu.split(",")]
    started = connect(None, num_cpus=None if gpu else max(ks))
    try:
        if gpu and float(ray.cluster_resources().get("GPU", 0)) < 1:
            print("Ray sees no GPU; nothing to measure.")
            return 0
        print(f"# {a.arch}, synthetic {a.n_train}/{a.n_test}, attacks {a.attacks}, {a.seeds} seeds, "
              f"defenses {a.defenses}, fast recipe {a.epochs} epochs; {'GPU' if gpu else 'CPU smoke'}; "
              f"{a.reps} repetitions per k, alternating")
        with tempfile.TemporaryDirectory(prefix="bdgrid-packing-") as d:
            if not a.no_warmup:
                # Untimed: start max(k) Ray workers and pay their imports and CUDA/cuDNN set-up once,
                # so that the first side measured is not charged for the cold start of the later ones.
                warm = argparse.Namespace(**{**vars(a), "seeds": max(ks), "epochs": 1, "defenses": "none"})
                w = run_k(max(ks), warm, gpu, Path(d) / "warmup")
                print(f"  warm-up ({max(ks)} workers): {fmt_s(w['wall_s'])}", flush=True)
            count = {k: 0 for k in ks}

            def side(k):
                def run():
                    count[k] += 1
                    r = run_k(k, a, gpu, Path(d) / f"k{k}-rep{count[k]}")
                    print(f"  k={k}: {r['cells']} trials ({r['stages_run']} stages) in {fmt_s(r['wall_s'])} wall, "
                          f"{fmt_s(r['cpu_s'])} CPU: {r['trials_per_hour']:.0f} trials/h", flush=True)
                    return r
                return run

            reps = alternating({k: side(k) for k in ks}, a.reps)
    finally:
        if started:
            ray.shutdown()
    base = reps[ks[0]]
    rows = []
    print(f"\n{'per GPU':>8s} {'wall':>8s} {'CPU':>8s} {'trials/h':>9s}   gain over k={ks[0]} (median, min, max, n)")
    for k in ks:
        pairs = list(zip(base, reps[k]))  # repetition i of each side ran next to each other
        r = {"k": k, "reps": reps[k], "wall_s": spread([x["wall_s"] for x in reps[k]]),
             "cpu_s": spread([x["cpu_s"] for x in reps[k]]),
             "trials_per_hour": spread([x["trials_per_hour"] for x in reps[k]]),
             "gain": spread([x["trials_per_hour"] / b["trials_per_hour"] for b, x in pairs]),
             "cpu_ratio": spread([x["cpu_s"] / b["cpu_s"] for b, x in pairs])}
        rows.append(r)
        print(f"{k:8d} {fmt_s(r['wall_s']['median']):>8s} {fmt_s(r['cpu_s']['median']):>8s} "
              f"{r['trials_per_hour']['median']:9.0f}   {fmt_spread(r['gain'])}")
    best = max(rows, key=lambda r: r["gain"]["median"])
    print(f"\nRATIO trials/hour, best packing (k={best['k']}) vs {ks[0]} per GPU, wall: {fmt_spread(best['gain'])}; "
          f"CPU time of all processes k={best['k']}/k={ks[0]}: {fmt_spread(best['cpu_ratio'])}"
          + ("" if gpu else " [CPU SMOKE: a check of the code path, not a measurement]"))
    write_json(a.json, {"machine": machine(), "gpu": gpu, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
