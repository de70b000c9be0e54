"""The driver: a validated plan -> Ray tasks, one per stage, with resume, retries and progress.

- Resume is the default: a stage whose artifact is in the store (or, for ``eval``, whose rows
  are in ``<out>/results``) is not run again. Artifacts that will be read are checksummed
  first; a corrupt one is deleted and its stage rerun.
- Only what is needed runs: a stage runs when some ``eval`` below it is missing and its own
  output is missing; the data stage runs (in a task whose result Ray keeps in its object store,
  shared by every dependent task) only when something needs it.
- One Ray task per stage with ``num_cpus``/``num_gpus`` from the spec; a task is submitted when
  its parents have finished, with the data stage's ObjectRef as argument.
- Faults: ``max_retries`` (Ray) re-runs a task whose worker died; an exception is retried up to
  ``retries`` times by the driver, then the stage is marked failed, its traceback written to
  ``<out>/failures/<kind>-<key>.txt``, its descendants skipped, and the rest of the grid goes on.
  A stage attempt running longer than ``timeout`` seconds (counted from when it left Ray's queue)
  is cancelled and counts as a failure.
- What defenses say: the warnings a prepare/defense stage raised in its worker are printed once
  each, prefixed with the stage's label, on the run's console and appended to
  ``<out>/warnings.log``; its ``ctx.log`` lines go to ``<out>/logs/<kind>-<key>.log``.
- Progress: a rich bar (done/running/queued/failed, ETA; a task counts as running once a zero-CPU
  actor hears from it, queued before) and ``<out>/state.json`` for ``bdgrid status``.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from grid.plan import Plan, Stage, build_plan
from grid.plugins import import_plugins
from grid.spec import STAGE_KINDS, LoadedSpec
from grid.status import write_state
from grid.store import ArtifactStore

STORED = ("resource", "attack", "prepare", "defense")  # kinds whose output is an artifact


@dataclass
class RunResult:
    plan: Plan
    out: Path
    cached: set = field(default_factory=set)  # keys already done before this run
    done: set = field(default_factory=set)  # keys executed successfully in this run
    failed: dict = field(default_factory=dict)  # key -> one-line error
    skipped: set = field(default_factory=set)  # keys not run because a parent failed
    recomputed_corrupt: list = field(default_factory=list)  # keys whose artifact failed its checksum
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped


# ----------------------------------------------------------------------------- what is done

def eval_keys_done(out: Path) -> set[str]:
    import results

    df = results.load(out)
    if df.empty or "key" not in df.columns:
        return set()
    if "split" in df.columns:  # done = both split rows are there
        n = df.groupby("key")["split"].nunique()
        return set(n[n >= 2].index)
    return set(df["key"])


def needed_stages(plan: Plan, store: ArtifactStore, out: Path) -> tuple[set, set, list]:
    """(to_run, cached, corrupt): the stages to execute, those already done, and the keys whose
    artifact failed its checksum (deleted; they are in to_run)."""
    done_evals = eval_keys_done(out)
    done = set()
    for s in plan.stages.values():
        if s.kind == "eval" and s.key in done_evals:
            done.add(s.key)
        elif s.kind in STORED and store.exists(s.kind, s.key):
            done.add(s.key)
    children = plan.children()
    corrupt: list = []
    verified: set = set()
    while True:
        need: set = set()
        for key in reversed(list(plan.stages)):  # children before parents
            s = plan.stages[key]
            if key in done:
                continue
            if s.kind == "eval" or any(c in need for c in children[key]):
                need.add(key)
        # artifacts that a stage to run will read must be intact; otherwise recompute them
        bad = []
        for key in need:
            for p in plan.stages[key].parents:
                ps = plan.stages[p]
                if p in done and ps.kind in STORED and p not in verified:
                    if store.verify(ps.kind, p):
                        verified.add(p)
                    else:
                        bad.append(p)
        if not bad:
            return need, done, corrupt
        for p in set(bad):
            store.delete(plan.stages[p].kind, p)
            done.discard(p)
            corrupt.append(p)


# ----------------------------------------------------------------------------- Ray

def loopback_ip() -> str:
    """The loopback address a local Ray binds to.

    Ray 2.60 rewrites ``127.0.0.1`` and ``localhost`` to this machine's outward address on Linux
    (``ray._private.services.resolve_ip_for_localhost``), so ``_node_ip_address="127.0.0.1"``
    would still send every control-plane message over the machine's network address. Any other
    127/8 address is loopback on Linux too and Ray keeps it as given. macOS and Windows configure
    only 127.0.0.1 on loopback, and there Ray keeps 127.0.0.1 (it treats them as single-node).
    """
    return "127.0.0.2" if sys.platform.startswith("linux") else "127.0.0.1"


def connect(address: str | None, num_cpus: int | None = None, connect_timeout: float = 10.0) -> bool:
    """Start local Ray on loopback (default) or join ``address``; True when we started it (and stop it)."""
    import ray

    if address not in (None, "", "local"):
        _check_reachable(address, connect_timeout)
    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), _node_ip_address=loopback_ip(),
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
        return True
    host = _host_of(address)
    # a cluster on this machine's loopback (tests, a laptop): the driver's node is on loopback too
    local = {"_node_ip_address": host} if host.startswith("127.") else {}
    ray.init(address=address, log_to_driver=False, configure_logging=False, **local)
    return True


def _host_of(address: str) -> str:
    return address.split("://", 1)[-1].rpartition(":")[0] or address.split("://", 1)[-1]


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast on a dead cluster address instead of Ray's long connection retries."""
    if address == "auto":
        return  # Ray resolves it from RAY_ADDRESS or the local cluster file and fails at once if none
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        default = 10001 if address.startswith("ray://") else 6379
        host, port = hostport, str(default)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach a Ray cluster at {address} ({e}); is it running? "
                              f"(`ray start --head` / `ray up cluster.yaml`)") from None


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def _remote():
    import ray

    from grid import stages

    @ray.remote
    def run_stage(stage: Stage, data, store_uri: str, env: dict, started=None):
        if started is not None:  # tell the driver this stage left Ray's queue (fire and forget)
            started.mark.remote(stage.key)
        env = {**env, "node": ray.get_runtime_context().get_node_id()[:12]}
        return stages.execute(stage, data, ArtifactStore(store_uri), env)

    return run_stage


