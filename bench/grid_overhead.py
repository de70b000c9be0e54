"""Per-stage cost of the grid runner (Ray tasks, store reads/writes, resume checks, state file)
against calling the same stage functions in a plain in-process loop, side by side.

Trivial stages: synthetic data of 100/40 images, tiny_cnn, 1 training epoch, defense ``none``,
many seeds, so each stage does almost nothing and the difference is the runner's own cost.
Both sides run the same plan (same stage functions, same artifact writes and result rows),
each into a fresh output folder, in this one process, the sides alternating over ``--reps``
repetitions (loop runner, runner loop, ...):

- loop: the stages as direct calls, in plan order (imports and first kernels paid before, once).
- runner, cold: a fresh local Ray session is started and the plan run on it (workers start and
  import torch and bdgrid); Ray's start-up is included and also printed on its own.
- runner, warm: the same plan again, into another fresh folder, on that session (workers reused).

Wall time and CPU time are reported for each; CPU time counts every process: the driver, the
Ray daemons (GCS, raylet, agents) and the workers (``_common.tree_cpu``: the driver's process
tree from /proc, exited workers included). On a shared machine wall time measures the other jobs
as much as the runner; CPU time does not. Every ratio is runner / loop within one repetition,
printed as median (min, max, n), and the per-stage cost as (runner - loop) / stages.

    .venv/bin/python bench/grid_overhead.py [--seeds 20] [--reps 3] [--cpus 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import TreeTimer, alternating, fmt_spread, machine, spread, write_json

SPEC = """\
name: overhead
datasets:
  - name: synthetic
    params: {{n_train: 100, n_test: 40}}
archs: [tiny_cnn]
attacks: [badnets, blended]
seeds: {seeds}
defenses: [none]
recipe: fast
epochs: 1
"""


def plain_loop(ls, out: Path) -> None:
    """The same stages, in plan order, as direct function calls (no Ray, no resume logic)."""
    from grid import stages
    from grid.plan import build_plan
    from grid.store import ArtifactStore

    plan = build_plan(ls)
    store = ArtifactStore(out / "artifacts")
    env = {"out": str(out), "grid": plan.grid, "spec_hash": plan.spec_hash}
    data = {}
    for s in plan.stages.values():
        r = stages.execute(s, data.get(s.parents[0]) if s.parents else None, store, env)
        if s.kind == "data":
            data[s.key] = r
        elif s.kind == "eval":
            stages.write_rows(out, s, r)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="seeds of the 2-attack grid (the stage count is printed)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each side, alternating order (>= 3)")
    ap.add_argument("--cpus", type=int, default=1, help="Ray CPUs (1 = serial, so the ratio is pure overhead)")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)

    import ray
    import torch

    from grid.plan import build_plan
    from grid.run import connect, execute_plan
    from grid.spec import parse_spec

    torch.set_num_threads(1)  # the Ray tasks get 1 thread each (num_cpus 1)
    ls, probs = parse_spec(SPEC.format(seeds=list(range(a.seeds))))
    assert not probs, probs
    n = len(build_plan(ls).stages)
    print(f"# grid_overhead: {machine()}; ray {ray.__version__}")
    print(f"# {n} trivial stages (synthetic 100/40, tiny_cnn, 1 epoch, 2 attacks x {a.seeds} seeds, defense none), "
          f"Ray num_cpus {a.cpus}; {a.reps} repetitions per side, alternating; CPU = driver + Ray daemons + workers")
    reps: dict = {"loop": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="bdgrid-overhead-") as d:
        warm_ls, _ = parse_spec(SPEC.format(seeds=[1000]))
        plain_loop(warm_ls, Path(d) / "warmup")  # imports and first kernels: one-time costs, not per stage
        count = {"loop": 0, "runner": 0}

        def loop():
            count["loop"] += 1
            with TreeTimer() as t:
                plain_loop(ls, Path(d) / f"loop{count['loop']}")
            reps["loop"].append({"s": t.s, "cpu": t.cpu})
            print(f"  loop            wall {t.s:6.2f}s  CPU {t.cpu:6.2f}s", flush=True)

        def runner():
            count["runner"] += 1
            i = count["runner"]
            with TreeTimer() as t:
                with TreeTimer() as st:
                    connect(None, num_cpus=a.cpus)
                res = execute_plan(ls, Path(d) / f"cold{i}", show_progress=False)
                assert res.ok and len(res.done) == n, (res.ok, len(res.done), n)
                with TreeTimer() as w:  # the same session again: workers already up
                    res = execute_plan(ls, Path(d) / f"warm{i}", show_progress=False)
                    assert res.ok and len(res.done) == n
            # cold: start-up + first run; the warm run's share is taken out of the outer timer
            reps["cold"].append({"s": t.s - w.s, "cpu": t.cpu - w.cpu, "startup_s": st.s, "startup_cpu": st.cpu})
            reps["warm"].append({"s": w.s, "cpu": w.cpu})
            ray.shutdown()
            print(f"  runner cold     wall {t.s - w.s:6.2f}s  CPU {t.cpu - w.cpu:6.2f}s  (Ray start-up wall {st.s:.2f}s)\n"
                  f"  runner warm     wall {w.s:6.2f}s  CPU {w.cpu:6.2f}s", flush=True)

        alternating({"loop": loop, "runner": runner}, a.reps)
    summary = {"stages": n, "ray_cpus": a.cpus, "reps": a.reps,
               "loop_ms_per_stage": spread([1000 * r["s"] / n for r in reps["loop"]]),
               "loop_cpu_ms_per_stage": spread([1000 * r["cpu"] / n for r in reps["loop"]]),
               "ray_startup_s": spread([r["startup_s"] for r in reps["cold"]]),
               "ray_startup_cpu_s": spread([r["startup_cpu"] for r in reps["cold"]])}
    print()
    print(f"loop (no runner), per stage: wall {fmt_spread(summary['loop_ms_per_stage'], ' ms', 1)}; "
          f"CPU {fmt_spread(summary['loop_cpu_ms_per_stage'], ' ms', 1)}")
    for kind in ("cold", "warm"):
        pairs = list(zip(reps["loop"], reps[kind]))  # rep i of each side ran next to each other
        s = {"ratio_wall": spread([r["s"] / lp["s"] for lp, r in pairs]),
             "ratio_cpu": spread([r["cpu"] / lp["cpu"] for lp, r in pairs]),
             "per_stage_ms_wall": spread([1000 * (r["s"] - lp["s"]) / n for lp, r in pairs]),
             "per_stage_ms_cpu": spread([1000 * (r["cpu"] - lp["cpu"]) / n for lp, r in pairs])}
        summary[kind] = s
        what = "fresh Ray session, start-up included" if kind == "cold" else "same session again"
        print(f"RATIO runner/loop {kind} ({what}), wall: {fmt_spread(s['ratio_wall'])}; CPU: {fmt_spread(s['ratio_cpu'])}")
        print(f"COST per stage, runner {kind} minus loop: wall {fmt_spread(s['per_stage_ms_wall'], ' ms', 1)}; "
              f"CPU {fmt_spread(s['per_stage_ms_cpu'], ' ms', 1)}")
    print(f"Ray start-up (in cold): wall {fmt_spread(summary['ray_startup_s'], 's')}; "
          f"CPU {fmt_spread(summary['ray_startup_cpu_s'], 's')}")
    out = {"machine": machine(), "summary": summary, "reps": reps}
    write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
