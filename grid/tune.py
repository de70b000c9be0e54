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

Sources: Optuna ask/tell interface (optuna.readthedocs.io, "Ask-and-Tell Interface"),
``JournalStorage(JournalFileBackend(path))`` and ``RDBStorage`` (Optuna storages reference),
Ray tasks and ``ray.wait`` (docs.ray.io, "Tasks", "Pattern: using ray.wait to limit pending tasks").
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from grid.tune_spec import Cell, TuneSpec, distribution, grid_values

log = logging.getLogger("bdgrid.tune")

OWNER_ATTR = "bdgrid_owner"
HEARTBEAT_ATTR = "bdgrid_heartbeat"
HEARTBEAT_EVERY_S = 30.0


# ============================================================================ inputs of a trial

@dataclass
class TuneInputs:
    """Everything a trial task may read for one cell. Deliberately no reported-test data."""

    label: str
    key: str
    arch: str
    num_classes: int
    channels: int
    size: int
    state: dict  # backdoored model's state_dict (CPU)
    clean: Any  # defense.data.Data: the defender's clean subset of the training set
    val: Any  # Data: validation split of the clean test set
    val_bd: Any  # Data: backdoor test images whose source image is in the validation split
    val_bd_true: torch.Tensor
    val_idx: torch.Tensor  # indices into the original test set (for the leakage check)
    target: int
    seed: int
    before: dict  # the backdoored model's acc/asr/ra on the validation split

    def model(self) -> torch.nn.Module:
        from defense.models import create_model

        m = create_model(self.arch, num_classes=self.num_classes, in_channels=self.channels, image_size=self.size)
        m.load_state_dict(self.state)
        return m


def trial_config(cell: Cell, device: str = "cpu"):
    from defense.trial import TrialConfig

    return TrialConfig(**{k: v for k, v in cell.model_dump().items()}, device=device)


def build_inputs(cell: Cell, state: dict) -> TuneInputs:
    """Cut the validation inputs of a cell. The test set is loaded whole (the backdoor test
    set is built from it), but only its validation indices are copied into the result."""
    from defense.data.splits import defender_subset
    from defense.metrics import attack_metrics
    from defense.trial import load_splits, make_poisoned, split_backdoor

    cfg = trial_config(cell)
    train_set, test_set, val_idx, test_idx = load_splits(cfg)
    assert not set(val_idx.tolist()) & set(test_idx.tolist()), "validation and reported test split overlap"
    poisoned = make_poisoned(cfg, train_set, test_set)
    info = train_set.info
    inp = TuneInputs(cell.label(), cell.key(), cell.arch, info.num_classes, info.channels, info.size, state,
                     clean=defender_subset(train_set, cell.defender_ratio, cell.seed)[0],
                     val=test_set.subset(val_idx), val_bd=None, val_bd_true=None, val_idx=val_idx.clone(),
                     target=cell.target, seed=cell.seed, before={})
    model = inp.model().eval()
    inp.val_bd, inp.val_bd_true = split_backdoor(poisoned, model, val_idx)
    inp.before = attack_metrics(model, inp.val, inp.val_bd, inp.val_bd_true, cell.target)
    return inp


# ============================================================================ Ray tasks

def _setup_worker(imports: list[str], threads: float) -> None:
    """In a Ray worker: register the spec's extra modules, use as many torch threads as CPUs asked."""
    for m in imports:
        importlib.import_module(m)
    torch.set_num_threads(max(1, int(threads)))


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def train_cell(cell_dict: dict, imports: list[str], threads: float, device: str) -> tuple[dict, list]:
    """Train a cell's backdoored model; return its CPU state_dict and training history."""
    from defense.trial import load_splits, make_poisoned, train_backdoored

    _setup_worker(imports, threads)
    cfg = trial_config(Cell(**cell_dict), device=device)
    train_set, test_set, _, _ = load_splits(cfg)
    model, hist = train_backdoored(cfg, make_poisoned(cfg, train_set, test_set))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, hist


def prepare_cell(inp: TuneInputs, defense: str, params: dict, imports: list[str], threads: float, device: str):
    """The defense's expensive shared part (TSBD Stages 1a/1b) for one cell; CPU result."""
    from defense.methods import DEFENSES, DefenseContext
    from defense.train import pick_device

    _setup_worker(imports, threads)
    dev = pick_device(device)
    entry = DEFENSES.get(defense)
    ctx = DefenseContext(device=dev, seed=inp.seed)
    out = entry.meta["prepare"](inp.model().to(dev), inp.clean.to(dev), entry.make_params(params), ctx)
    return _to(out, "cpu")