def _start_log():
    """A CPU-free actor that collects the keys of stages that began running: a submitted Ray
    task may wait for a free CPU/GPU, and the progress bar should call it queued, not running."""
    import ray

    @ray.remote(num_cpus=0)
    class StartLog:
        def __init__(self):
            self.keys: list[str] = []

        def mark(self, key: str) -> None:
            self.keys.append(key)

        def take(self) -> list[str]:
            keys, self.keys = self.keys, []
            return keys

    return StartLog.remote()


# ----------------------------------------------------------------------------- the loop

def report_said(out: Path, stage: Stage, output, console) -> None:
    """Print a stage's warnings (see ``stages._Capture``) and keep them, with its ctx.log lines,
    under ``out``: in a Ray worker they would otherwise reach only the worker's log files."""
    from rich.markup import escape

    if not isinstance(output, dict):
        return
    said = output.get("warnings") or []
    for msg in said:
        console.print(f"[yellow]warning[/] {escape(stage.label)}: {escape(msg)}", highlight=False, soft_wrap=True)
    if said:
        with open(out / "warnings.log", "a") as f:
            f.writelines(f"{stage.label}: {msg}\n" for msg in said)
    if output.get("log"):
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / f"{stage.kind}-{stage.key}.log").write_text("".join(f"{ln}\n" for ln in output["log"]))


