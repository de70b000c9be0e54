"""How bdgrid's driver-side work grows with a campaign (issue 18), each step in a fresh process:

* ``validate+plan`` at N stages, as ``bdgrid validate`` and ``run --dry-run`` do: the torch import
  (the registries import the attack code) is timed apart, so the planner's own cost shows;
* ``dry run`` of the 100k-stage grid when ``--out`` already holds the results of its 50k evals,
  compacted as a run leaves them, and the worst case: 50k per-eval files (a run killed before its
  end; a dry run never compacts);
* ``bdgrid table`` and ``bdgrid plot --kind acc-asr`` over R result rows (R/2 evals, two splits
  each), in the layout a run leaves (per-eval files written by ``results.write_stage``, then
  compacted by ``results.compact``) and the worst case: every eval still its own file (the first
  ``table`` on it compacts them, which is part of what it measures).

The result rows are those of the planned grid's eval stages (their keys, identity and the extra
keys a grid writes). Up to 100k rows every eval is one ``write_stage`` call, as in a run; the 1M
rows are written as 1,000 files of 1,000 rows through the writer's own ``to_table``, ``seal`` and
``atomic_write`` (500k single writes would take this machine about an hour) and then compacted.
The data lives under ``--work`` (default: a folder in /dev/shm, removed at the end), so disk
fsyncs do not dominate generation; reading is then from memory, as from a warm page cache.

Prints CPU seconds of the measured process (all its threads) beside wall seconds, and its peak
resident memory (total, and growth over its imports), with issue 18's goal and met / NOT met.
Measures, does not assert.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py --stages 1000,10000,100000 --rows 10000,100000
    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py --stages 1000000 --rows 1000000 --dry-run 0
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (seconds of CPU, MB of peak memory beyond the imports or None) per (what, size): issue 18's goals
GOALS = {("validate+plan", 100_000): (2.0, 500), ("validate+plan", 1_000_000): (15.0, None),
         ("dry run", 100_000): (3.0, None),
         ("table", 100_000): (2.0, None), ("table", 1_000_000): (3.0, 1500),
         ("plot", 1_000_000): (5.0, None)}
BATCH = 1000  # rows per file of the 1M-row store


def spec_for(stages: int) -> str:
    """A grid of about ``stages`` stages: seeds x 2 attacks x (none, ft, fp, nad) on synthetic.
    Per cell: 1 attack + 1 none eval + 3 x (defense + eval) = 8 stages, 4 of them evals."""
    seeds = max(1, stages // 16)
    return (f"name: scale\ndatasets: [synthetic]\narchs: [tiny_cnn]\nattacks: [badnets, blended]\n"
            f"seeds: [{', '.join(map(str, range(seeds)))}]\ndefenses: [none, ft, fp, nad]\n")


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (/proc; ``ru_maxrss`` would carry the parent's peak
    across fork and exec)."""
    try:
        for ln in Path("/proc/self/status").read_text().splitlines():
            if ln.startswith(field + ":"):
                return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(fn) -> dict:
    base = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here on (Linux >= 4.0)
    except OSError:
        pass
    c0, w0 = time.process_time(), time.perf_counter()
    got = fn()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    peak = _status_mb("VmHWM")
    return {"cpu_s": cpu, "wall_s": wall, "peak_mb": peak, "grow_mb": peak - base, **(got or {})}


# ------------------------------------------------------------------ measured steps (child process)

def one_plan(n: int) -> dict:
    c0, w0 = time.process_time(), time.perf_counter()
    import torch  # noqa: F401 - what the registries import; timed apart

    torch_cpu, torch_wall = time.process_time() - c0, time.perf_counter() - w0
    from grid.plan import build_plan
    from grid.spec import parse_spec
    from grid.validate import every_problem

    text = spec_for(n)

    def work():
        ls, probs = parse_spec(text)
        assert not every_problem(ls, probs), "the scale spec must validate"
        return {"n": len(build_plan(ls).stages)}

    m = _measure(work)
    return {**m, "what": "validate+plan", "torch_cpu_s": torch_cpu, "torch_wall_s": torch_wall}