def trial_cell(inp: TuneInputs, defense: str, params: dict, prepared, imports: list[str], threads: float,
               device: str) -> dict:
    """One trial on one cell: defend, then score on the validation split only."""
    from defense.methods import DefenseContext, run_defense
    from defense.metrics import attack_metrics, der
    from defense.train import pick_device

    _setup_worker(imports, threads)
    dev = pick_device(device)
    t0 = time.perf_counter()
    ctx = DefenseContext(device=dev, seed=inp.seed, prepared=_to(prepared, dev))
    res = run_defense(defense, inp.model().to(dev), inp.clean.to(dev), params, ctx)
    m = attack_metrics(res.model, inp.val.to(dev), inp.val_bd.to(dev), inp.val_bd_true.to(dev), inp.target)
    m["der"] = der(inp.before["acc"], inp.before["asr"], m["acc"], m["asr"])
    return {**m, "bd_acc": inp.before["acc"], "bd_asr": inp.before["asr"], "bd_ra": inp.before["ra"],
            "wall_s": time.perf_counter() - t0, "device": str(dev)}


def final_cell(cell_dict: dict, state: dict, defense: str, params: dict, prepared, imports: list[str],
               threads: float, device: str) -> dict:
    """Reporting only (after tuning): defend with ``params`` and score on the REPORTED test split."""
    from defense.data.splits import defender_subset
    from defense.methods import DefenseContext, run_defense
    from defense.metrics import der
    from defense.trial import evaluate, load_splits, make_poisoned

    _setup_worker(imports, threads)
    cell = Cell(**cell_dict)
    cfg = trial_config(cell, device=device)
    from defense.train import pick_device

    dev = pick_device(device)
    train_set, test_set, _, test_idx = load_splits(cfg)
    poisoned = make_poisoned(cfg, train_set, test_set)
    inp = TuneInputs(cell.label(), cell.key(), cell.arch, train_set.info.num_classes, train_set.info.channels,
                     train_set.info.size, state, None, None, None, None, None, cell.target, cell.seed, {})
    model = inp.model().to(dev)
    before = evaluate(model, test_set, poisoned, test_idx, cell.target, dev)
    t0 = time.perf_counter()
    clean = defender_subset(train_set, cell.defender_ratio, cell.seed)[0].to(dev)
    res = run_defense(defense, copy.deepcopy(model), clean, params,
                      DefenseContext(device=dev, seed=cell.seed, prepared=_to(prepared, dev)))
    after = evaluate(res.model, test_set, poisoned, test_idx, cell.target, dev)
    return {**after, "der": der(before["acc"], before["asr"], after["acc"], after["asr"]),
            "bd_acc": before["acc"], "bd_asr": before["asr"], "bd_ra": before["ra"],
            "wall_s": time.perf_counter() - t0, "device": str(dev)}


_REMOTE: dict[str, Any] = {}


def remote(fn: Callable, resources) -> Any:
    """``fn`` as a Ray task with the spec's resources (created once per function)."""
    import ray

    if fn.__name__ not in _REMOTE:
        _REMOTE[fn.__name__] = ray.remote(fn)
    # max_retries: re-run a task whose worker process died; exceptions are not retried (a
    # parameter that crashes the defense is a failed trial, not a flaky one).
    return _REMOTE[fn.__name__].options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=2)


def init_ray(address: str | None = None) -> bool:
    """Local Ray bound to loopback, or join ``address`` with a fast failure when it is dead
    (the grid runner's ``connect``); True when we started it."""
    from grid.run import connect

    return connect(address)


# ============================================================================ storage, study, resume