class _Progress:
    """Live rich bar + the on-disk state, from the same counts."""

    def __init__(self, plan: Plan, out: Path, total_run: int, cached: set, show: bool, console=None):
        self.plan, self.out, self.cached, self.t0 = plan, out, cached, time.time()
        self.status = {k: ("cached" if k in cached else "pending") for k in plan.stages}
        self.failures: list = []
        self.last_write = 0.0
        self.bar = None
        if show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=console, transient=False)
            self.task = self.bar.add_task(plan.grid, total=max(total_run, 1), info="")
            self.bar.start()
        self.total_run = total_run

    def set(self, key: str, st: str, error: dict | None = None) -> None:
        self.status[key] = st
        if error:
            self.failures.append(error)
        self.update()

    def counts(self) -> dict:
        out = {k: {"total": 0, "cached": 0, "done": 0, "running": 0, "queued": 0, "pending": 0, "failed": 0,
                   "skipped": 0}
               for k in STAGE_KINDS}
        for key, st in self.status.items():
            kind = self.plan.stages[key].kind
            out[kind]["total"] += 1
            out[kind][st] += 1
        return {k: v for k, v in out.items() if v["total"]}

    def update(self, force: bool = False, finished: bool = False) -> None:
        vals = list(self.status.values())
        done, run, queued, fail, skip = (vals.count(x) for x in ("done", "running", "queued", "failed", "skipped"))
        finished_n = done + fail + skip
        el = time.time() - self.t0
        # ETA from the stages finished so far (the data stage left out: it is one quick load)
        real = sum(1 for k, v in self.status.items() if v == "done" and self.plan.stages[k].kind != "data")
        eta = el / real * (self.total_run - finished_n) if real else None
        if self.bar is not None:
            self.bar.update(self.task, completed=finished_n,
                            info=f"done {done} running {run} queued {queued} failed {fail}"
                                 + (f" skipped {skip}" if skip else ""))
        if force or finished or time.time() - self.last_write > 1.0:
            self.last_write = time.time()
            write_state(self.out, {"grid": self.plan.grid, "spec_hash": self.plan.spec_hash, "pid": os.getpid(),
                                   "started_at": self.t0, "elapsed_s": el, "eta_s": eta, "finished": finished,
                                   "cells": self.plan.cells, "counts": self.counts(), "failures": self.failures})

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def artifact_root(ls: LoadedSpec, out: Path, override: str | None = None) -> str:
    """--artifacts, else the spec's ``artifacts``, else $BDGRID_ARTIFACTS (set on cluster nodes by
    cluster.yaml), else ``<out>/artifacts``."""
    return str(override or ls.spec.artifacts or os.environ.get("BDGRID_ARTIFACTS") or Path(out).resolve() / "artifacts")


