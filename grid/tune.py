"""Optuna tuning of defense hyperparameters, trials run as Ray tasks, objectives on the validation split.

Shape (Optuna's ask/tell, the driver owns the study; Ray runs the work)::

    spec -> storage (journal file | RDB URL) -> study (load_if_exists: a rerun resumes)
         -> recover trials left RUNNING by a dead driver (FAIL them, re-enqueue their params)
         -> per cell: backdoored model (cached checkpoint, trained as a Ray task if missing)
                      + TuneInputs: model, defender's clean subset, VALIDATION split only
         -> loop: ask up to `parallelism` trials; per trial and cell a Ray task
                  (defense's prepare() once per cell and distinct shared-param values, as a
                  Ray task whose ObjectRef every trial that needs it receives); tell the mean
                  over cells of the objectives
         -> best params / Pareto set -> best.yaml (for a grid spec's `params_from:`),
            one Parquet row per trial and cell (table "trials", split "val", tuned_on)

No test leakage: the only data a trial task receives is ``TuneInputs`` (defender subset +
validation split + the validation part of the backdoor test set). The reported test split is
read only by ``evaluate_on_test``, which is run after tuning, for the report.

Resume: every trial this driver asks carries a ``bdgrid_owner`` user attribute (host, pid, process
start time) and a heartbeat. A rerun fails the RUNNING trials whose owner process is gone (same
host) or whose heartbeat is older than ``stale_after_s`` (other hosts) and re-enqueues their
parameters. COMPLETE trials are never touched; a trial is told only by the driver that asked it,
so none is counted twice. Journal storage appends under a file lock, so two drivers on one
journal file (or any number on one RDB) lose no trial.

This module is the driver; beside it: ``tune_tasks`` (what a trial may read, the Ray task
functions), ``tune_study`` (storage, sampler, resume), ``tune_best`` (choosing, best.yaml),
``tune_spec`` (the spec), ``tune_grid`` (models from a grid's artifact store).

Sources: Optuna ask/tell interface (optuna.readthedocs.io, "Ask-and-Tell Interface"), Ray tasks
and ``ray.wait`` (docs.ray.io, "Tasks", "Pattern: using ray.wait to limit pending tasks").
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

import results
from grid.plugins import require_plugins
from grid.tune_best import write_best
from grid.tune_spec import Cell, TuneSpec, distribution
from grid.tune_study import HEARTBEAT_ATTR, OWNER_ATTR, counts, open_study, owner_id, recover
from grid.tune_tasks import build_inputs, final_cell, prepare_cell, remote, train_cell, trial_cell

log = logging.getLogger("bdgrid.tune")

HEARTBEAT_EVERY_S = 30.0


def init_ray(address: str | None = None) -> bool:
    """Local Ray bound to loopback, or join ``address`` with a fast failure when it is dead
    (the grid runner's ``connect``); True when we started it."""
    from grid.run import connect

    return connect(address)


# ============================================================================ models

def model_path(spec: TuneSpec, cell: Cell) -> Path:
    return spec.out_dir() / "models" / f"{cell.key()}.pt"


def ensure_models(spec: TuneSpec, cells: list[Cell], log_fn=log.info) -> dict[str, dict]:
    """The backdoored model of every cell: loaded from its checkpoint, or trained (Ray tasks,
    in parallel) and saved atomically."""
    import ray

    if spec.grid:  # the grid's artifact store, trained by the grid runner when missing
        from grid import tune_grid

        return tune_grid.models(spec.grid, cells, spec.grid_out, spec.artifacts, log_fn)
    states, pending = {}, {}
    for c in cells:
        p = model_path(spec, c)
        if c.key() in states or c.key() in pending:
            continue
        if p.exists():
            states[c.key()] = torch.load(p, map_location="cpu", weights_only=True)
        else:
            log_fn(f"training backdoored model {c.label()}")
            pending[c.key()] = (c, p, remote(train_cell, spec.resources).remote(
                c.model_dump(), spec.imports, spec.resources.num_cpus, spec.device))
    for key, (c, p, ref) in pending.items():
        state, _ = ray.get(ref)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, p)  # atomic: a concurrent reader sees the old file or the whole new one
        states[key] = state
    return states


# ============================================================================ shared prepare()