def _cli(args: list[str]) -> dict:
    from typer.testing import CliRunner

    from grid.cli import app

    r = CliRunner().invoke(app, args)
    if r.exit_code:
        raise SystemExit(f"bdgrid {' '.join(args)} exited {r.exit_code}:\n{r.output[-2000:]}")
    return {"out_tail": r.stdout[-300:]}


def one_table(d: str) -> dict:
    import grid.cli  # noqa: F401 - imports (typer, pandas, pyarrow) are not the table's work

    return {**_measure(lambda: _cli(["table", "--out", d])), "what": "table"}


def one_plot(d: str) -> dict:
    import matplotlib  # noqa: F401

    import grid.cli  # noqa: F401

    dest = tempfile.mkdtemp(prefix="bdgrid-scale-fig-")
    try:
        return {**_measure(lambda: _cli(["plot", "--out", d, "--kind", "acc-asr", "--dest", dest])), "what": "plot"}
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def one_dry(n: int, d: str) -> dict:
    import torch  # noqa: F401

    import grid.cli  # noqa: F401

    spec = Path(d).parent / f"spec-{n}.yaml"
    spec.write_text(spec_for(n))
    return {**_measure(lambda: _cli(["run", str(spec), "--out", d, "--dry-run"])), "what": "dry run"}


# ------------------------------------------------------------------ the stores (parent, not measured)

def eval_rows(stage, i: int) -> list[dict]:
    """The two rows a grid's eval of ``stage`` writes (identity from the plan, the extra keys a
    grid keeps: bd_digest, eval_s)."""
    none = stage.info.get("defense") == "none"
    acc = 0.80 + (i % 17) / 200
    out = []
    for split in ("test", "val"):
        r = {**stage.info, "split": split, "acc": acc, "asr": 0.95 if none else 0.05 + (i % 7) / 100,
             "ra": 0.05 if none else 0.7, "der": 0.5 if none else 0.93, "bd_acc": acc if none else 0.85,
             "bd_asr": 0.95, "bd_ra": 0.05 if none else 0.04, "wall_s": 3.0, "device": "cpu",
             "bd_digest": f"{i:064x}", "eval_s": 1.5}
        out.append(r)
    return out


