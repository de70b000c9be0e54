"""What checking result integrity costs when a run of 1,000 result files is read.

Writes ``--files`` result files as a grid's eval stages write them (two rows each, test and
val, with the defense's diagnostics in ``extra``) with ``results.write_stage``, then reads the
folder with ``results.reader.load_checked`` with the check on (sha256 of every file's bytes and
the row invariants) and off (as bdgrid read before the check), alternating on/off for
``--repeats`` rounds in one process, page cache warm (the first read of each side is discarded).
Reports CPU and wall seconds per read: median and spread (min..max), and the on/off ratio of
the medians. Run with ``OMP_NUM_THREADS=1`` beside whatever else the machine does; the ratio is
the number to compare, the seconds depend on the machine.

    OMP_NUM_THREADS=1 .venv/bin/python bench/integrity_cost.py [--files 1000] [--repeats 9] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/x.py` from anywhere


def make_run(out: Path, n: int) -> int:
    """``n`` eval result files like a grid's; returns their total size in bytes."""
    import results

    attacks = ["badnets", "blended", "wanet", "inputaware", "lf", "sig", "ssba", "trojannn", "bpp", "lc"]
    defenses = ["none", "ft", "fp", "nad", "anp", "clp", "ibau", "rnp", "ftsam", "tsbd"]
    for i in range(n):
        a, d, seed = attacks[i % 10], defenses[(i // 10) % 10], i // 100
        acc, bd = 0.80 + (i % 17) / 1000, 0.90 - (i % 13) / 1000
        rows = []
        for split in ("test", "val"):
            r = dict(grid="bench", dataset="cifar10", arch="preact_resnet18", attack=a, attack_params={"size": 3},
                     pratio=0.1, target=0, seed=seed, defense=d, params={"n": 0.1} if d != "none" else {},
                     split=split, acc=acc if d != "none" else bd, asr=0.05 if d != "none" else 0.97,
                     ra=0.8 if d != "none" else 0.02, der=0.9 if d != "none" else 0.5, bd_acc=bd, bd_asr=0.97,
                     bd_ra=0.02, spec_hash="0" * 64, device="cuda", wall_s=120.0, peak_mem_mb=2048.0,
                     diagnostics={"unlearn_epochs": 7, "threshold": None, "warnings": []})
            rows.append(r)
        results.write_stage(out, "eval", f"{i:064x}", rows)
    return sum(p.stat().st_size for p in (out / "results").glob("*.parquet"))


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    from results.reader import load_checked

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        size = make_run(out, a.files)
        write_s = time.perf_counter() - t0
        n_rows = {}

        def read(check: bool):
            tbl, report = load_checked(out, check=check)
            assert not report.damaged
            n_rows[check] = tbl.num_rows

        read(True), read(False)  # warm the page cache and imports; not counted
        res = {True: {"cpu": [], "wall": []}, False: {"cpu": [], "wall": []}}
        for r in range(a.repeats):
            for check in ((True, False) if r % 2 == 0 else (False, True)):  # alternate which goes first
                cpu, wall = timed(lambda: read(check))
                res[check]["cpu"].append(cpu)
                res[check]["wall"].append(wall)
    assert n_rows[True] == n_rows[False] == 2 * a.files
    on = {k: summary(v) for k, v in res[True].items()}
    off = {k: summary(v) for k, v in res[False].items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, python {platform.python_version()}",
        "files": a.files, "bytes": size, "rows": n_rows[True], "repeats": a.repeats, "write_s": write_s,
        "check_on": on, "check_off": off,
        "ratio_wall": on["wall"]["median"] / off["wall"]["median"],
        "ratio_cpu": on["cpu"]["median"] / off["cpu"]["median"],
        "added_wall_s": on["wall"]["median"] - off["wall"]["median"],
        "added_cpu_s": on["cpu"]["median"] - off["cpu"]["median"],
    }
    print(report["machine"])
    print(f"{a.files} result files, {size / 1e6:.1f} MB, {n_rows[True]} rows; {a.repeats} reads per side, alternating")
    for name, s in (("check on ", on), ("check off", off)):
        print(f"{name}: wall {s['wall']['median']:.3f} s ({s['wall']['min']:.3f}..{s['wall']['max']:.3f}), "
              f"CPU {s['cpu']['median']:.3f} s ({s['cpu']['min']:.3f}..{s['cpu']['max']:.3f})")
    print(f"RATIO on/off: wall {report['ratio_wall']:.2f}, CPU {report['ratio_cpu']:.2f}; "
          f"the check adds {report['added_wall_s']:.3f} s wall, {report['added_cpu_s']:.3f} s CPU per read")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
