"""Per-stage scheduling overhead of the grid runner (Ray tasks, store reads/writes, resume
checks, state file) against calling the same stage functions in a plain in-process loop.

Trivial stages: synthetic data of 100/40 images, tiny_cnn, 1 training epoch, defense `none`,
many seeds, so each stage does almost nothing and the difference is the runner's own cost.
Both sides run the same plan (same stage functions, same artifact writes and result rows),
each into a fresh output folder; Ray start-up is timed separately.

    .venv/bin/python bench/grid_overhead.py [--seeds 20] [--cpus 1]

Prints one JSON line: stages, loop seconds, runner seconds, per-stage overhead, ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

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


def plain_loop(ls, out: Path) -> float:
    """The same stages, in plan order, as direct function calls (no Ray, no resume logic)."""
    from grid import stages
    from grid.plan import build_plan
    from grid.store import ArtifactStore

    plan = build_plan(ls)
    store = ArtifactStore(out / "artifacts")
    env = {"out": str(out), "grid": plan.grid, "spec_hash": plan.spec_hash}
    t0 = time.perf_counter()
    data = {}
    for s in plan.stages.values():
        r = stages.execute(s, data.get(s.parents[0]) if s.parents else None, store, env)
        if s.kind == "data":
            data[s.key] = r
        elif s.kind == "eval":
            stages.write_rows(out, s, r)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--cpus", type=int, default=1, help="Ray CPUs (1 = serial, so the ratio is pure overhead)")
    a = ap.parse_args()

    import ray
    import torch

    from grid.plan import build_plan
    from grid.run import connect, execute_plan
    from grid.spec import parse_spec

    torch.set_num_threads(1)  # the Ray tasks get 1 thread each (num_cpus 1)
    ls, probs = parse_spec(SPEC.format(seeds=list(range(a.seeds))))
    assert not probs, probs
    n = len(build_plan(ls).stages)
    with tempfile.TemporaryDirectory() as d:
        warm, _ = parse_spec(SPEC.format(seeds=[1000]))
        plain_loop(warm, Path(d) / "warm")  # imports and first kernels: one-time costs, not per stage
        loop_s = plain_loop(ls, Path(d) / "loop")
        t0 = time.perf_counter()
        connect(None, num_cpus=a.cpus)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = execute_plan(ls, Path(d) / "ray", show_progress=False)
        ray_s = time.perf_counter() - t0
        assert res.ok and len(res.done) == n
        t0 = time.perf_counter()
        again = execute_plan(ls, Path(d) / "ray", show_progress=False)  # resume check of a finished grid
        resume_s = time.perf_counter() - t0
        assert not again.done
        ray.shutdown()
    print(json.dumps({
        "stages": n, "ray_cpus": a.cpus, "loop_s": round(loop_s, 2), "runner_s": round(ray_s, 2),
        "ratio": round(ray_s / loop_s, 2), "overhead_per_stage_ms": round(1000 * (ray_s - loop_s) / n, 1),
        "ray_startup_s": round(startup, 2), "resume_noop_s": round(resume_s, 2),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}",
    }))


if __name__ == "__main__":
    main()