class Prepared:
    """The defense's prepare() results (TSBD Stages 1a/1b), one per cell and distinct value of the
    defense's ``shared`` parameters: an ObjectRef every trial that needs it receives, and a
    checkpoint under <out>/prepared/ (torch.save; read back with weights_only=True) so a resumed
    study or the final evaluation does not compute it again."""

    def __init__(self, spec: TuneSpec, entry, log_fn: Callable[[str], None] = log.info):
        self.spec, self.entry, self.log = spec, entry, log_fn
        self.fn, self.shared = entry.meta.get("prepare"), tuple(entry.meta.get("shared", ()))
        self.refs: dict[str, Any] = {}
        self.computed = 0  # prepare() tasks launched by this driver

    def key(self, cell: Cell, params: dict) -> str:
        import hashlib

        full = _full_params(self.entry, params)
        blob = json.dumps({k: full.get(k) for k in self.shared}, sort_keys=True, default=str)
        return f"{cell.key()}-{hashlib.sha256(f'{self.spec.defense}|{blob}'.encode()).hexdigest()[:12]}"

    def path(self, key: str) -> Path:
        return self.spec.out_dir() / "prepared" / f"{key}.pt"

    def ref(self, cell: Cell, params: dict, inputs_ref):
        """ObjectRef of the prepare() result for this cell and params, or None if the defense has none."""
        import ray

        if self.fn is None:
            return None
        k = self.key(cell, params)
        if k not in self.refs:
            p = self.path(k)
            if p.exists():
                self.refs[k] = ray.put(torch.load(p, map_location="cpu", weights_only=True))
            else:
                res = self.spec.resources
                self.log(f"{self.spec.defense}: shared stages (prepare) on {cell.label()}; the trials reuse them")
                self.refs[k] = remote(prepare_cell, res).remote(inputs_ref, self.spec.defense, params,
                                                                self.spec.imports, res.num_cpus, self.spec.device)
                self.computed += 1
        return self.refs[k]

    def save_ready(self) -> None:
        """Checkpoint every finished prepare() result not yet on disk (atomic rename)."""
        import ray

        for k, r in self.refs.items():
            p = self.path(k)
            if p.exists() or not ray.wait([r], timeout=0)[0]:
                continue
            try:
                val = ray.get(r)
            except Exception:  # a failing prepare fails its trials; nothing to keep
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(f".{os.getpid()}.tmp")
            torch.save(val, tmp)
            os.replace(tmp, p)


# ============================================================================ the driver loop

def _full_params(entry, params: dict) -> dict:
    p = entry.make_params(params)
    return dataclasses.asdict(p) if p is not None else {}


def run_study(spec: TuneSpec, address: str | None = None, log_fn: Callable[[str], None] = log.info) -> dict:
    """Run (or resume) the study until it has ``spec.n_trials`` COMPLETE trials."""
    import ray
    from defense.methods import DEFENSES
    from optuna.trial import TrialState

    require_plugins(spec.imports)
    out = spec.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(spec)
    recovered = recover(study, spec.stale_after_s)
    if recovered:
        log_fn(f"resumed: failed and re-enqueued trials {recovered} left running by a dead driver")
    init_ray(address)
    cells = spec.cells()
    states = ensure_models(spec, cells, log_fn)
    inputs = {c.key(): ray.put(build_inputs(c, states[c.key()])) for c in cells}

    entry = DEFENSES.get(spec.defense)
    dists = {n: distribution(d) for n, d in spec.space.items()}
    res, me = spec.resources, owner_id()
    prepared = Prepared(spec, entry, log_fn)
    inflight: dict[int, tuple] = {}  # trial number -> (trial, {cell key: ref})
    told, failed = [], []
    max_fail = spec.max_failures if spec.max_failures is not None else spec.n_trials
    last_beat = time.time()
    while True:
        c = counts(study)
        running_elsewhere = c["running"] - len(inflight)
        while (len(inflight) < spec.parallelism and len(failed) < max_fail
               and c["complete"] + running_elsewhere + len(inflight) < spec.n_trials):
            trial = study.ask(dists)
            study._storage.set_trial_user_attr(trial._trial_id, OWNER_ATTR, me)
            study._storage.set_trial_user_attr(trial._trial_id, HEARTBEAT_ATTR, time.time())
            params = {**spec.params, **trial.params}
            refs = {}
            for cell in cells:
                pref = prepared.ref(cell, params, inputs[cell.key()])
                refs[cell.key()] = remote(trial_cell, res).remote(
                    inputs[cell.key()], spec.defense, params, pref, spec.imports, res.num_cpus, spec.device)
            inflight[trial.number] = (trial, refs)
        if not inflight:
            break
        all_refs = [r for _, refs in inflight.values() for r in refs.values()]
        ray.wait(all_refs, num_returns=1, timeout=HEARTBEAT_EVERY_S)
        prepared.save_ready()
        if time.time() - last_beat > HEARTBEAT_EVERY_S:
            for trial, _ in inflight.values():
                study._storage.set_trial_user_attr(trial._trial_id, HEARTBEAT_ATTR, time.time())
            last_beat = time.time()
        for number in list(inflight):
            trial, refs = inflight[number]
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
            if len(ready) < len(refs):
                continue
            del inflight[number]
            try:
                per_cell = {k: ray.get(r) for k, r in refs.items()}
            except Exception as e:  # the defense raised for these parameters: a failed trial
                study._storage.set_trial_user_attr(trial._trial_id, "bdgrid_fail_reason", repr(e)[:2000])
                study.tell(trial, state=TrialState.FAIL)
                failed.append(number)
                log_fn(f"trial {number} failed: {e!r}"[:500])
                continue
            values = [sum(m[o] for m in per_cell.values()) / len(per_cell) for o in spec.objectives]
            for cell in cells:
                trial.set_user_attr(f"cell:{cell.label()}", per_cell[cell.key()])
            trial.set_user_attr("der", sum(m["der"] for m in per_cell.values()) / len(per_cell))
            study.tell(trial, values)
            told.append(number)
            write_trial_rows(spec, trial, values, cells, per_cell)
            log_fn(f"trial {number}: {dict(zip(spec.objectives, [round(v, 4) for v in values]))} "
                   f"params {trial.params}")
    c = counts(study)
    summary = {"study": spec.study, "storage": spec.storage_url(), "told": told, "failed": failed,
               "recovered": recovered, "n_prepare": prepared.computed, "counts": c}
    if c["complete"]:
        summary["best"] = str(write_best(spec, study))
    return summary


