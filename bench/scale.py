"""How bdgrid's driver-side work grows with a campaign: the planner (validate + plan, as `bdgrid
validate` and `run --dry-run` do) at N stages, and `bdgrid table` over R result rows in the real
on-disk layout (one file per eval stage, as a grid writes them). Prints CPU seconds (this process;
no worker is involved) beside wall seconds and the peak resident memory growth of each step.

    .venv/bin/python bench/scale.py --stages 1000,10000,100000 --rows 1000,10000

Each size runs in a fresh subprocess so one step's memory does not hide the next one's. The
goals of issue 18 are printed beside the numbers; this script measures, it does not assert.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOALS = {"plan": {100_000: 2.0, 1_000_000: 15.0}, "table": {100_000: 2.0, 1_000_000: 3.0}}


def spec_for(stages: int) -> str:
    """A grid of about ``stages`` stages: seeds x 2 attacks x (none, ft, fp, nad) on synthetic.
    Per cell: 1 attack + 1 none eval + 3 x (defense + eval) = 8 stages."""
    seeds = max(1, stages // 16)
    return (f"name: scale\ndatasets: [synthetic]\narchs: [tiny_cnn]\nattacks: [badnets, blended]\n"
            f"seeds: [{', '.join(map(str, range(seeds)))}]\ndefenses: [none, ft, fp, nad]\n")


def one_plan(stages: int) -> dict:
    from grid.plan import build_plan
    from grid.spec import parse_spec
    from grid.validate import every_problem

    text = spec_for(stages)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c0, w0 = time.process_time(), time.perf_counter()
    ls, probs = parse_spec(text)
    assert not every_problem(ls, probs), "the scale spec must validate"
    plan = build_plan(ls)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"what": "validate+plan", "n": len(plan.stages), "cpu_s": cpu, "wall_s": wall,
            "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}


def one_table(rows: int) -> dict:
    import results
    from results.tables import render

    d = Path(tempfile.mkdtemp(prefix="bdgrid-scale-"))
    per = 2  # a grid's eval writes one row per split
    for i in range(rows // per):
        a = ("badnets", "blended")[i % 2]
        dfn = ("none", "ft", "fp", "nad")[(i // 2) % 4]
        results.write_stage(d, "eval", f"k{i:08d}", [dict(dataset="synthetic", arch="tiny_cnn", attack=a, defense=dfn,
                                                          pratio=0.1, target=0, seed=i // 8, split=s, acc=0.9,
                                                          asr=0.1, ra=0.8, der=0.9 if dfn != "none" else 0.5,
                                                          bd_acc=0.9 if dfn != "none" else 0.9,
                                                          bd_asr=0.98 if dfn != "none" else 0.1)
                                                     for s in ("test", "val")])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c0, w0 = time.process_time(), time.perf_counter()
    text, _ = render(results.load(d), "md")
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    assert "BadNets" in text
    return {"what": "table", "n": rows, "files": rows // per, "cpu_s": cpu, "wall_s": wall,
            "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="1000,10000,100000", help="planner sizes (comma-separated)")
    ap.add_argument("--rows", default="1000,10000", help="table sizes in result rows (comma-separated)")
    ap.add_argument("--json", help="also write the measurements here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # the child process: one measurement, as JSON on stdout
        kind, n = a.one.split(":")
        print(json.dumps(one_plan(int(n)) if kind == "plan" else one_table(int(n))))
        return
    from _common import machine

    print(machine())
    out = []
    for kind, sizes in (("plan", a.stages), ("table", a.rows)):
        for n in (int(x) for x in sizes.split(",") if x):
            r = subprocess.run([sys.executable, __file__, "--one", f"{kind}:{n}"], capture_output=True, text=True)
            if r.returncode:
                print(f"{kind} {n}: failed\n{r.stderr[-2000:]}")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            goal = GOALS[kind].get(n)
            print(f"{m['what']:14s} n={m['n']:>9,}  cpu {m['cpu_s']:8.2f} s  wall {m['wall_s']:8.2f} s  "
                  f"peak +{m['peak_mb']:7.0f} MB" + (f"   (goal: under {goal:g} s CPU)" if goal else ""))
            out.append(m)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