def execute_plan(ls: LoadedSpec, out: str | Path, *, artifacts: str | None = None, show_progress: bool = True,
                 console=None) -> RunResult:
    """Run every needed stage of ``ls``'s grid on the connected Ray cluster (see ``connect``)."""
    import ray
    from ray.exceptions import GetTimeoutError  # noqa: F401  (documented failure types below)

    from grid import stages

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = ls.spec
    import_plugins(spec.imports, [str(ls.base_dir.resolve())])  # validation reported any failure
    plan = build_plan(ls)
    store = ArtifactStore(artifact_root(ls, out, artifacts))
    t0 = time.time()
    need, cached, corrupt = needed_stages(plan, store, out)
    res = RunResult(plan, out, cached=cached, recomputed_corrupt=corrupt)
    env = {"out": str(out), "grid": plan.grid, "spec_hash": plan.spec_hash,
           "imports": list(spec.imports), "import_path": [str(ls.base_dir.resolve())],
           "kill_once": os.environ.get("BDGRID_TEST_KILL_ONCE"), "fail": os.environ.get("BDGRID_TEST_FAIL"),
           "kill_always": os.environ.get("BDGRID_TEST_KILL_ALWAYS"), "hang": os.environ.get("BDGRID_TEST_HANG")}
    prog = _Progress(plan, out, len(need), cached, show_progress, console)
    if console is None:  # the bar's own console when it has one, so warnings print above it
        from rich.console import Console

        console = prog.bar.console if prog.bar is not None else Console(stderr=True)
    for k in plan.stages:
        if k not in need and k not in cached:
            prog.status[k] = "cached"  # not needed: nothing below it is missing (e.g. an unused data stage)
    children = plan.children()
    run_stage = _remote()
    start_log = _start_log()
    running: dict = {}  # ObjectRef -> (key, submitted at)
    began: dict = {}  # key -> when its current attempt left Ray's queue (the timeout counts from here)
    attempts: dict = {}
    data_refs: dict = {}  # data stage key -> ObjectRef (kept while a child still needs it)
    finished: set = set(cached)

    def submit(key: str) -> None:
        s = plan.stages[key]
        data = data_refs.get(s.parents[0]) if s.parents else None
        ref = run_stage.options(num_cpus=s.cpus, num_gpus=s.gpus, max_retries=spec.retries,
                                retry_exceptions=False, name=s.label).remote(s, data, store.uri, env, start_log)
        running[ref] = (key, time.time())
        began.pop(key, None)
        prog.set(key, "queued")

    def ready(key: str) -> bool:
        s = plan.stages[key]
        return prog.status[key] == "pending" and key in need and all(
            p in finished or p not in need for p in s.parents)

    def fail(key: str, err: str, tb: str) -> None:
        fdir = out / "failures"
        fdir.mkdir(exist_ok=True)
        f = fdir / f"{plan.stages[key].kind}-{key}.txt"
        f.write_text(f"{plan.stages[key].label}\nattempts: {attempts.get(key, 0)}\n\n{tb}")
        res.failed[key] = err
        prog.set(key, "failed", {"stage": plan.stages[key].label, "error": err, "file": str(f)})
        stack = list(children[key])
        while stack:  # everything below a failed stage cannot run this time
            c = stack.pop()
            if prog.status[c] == "pending" and c in need:
                res.skipped.add(c)
                prog.set(c, "skipped")
                stack.extend(children[c])

    try:
        for key in plan.stages:
            if ready(key):
                submit(key)
        while running:
            refs = list(running)
            done_refs, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            try:
                started = {k: time.time() for k in ray.get(start_log.take.remote(), timeout=30)}
            except Exception:  # noqa: BLE001 - the actor is gone: count a stage as started when submitted
                started = {k: t for k, t in running.values() if k not in began}
            for k, t in started.items():
                if prog.status.get(k) == "queued":
                    prog.status[k] = "running"
                    began[k] = t
            now = time.time()
            if spec.timeout:  # cancel attempts that ran too long; they count as failures
                for ref in refs:
                    k = running[ref][0]
                    if ref not in done_refs and k in began and now - began[k] > spec.timeout:
                        ray.cancel(ref, force=True)
            for ref in done_refs:
                key, _ = running.pop(ref)
                t_start = began.pop(key, None)
                s = plan.stages[key]
                try:
                    output = ray.get(ref)
                    if s.kind == "eval":
                        stages.write_rows(out, s, output)
                except Exception as e:  # RayTaskError (exception in the stage), WorkerCrashedError (retries spent), cancel
                    attempts[key] = attempts.get(key, 0) + 1
                    if isinstance(e, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
                        # Ray already re-ran the dead worker's task `max_retries` times: retrying here
                        # too would multiply the attempts (1 + retries)^2
                        attempts[key] = spec.retries + 1
                    timed_out = spec.timeout and t_start is not None and time.time() - t_start > spec.timeout
                    msg = (f"timed out after {spec.timeout:g}s" if timed_out
                           else f"{type(getattr(e, 'cause', None) or e).__name__}: {str(getattr(e, 'cause', None) or e).splitlines()[0][:300] if str(getattr(e, 'cause', None) or e) else ''}")
                    if attempts[key] <= spec.retries:
                        prog.set(key, "pending")
                        submit(key)
                    else:
                        fail(key, msg, "".join(traceback.format_exception(e)))
                    continue
                finished.add(key)
                res.done.add(key)
                report_said(out, s, output, console)
                (out / "failures" / f"{s.kind}-{key}.txt").unlink(missing_ok=True)
                if s.kind == "data":
                    data_refs[key] = ref
                prog.set(key, "done")
                for c in children[key]:
                    if ready(c):
                        submit(c)
                # free a dataset from the object store once nothing left needs it
                for dk in list(data_refs):
                    if all(prog.status[c] in ("done", "failed", "skipped", "cached") for c in children[dk]):
                        del data_refs[dk]
            prog.update()
    finally:
        res.wall_s = time.time() - t0
        prog.update(finished=not running, force=True)
        prog.stop()
        try:
            ray.kill(start_log)
        except Exception:  # noqa: BLE001 - already gone with its node
            pass
    return res


def paper_table(out: Path, plan: Plan | None = None, metrics=("acc", "asr", "der"), grid: str | None = None) -> str:
    """The attack x defense Markdown table of a grid's reported (test) rows: this plan's evals,
    or every row of grid ``grid`` (for ``bdgrid status``)."""
    import results

    df = results.load(out)
    if df.empty:
        return "(no results yet)"
    if plan is not None:
        df = df[df["key"].isin({s.key for s in plan.of_kind("eval")})]
    elif grid is not None and "grid" in df.columns:
        df = df[df["grid"] == grid]
    df = df[df["split"] == "test"]
    if df.empty:
        return "(no results yet)"
    try:
        from results.tables import markdown  # the results package's paper table (mean +- std over seeds)

        return markdown(df, metrics=list(metrics), rows="attack", cols="defense")
    except ImportError:
        pass
    piv = df.pivot_table(index="attack", columns="defense", values=list(metrics), aggfunc="mean") * 100
    return piv.round(2).to_markdown()