def open_storage(url: str):
    """An RDB URL (postgresql://, mysql://, sqlite:///) or else a journal file path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in url:
        # pool_pre_ping: a cluster's long-lived driver survives the database closing idle connections
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(url)))


def make_sampler(spec: TuneSpec):
    import optuna

    s = spec.sampler
    if s == "tpe":
        # constant_liar: parallel trials in flight are treated as bad results so that TPE does not
        # propose the same point `parallelism` times (Optuna docs, TPESampler).
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=min(10, max(2, spec.n_trials // 3)))
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed, population_size=max(4, min(50, spec.n_trials // 2)))
    if s == "grid":
        return _AskTellGridSampler({n: grid_values(d) for n, d in spec.space.items()}, seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)


def _grid_sampler_class():
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """GridSampler calls ``study.stop()`` once the grid is exhausted, which raises outside
        ``study.optimize``; under ask/tell the driver's ``n_trials`` bound ends the study instead
        (the tell itself is already stored when after_trial raises: Optuna's _tell.py)."""

        def after_trial(self, study, trial, state, values):
            try:
                super().after_trial(study, trial, state, values)
            except RuntimeError as e:
                if "Study.stop" not in str(e):
                    raise

    return AskTellGridSampler


def _AskTellGridSampler(*a, **kw):
    return _grid_sampler_class()(*a, **kw)


def open_study(spec: TuneSpec, storage=None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage if storage is not None else open_storage(spec.storage_url())
    study = optuna.create_study(storage=storage, study_name=spec.study, sampler=make_sampler(spec),
                                directions=spec.directions(), load_if_exists=True)
    have = [d.name.lower() for d in study.directions]
    if have != spec.directions():
        raise ValueError(f"study '{spec.study}' exists with directions {have}, the spec asks {spec.directions()}; "
                         f"use another study name")
    if "defense" not in study.user_attrs:
        study.set_user_attr("defense", spec.defense)
        study.set_user_attr("objectives", spec.objectives)
        study.set_user_attr("tuned_on", spec.tuned_on())
    elif study.user_attrs["defense"] != spec.defense:
        raise ValueError(f"study '{spec.study}' tunes {study.user_attrs['defense']}, the spec says {spec.defense}")
    return study


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, /proc/<pid>/stat field 22): tells a
    live process from a later one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie is dead, only not yet reaped


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid())}"


def owner_alive(owner: str | None) -> bool | None:
    """True/False for an owner on this host; None when it cannot be told (other host, no owner)."""
    if not owner:
        return None
    host, pid, start = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    return _proc_start(int(pid)) == start and start != "None"


def recover(study, stale_after_s: float = 900.0) -> list[int]:
    """Fail the RUNNING trials whose driver is gone and re-enqueue their parameters.
    Returns the numbers of the trials failed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage, done = study._storage, []
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        alive = owner_alive(owner)
        if alive is None:
            last = t.user_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
            alive = now - last < stale_after_s
        if alive:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "bdgrid_fail_reason", f"driver {owner} died")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (UpdateFinishedTrialError, RuntimeError):
            continue  # another driver recovered it first
        study.enqueue_trial(t.params, user_attrs={"bdgrid_retry_of": t.number})
        done.append(t.number)
    return done


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    c = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        c[t.state.name.lower()] += 1
    return c


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

    for m in spec.imports:
        importlib.import_module(m)
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

def acc_drop(trial) -> float:
    """Validation ACC lost by the defense, mean over the trial's cells (fraction)."""
    cells = [v for k, v in trial.user_attrs.items() if k.startswith("cell:")]
    return sum(c["bd_acc"] - c["acc"] for c in cells) / len(cells) if cells else 0.0


def pick_best(spec: TuneSpec, study) -> tuple[Any, list]:
    """(chosen trial, Pareto trials). Single objective: the best trial. Several: the Pareto
    front, and from it the trial with the best ``spec.select`` value (validation DER by default).
    With ``max_acc_drop``, only trials within that clean-accuracy budget are chosen from, when
    any is (else the budget is ignored and the log says so)."""
    from optuna.trial import TrialState

    def within(ts):
        if spec.max_acc_drop is None:
            return ts
        ok = [t for t in ts if acc_drop(t) <= spec.max_acc_drop + 1e-9]
        if not ok:
            log.warning(f"no trial keeps validation ACC within {spec.max_acc_drop:.3f} of the backdoored "
                        f"model's; choosing among all")
        return ok or ts

    if len(spec.objectives) == 1:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            raise ValueError(f"study '{study.study_name}' has no complete trial yet")
        sign = 1 if spec.directions()[0] == "maximize" else -1
        best = max(within(done), key=lambda t: (sign * t.values[0], -t.number))
        return best, [best]
    front = study.best_trials

    def score(t):
        if spec.select in spec.objectives:
            v = t.values[spec.objectives.index(spec.select)]
        else:
            v = t.user_attrs.get(spec.select, t.user_attrs.get("der", 0.0))
        return v if spec.select != "asr" else -v

    return max(within(front), key=lambda t: (score(t), -t.number)), front