# ============================================================================ outputs


# ============================================================================ outputs

def _row(spec: TuneSpec, cell: Cell, params: dict, metrics: dict, split: str, stage: str) -> dict:
    return {"grid": f"tune:{spec.study}", "dataset": cell.dataset, "arch": cell.arch, "attack": cell.attack,
            "attack_params": cell.attack_params, "pratio": cell.pratio, "target": cell.target, "seed": cell.seed,
            "defense": spec.defense, "params": params, "split": split,
            "tuned_on": ",".join(sorted({c.attack for c in spec.cells()})), **metrics}


def write_trial_rows(spec: TuneSpec, trial, values: list[float], cells: list[Cell], per_cell: dict) -> None:
    """One Parquet row per (trial, cell) in table "trials", split "val"."""
    params = {**spec.params, **trial.params}
    for cell in cells:
        row = _row(spec, cell, params, per_cell[cell.key()], "val", "tune-trial")
        row.update({"study": spec.study, "trial": trial.number, "cell": cell.label(),
                    "values": dict(zip(spec.objectives, [float(v) for v in values]))})
        results.write_stage(spec.out_dir(), "tune-trial", f"{_study_key(spec)}-{trial.number:05d}-{cell.key()[:8]}",
                            [row], table="trials")


def _study_key(spec: TuneSpec) -> str:
    import hashlib

    return hashlib.sha256(f"{spec.study}|{spec.storage_url()}".encode()).hexdigest()[:12]


def evaluate_on_test(spec: TuneSpec, params_sets: dict[str, dict], which=("tune_on", "report_on"),
                     address: str | None = None) -> list[dict]:
    """After tuning: each named parameter set (e.g. default, tuned) on every cell, scored on the
    REPORTED test split; rows also go to the results table with ``tuned_on``."""
    import ray

    from defense.methods import DEFENSES

    require_plugins(spec.imports)
    init_ray(address)
    cells = [c for w in which for c in spec.cells(w)]
    states = ensure_models(spec, cells)
    prepared = Prepared(spec, DEFENSES.get(spec.defense))
    inputs = {}
    jobs = []
    for name, params in params_sets.items():
        for c in cells:
            pref = None
            if prepared.fn is not None:  # prepare() reads the model and the defender's data only
                if c.key() not in inputs:
                    inputs[c.key()] = ray.put(build_inputs(c, states[c.key()]))
                pref = prepared.ref(c, params, inputs[c.key()])
            jobs.append((name, params, c, remote(final_cell, spec.resources).remote(
                c.model_dump(), states[c.key()], spec.defense, params, pref, spec.imports, spec.resources.num_cpus,
                spec.device)))
    rows = []
    for name, params, c, ref in jobs:
        m = ray.get(ref)
        row = _row(spec, c, params, m, "test", f"tune-final-{name}")
        if name == "default":
            row["tuned_on"] = None
        row.update({"params_set": name, "cell": c.label(),
                    "tuned": c.label() in spec.tuned_on()})
        key = f"{_study_key(spec)}-{name}-{c.key()[:8]}"
        results.write_stage(spec.out_dir(), f"tune-final-{name}", key, [row], table="results")
        rows.append(row)
    prepared.save_ready()
    return rows


def write_plots(spec: TuneSpec, study=None) -> list[Path]:
    """PNG plots under <out>/plots: optimisation history and parameter importance per objective
    (optuna.visualization.matplotlib), and the Pareto front for two objectives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    study = study or open_study(spec)
    d = spec.out_dir() / "plots"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    complete = [t for t in study.trials if t.values is not None]
    for i, o in enumerate(spec.objectives):
        target = (lambda t, i=i: t.values[i]) if len(spec.objectives) > 1 else None
        ax = ovm.plot_optimization_history(study, target=target, target_name=o)
        paths.append(d / f"history-{o}.png")
        ax.figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        if len(complete) >= 2 and len(spec.space) >= 1:
            try:
                ax = ovm.plot_param_importances(study, target=target, target_name=o)
            except (RuntimeError, ValueError) as e:  # e.g. every trial with the same value
                log.warning("no parameter importance for %s: %s", o, e)
                continue
            paths.append(d / f"importance-{o}.png")
            ax.figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
    if len(spec.objectives) == 2 and complete:
        ax = ovm.plot_pareto_front(study, target_names=spec.objectives)
        paths.append(d / "pareto.png")
        ax.figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
    return paths
