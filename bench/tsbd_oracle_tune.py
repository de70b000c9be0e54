"""The ``n: auto`` table's oracle through ``bdgrid tune`` itself (issue 20).

bench/tsbd_auto_table.py reads its oracle off the recorded ladder: the rung with the lowest
validation ASR among those within 5 validation ACC points of the original. This script asks
``bdgrid tune`` the same question for the same models: per (dataset, attack, defender seed) one
study over TSBD's ``n`` (``sampler: grid`` over the reference's 11 values, ``holdout: 0.2`` as
the ladder's rungs, ``objectives: [asr]``, ``select: asr``, ``max_acc_drop: 0.05`` at tune's
default 95% confidence), on the table's cached model imported as a ``models:`` checkpoint with
that defender seed. It records tune's choice beside the ladder's, and whether tune's validation
numbers for each n equal the recorded rung's (the same model: same Dc, holdout and seed).

    python bench/tsbd_oracle_tune.py --cells synthetic:badnets:0,synthetic:blended:0 --threads 2 \\
        --root /tmp/bdgrid-auto-t2 --ladder bench/records/tsbd_auto_fixtures.jsonl \\
        --record bench/records/tsbd_oracle_tune.jsonl
    python bench/tsbd_oracle_tune.py --table bench/records/tsbd_oracle_tune.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import yaml

from defense.methods.tsbd import TSBDParams
from tsbd_auto_table import oracle

HERE = Path(__file__).resolve().parent
LADDER = list(TSBDParams().auto_ladder)
DATASETS = {"synthetic": {"name": "synthetic", "params": {"n_train": 4000, "n_test": 1000}}}


def spec_for(dataset: str, attack: str, seed: int, root: Path, threads: int = 2) -> dict:
    """One tune spec: the table's cached model of (dataset, attack) as a checkpoint cell with
    defender seed ``seed``; n over the ladder; everything else as the table's rungs."""
    ds = DATASETS.get(dataset) or {"name": "mnist", "root": str(root / "mnistfmt")}
    label = f"{dataset}-{attack}-s{seed}"
    return {
        "name": label,
        "models": [{"checkpoint": str(root / f"model_{dataset}_{attack}.pt"), "arch": "tiny_cnn",
                    "dataset": ds["name"], "attack": attack, "pratio": 0.1, "seed": seed, "label": label}],
        "datasets": [ds],
        "defender_ratio": 0.125,  # 500 defender images, as the table
        "val_ratio": 0.2,
        # a stage's torch threads are its cpus (grid.stages): the ladder's recording's threads
        "resources": {k: {"cpus": threads} for k in ("prepare", "defense", "eval")},
        "tune": {
            "defense": "tsbd",
            "params": {"un_threshold": 0.2, "holdout": 0.2},
            "space": {"n": {"type": "categorical", "choices": LADDER}},
            "objectives": ["asr"], "select": "asr", "max_acc_drop": 0.05,
            "sampler": "grid", "n_trials": len(LADDER), "parallelism": 1, "seed": 0,
            "default_first": False, "tune_on": [{"model": label}],
        },
    }


def run_cell(dataset: str, attack: str, seed: int, root: Path, work: Path, threads: int) -> dict:
    spec = spec_for(dataset, attack, seed, root, threads)
    path = work / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = work / spec["name"]
    proc = subprocess.run([sys.executable, "-m", "grid", "tune", str(path), "--out", str(out), "-q", "--json"],
                          capture_output=True, text=True, cwd=HERE.parent, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    best = yaml.safe_load((out / "tune" / spec["name"] / "best.yaml").read_text())
    import optuna
    from grid.tune.study import open_storage

    study = optuna.load_study(study_name=spec["name"], storage=open_storage(str(out / "tune" / spec["name"] / "optuna.journal")))
    trials = {float(t.params["n"]): t.user_attrs.get("stats") for t in study.get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.COMPLETE}
    return {"tune_n": float(best["params"]["n"]), "acc_drop": best["acc_drop"], "acc_drop_upper": best["acc_drop_upper"],
            "warnings": best["warnings"], "trials": trials}


def ladder_rows(path: Path, dataset: str, attack: str, seed: int) -> tuple[dict, dict]:
    """The recorded rungs of one cell by n, and its "before" row."""
    rows = [r for r in map(json.loads, filter(str.strip, path.read_text().splitlines()))
            if (r["dataset"], r["attack"], r["seed"]) == (dataset, attack, seed)]
    return {r["n"]: r for r in rows if r["kind"] == "rung"}, next(r for r in rows if r["kind"] == "before")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="synthetic:badnets:0,synthetic:blended:0", help="dataset:attack:seed,...")
    ap.add_argument("--record", help="append one JSON line per cell here")
    ap.add_argument("--table", help="print the comparison from this JSONL")
    ap.add_argument("--ladder", default=str(HERE / "records" / "tsbd_auto.jsonl"), help="tsbd_auto_table.py's record")
    ap.add_argument("--root", default=os.environ.get("BDGRID_MEASURE", str(Path(tempfile.gettempdir()) / "bdgrid-auto")),
                    help="tsbd_auto_table.py's --root (its cached models)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per stage: those of the ladder's recording")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bdgrid-oracle-tune"))
    a = ap.parse_args()
    if a.table:
        print("| dataset | attack | seed | ladder oracle n (val drop) | bdgrid tune n (val drop, 95% upper) | "
              "tune's val ASR/ACC = the rung's |")
        print("|---|---|---|---|---|---|")
        for line in Path(a.table).read_text().splitlines():
            r = json.loads(line)
            print(f"| {r['dataset']} | {r['attack']} | {r['seed']} | {r['ladder_oracle_n']} ({100 * r['ladder_oracle_drop']:.1f}) | "
                  f"{r['tune_n']} ({100 * r['acc_drop']:.1f}, {100 * r['acc_drop_upper']:.1f}) | "
                  f"{r['same_as_rungs']} of {r['compared']} n |")
        return
    if not a.record:
        raise SystemExit("give --record OUT.jsonl (run) or --table OUT.jsonl (print)")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for cell in a.cells.split(","):
        dataset, attack, seed = cell.split(":")
        seed = int(seed)
        got = run_cell(dataset, attack, seed, Path(a.root), work, a.threads)
        if "error" in got:
            print(f"{cell}: bdgrid tune failed:\n{got['error']}", file=sys.stderr)
            continue
        rungs, before = ladder_rows(Path(a.ladder), dataset, attack, seed)
        v0 = before["val"]["acc"]
        orc = oracle(list(rungs.values()), v0)
        same = [n for n, st in got["trials"].items() if n in rungs and st
                and abs(st["acc"] - rungs[n]["val"]["acc"]) < 1e-9 and abs(st["asr"] - rungs[n]["val"]["asr"]) < 1e-9]
        row = {"dataset": dataset, "attack": attack, "seed": seed, "tune_n": got["tune_n"], "acc_drop": got["acc_drop"],
               "acc_drop_upper": got["acc_drop_upper"], "warnings": got["warnings"],
               "tune_test": rungs.get(got["tune_n"], {}).get("test"),
               "ladder_oracle_n": orc and orc["n"], "ladder_oracle_drop": orc and v0 - orc["val"]["acc"],
               "compared": len([n for n in got["trials"] if n in rungs]), "same_as_rungs": len(same),
               "trials": got["trials"]}
        line = json.dumps(row, default=lambda v: round(v, 5) if isinstance(v, float) else str(v))
        print(line, flush=True)
        with open(a.record, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