def best_doc(spec: TuneSpec, study) -> dict:
    best, front = pick_best(spec, study)
    attacks = sorted({c.attack for c in spec.cells()})
    return {
        "defense": spec.defense,
        "params": {**spec.params, **best.params},
        "tuned_on": attacks,
        "tuned_on_cells": spec.tuned_on(),
        "study": spec.study,
        "storage": spec.storage_url(),
        "objectives": {o: spec.directions()[i] for i, o in enumerate(spec.objectives)},
        "trial": best.number,
        "values": dict(zip(spec.objectives, best.values)),
        "acc_drop": round(acc_drop(best), 6),
        "max_acc_drop": spec.max_acc_drop,
        "split": "val",
        "pareto": [{"trial": t.number, "params": {**spec.params, **t.params},
                    "values": dict(zip(spec.objectives, t.values))} for t in front],
    }


def write_best(spec: TuneSpec, study, path: Path | None = None) -> Path:
    """best.yaml: what a grid spec reads with ``params_from: <file>`` (keys defense, params)."""
    import yaml

    path = path or spec.out_dir() / "best.yaml"
    doc = best_doc(spec, study)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("# written by `bdgrid tune`; chosen on the validation split\n"
                   + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    os.replace(tmp, path)
    return path


def load_best(path: str | Path) -> dict:
    """Read a best.yaml back (``params_from``): returns {defense, params, tuned_on, ...}."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or "defense" not in doc or not isinstance(doc.get("params"), dict):
        raise ValueError(f"{path}: not a bdgrid tune result (needs 'defense' and a 'params' mapping)")
    return doc


def _row(spec: TuneSpec, cell: Cell, params: dict, metrics: dict, split: str, stage: str) -> dict:
    return {"grid": f"tune:{spec.study}", "dataset": cell.dataset, "arch": cell.arch, "attack": cell.attack,
            "attack_params": cell.attack_params, "pratio": cell.pratio, "target": cell.target, "seed": cell.seed,
            "defense": spec.defense, "params": params, "split": split,
            "tuned_on": ",".join(sorted({c.attack for c in spec.cells()})), **metrics}


def write_rows(out: Path, stage: str, key: str, rows: list[dict], table: str) -> None:
    import results

    try:
        results.write_stage(out, stage, key, rows, table=table)
    except ValueError as e:
        if "unknown results table" not in str(e):
            raise
        _write_fallback(out, stage, key, rows, table)


def _write_fallback(out: Path, stage: str, key: str, rows: list[dict], table: str) -> None:
    """Until the results package names a "trials" table: the "results" layout under <out>/<table>/
    (trial number, study, cell and objective values go to its ``extra`` JSON column)."""
    import datetime as dt
    import uuid

    import pyarrow.parquet as pq
    from results.schema import SCHEMA_VERSION, to_table

    now = dt.datetime.now(dt.timezone.utc)
    tbl = to_table([{**r, "stage": stage, "key": key, "schema_version": SCHEMA_VERSION, "written_at": now}
                    for r in rows], "results")
    final = Path(out) / table / f"{stage}-{key}.parquet"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(tbl, tmp)
    os.replace(tmp, final)


def write_trial_rows(spec: TuneSpec, trial, values: list[float], cells: list[Cell], per_cell: dict) -> None:
    """One Parquet row per (trial, cell) in table "trials", split "val"."""
    params = {**spec.params, **trial.params}
    for cell in cells:
        row = _row(spec, cell, params, per_cell[cell.key()], "val", "tune-trial")
        row.update({"study": spec.study, "trial": trial.number, "cell": cell.label(),
                    "values": dict(zip(spec.objectives, [float(v) for v in values]))})
        write_rows(spec.out_dir(), "tune-trial", f"{_study_key(spec)}-{trial.number:05d}-{cell.key()[:8]}",
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

    for m in spec.imports:
        importlib.import_module(m)
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
        write_rows(spec.out_dir(), f"tune-final-{name}", key, [row], table="results")
        rows.append(row)
    prepared.save_ready()
    return rows


def report(spec: TuneSpec, study=None) -> list[Path]:
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