def write_store(d: Path, rows: int) -> None:
    """``rows`` result rows of the planned grid's evals under ``d``: one ``write_stage`` per eval up
    to 100k rows, else files of ``BATCH`` rows through the writer's own pieces."""
    from grid.plan import build_plan
    from grid.spec import parse_spec
    from results import provenance
    from results.integrity import seal
    from results.schema import SCHEMA_VERSION, to_table
    from results.writer import atomic_write, write_stage

    ls, _ = parse_spec(spec_for(rows))
    evals = build_plan(ls).of_kind("eval")[: rows // 2]
    if rows <= 100_000:
        for i, s in enumerate(evals):
            write_stage(d, "eval", s.key, eval_rows(s, i))
        return
    fill = provenance.defaults()
    for b in range(0, len(evals), BATCH // 2):
        now = dt.datetime.now(dt.timezone.utc)
        batch = [{**r, **fill, "stage": "eval", "key": s.key, "schema_version": SCHEMA_VERSION, "written_at": now}
                 for i, s in enumerate(evals[b:b + BATCH // 2], start=b) for r in eval_rows(s, i)]
        atomic_write(d / "results" / f"eval-batch-{b:08d}.parquet", seal(to_table(batch)))


def stores(work: Path, rows: int) -> dict[str, Path]:
    """{"small": per-eval files (or batches), "compacted": as a run leaves them}, made once."""
    from results.compact import compact

    small, packed = work / f"small-{rows}", work / f"compacted-{rows}"
    if not small.exists():
        t = time.perf_counter()
        tmp = work / f".small-{rows}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_store(tmp, rows)
        tmp.rename(small)
        print(f"  (wrote {rows:,} rows in {len(list((small / 'results').iterdir())):,} files: "
              f"{time.perf_counter() - t:.0f} s)", flush=True)
    if not packed.exists():
        t = time.perf_counter()
        copy_links(small, packed)
        c = compact(packed, min_inputs=1)
        print(f"  (compacted {len(c.removed):,} files into {len(c.parts)} part(s): {time.perf_counter() - t:.0f} s)",
              flush=True)
    return {"small": small, "compacted": packed}


def copy_links(src: Path, dst: Path) -> None:
    """A copy made of hard links (compaction removes the copy's names and writes new files, so
    the original store is untouched)."""
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


# ------------------------------------------------------------------ the report

def child(what: str) -> dict | None:
    r = subprocess.run([sys.executable, __file__, "--one", what], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode:
        print(f"{what}: failed\n{r.stderr[-2000:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def line(m: dict, n: int, label: str, goal_key: tuple | None) -> str:
    goal = GOALS.get(goal_key) if goal_key else None
    txt = (f"{label:44s} cpu {m['cpu_s']:7.2f} s  wall {m['wall_s']:7.2f} s  "
           f"peak {m['peak_mb']:6.0f} MB (+{m['grow_mb']:5.0f})")
    if goal:
        sec, mb = goal
        ok = m["cpu_s"] < sec and (mb is None or m["grow_mb"] < mb)
        txt += f"  goal: < {sec:g} s CPU" + (f", < {mb} MB" if mb else "") + ("  met" if ok else "  NOT met")
    return txt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="1000,10000,100000", help="planner sizes (comma-separated; 1000000 too)")
    ap.add_argument("--rows", default="10000,100000", help="table/plot sizes in result rows (1000000 too)")
    ap.add_argument("--dry-run", type=int, default=100_000, help="stages of the dry run over its evals' results (0: skip)")
    ap.add_argument("--work", help="where the stores are written (kept; reused when there); default: a temp folder")
    ap.add_argument("--compacted-only", action="store_true", help="skip the per-eval worst case (minutes each)")
    ap.add_argument("--json", help="also write the measurements here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # the child process: one measurement, as JSON on stdout
        kind, *args = a.one.split(":")
        fn = {"plan": lambda: one_plan(int(args[0])), "table": lambda: one_table(args[0]),
              "plot": lambda: one_plot(args[0]), "dry": lambda: one_dry(int(args[0]), args[1])}[kind]
        print(json.dumps(fn()))
        return
    from _common import machine

    print(machine())
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; CPU s = the measured process, all threads")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bdgrid-scale-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    work.mkdir(parents=True, exist_ok=True)
    out = []
    try:
        for n in (int(x) for x in a.stages.split(",") if x):
            m = child(f"plan:{n}")
            if m:
                print(line(m, n, f"validate+plan {m['n']:>9,} stages", ("validate+plan", n)))
                print(f"{'  + the torch import before it':44s} cpu {m['torch_cpu_s'] + m['cpu_s']:7.2f} s  "
                      f"wall {m['torch_wall_s'] + m['wall_s']:7.2f} s")
                out.append(m)
        if a.dry_run:
            rows = a.dry_run  # a plan of N stages has N/2 evals: N result rows
            for layout, d in stores(work, rows).items():
                if a.compacted_only and layout != "compacted":
                    continue
                m = child(f"dry:{a.dry_run}:{d}")
                if m:
                    label = f"dry run {a.dry_run:,} stages, {rows // 2:,} evals done, {layout}"
                    print(line(m, a.dry_run, label, ("dry run", a.dry_run) if layout == "compacted" else None))
                    out.append({**m, "n": a.dry_run, "layout": layout})
        for rows in (int(x) for x in a.rows.split(",") if x):
            st = stores(work, rows)
            for kind in ("table", "plot"):
                for layout in ("compacted",) if a.compacted_only else ("compacted", "small"):
                    d = st[layout]
                    if layout == "small":  # the first call compacts: measure it on a copy
                        d = work / f"copy-{rows}"
                        shutil.rmtree(d, ignore_errors=True)
                        copy_links(st["small"], d)
                    m = child(f"{kind}:{d}")
                    files = "1,000 files of 1,000 rows" if rows > 100_000 else f"{rows // 2:,} per-eval files"
                    what = "compacted parts" if layout == "compacted" else f"{files}, first call"
                    if m:
                        print(line(m, rows, f"{kind} {rows:>9,} rows, {what}",
                                   (kind, rows) if layout == "compacted" else None))
                        out.append({**m, "n": rows, "layout": layout})
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
