"""The driver: a validated plan -> Ray tasks, one per stage, with resume, retries and progress.

- Resume is the default: a stage whose artifact is in the store (or, for ``eval``, whose rows
  are in ``<out>/results``) is not run again. Artifacts that will be read are checksummed
  first; a corrupt one is deleted and its stage rerun.
- Only what is needed runs: a stage runs when some ``eval`` below it is missing and its own
  output is missing; the data stage runs (in a task whose result Ray keeps in its object store,
  shared by every dependent task) only when something needs it.
- One Ray task per stage with ``num_cpus``/``num_gpus`` from the spec; a task is submitted when
  its parents have finished, with the data stage's ObjectRef as argument.
- Faults: system failures (the stage's worker process or its whole node died) are Ray's to retry:
  ``max_retries=SYSTEM_RETRIES`` (3, Ray's own default), and a stage whose input dataset was lost
  with its node is resubmitted by the driver (at most ``SYSTEM_RETRIES`` times); neither spends the
  spec's ``retries``. An exception raised by the stage is retried up to ``retries`` times by the
  driver, then the stage is marked failed, its traceback written to
  ``<out>/failures/<kind>-<key>.txt``, its descendants skipped, and the rest of the grid goes on.
  A stage attempt running longer than ``timeout`` seconds (counted from when it left Ray's queue)
  is cancelled and counts as a failure.
- What stages leave behind is gathered by the driver, so a multi-node run's folder lists every
  stage whichever node ran it: the worker writes its ``executed.log`` line and its failure log
  into a private scratch folder and returns them; the driver appends them to ``<out>/executed.log``
  and ``<out>/logs/``. The warnings a prepare/defense stage raised are printed once each, prefixed
  with the stage's label, and appended to ``<out>/warnings.log``; its ``ctx.log`` lines go to
  ``<out>/logs/<kind>-<key>.log``.
- ``--out s3://...`` runs in a local mirror (``grid.remote_out``) that the runner pushes after
  finished stages and state writes and at the end.
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

from grid.plan import Plan, Stage, ancestors, build_plan
from grid.plugins import import_plugins
from grid.spec import STAGE_KINDS, LoadedSpec
from grid.status import write_state
from grid.store import ArtifactStore

STORED = ("resource", "attack", "import", "prepare", "defense")  # kinds whose output is an artifact
# Ray re-runs a task whose worker or node died this many times (Ray's own default for tasks),
# apart from the spec's `retries`, which count exceptions the stage raised
SYSTEM_RETRIES = 3


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

def done_evals(out: Path, moved: list | None = None) -> dict[str, set]:
    """{eval key: splits whose intact rows are in ``<out>/results``}. Damaged files (checksum,
    invariants) count as not done; with ``moved`` (a real run, holding the folder's lock) they
    are also set aside into ``<out>/damaged/`` in the same read, and listed in ``moved``, and
    a folder of many small result files (a run killed before its end) is compacted first.
    Only the key and split columns are decoded (and those the row checks need): of a compacted
    store that is a few column chunks per part, not every row."""
    from results.reader import load_checked, say

    if moved is not None:
        from results.compact import compact_run

        try:
            compact_run(out, locked=True)  # damaged files are left out of it and set aside below
        except OSError as e:  # a full disk: the small files stay, readable as they are
            print(f"note: results not compacted: {e}", file=sys.stderr)
    tbl, report = load_checked(out, columns=("key", "split"))
    say(report)
    if moved is not None:
        from results.writer import set_aside

        moved += [(p, set_aside(out, p)) for p, _ in report.damaged if p.exists()]
    have: dict[str, set] = {}
    if tbl.num_rows:
        for k, split in zip(tbl.column("key").to_pylist(), tbl.column("split").to_pylist()):
            have.setdefault(k, set()).add(split)
    return have


def eval_done(stage: Stage, have: dict[str, set]) -> bool:
    return set(stage.config.get("splits", ("test", "val"))) <= have.get(stage.key, set())


def needed_stages(plan: Plan, store: ArtifactStore, out: Path, targets=None, have: dict | None = None,
                  verified: set | None = None, repair: bool = True) -> tuple[set, set, list]:
    """(to_run, done, corrupt) for the eval stages ``targets`` (default: every eval of the plan)
    and what they depend on: the stages to execute, those already done, and the keys whose
    artifact failed its checksum. With ``repair`` a corrupt artifact is deleted (and its stage is
    in to_run); without it (a dry run) nothing on disk changes."""
    targets = [s.key for s in plan.of_kind("eval")] if targets is None else list(targets)
    have = done_evals(out) if have is None else have
    verified = set() if verified is None else verified
    scope = ancestors(plan, targets)
    done = set()
    for k in scope:
        s = plan.stages[k]
        if s.kind == "eval" and eval_done(s, have):
            done.add(k)
        elif s.kind in STORED and store.exists(s.kind, k):
            done.add(k)
    corrupt: list = []
    while True:
        need: set = set()
        stack = [k for k in targets if k not in done]
        while stack:  # a stage runs when something wanted below it is missing and it is missing too
            k = stack.pop()
            if k in need:
                continue
            need.add(k)
            stack.extend(p for p in plan.stages[k].parents if p not in done and p not in need)
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
            if repair:
                store.delete(plan.stages[p].kind, p)
            done.discard(p)
            verified.add(p)  # counted once; it is in to_run now
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


def connect(address: str | None, num_cpus: int | None = None, connect_timeout: float = 10.0,
            quiet: bool = False) -> bool:
    """Start local Ray on loopback (default) or join ``address``; True when we started it (and stop it).

    Every worker gets the driver's AWS variables (``grid.cluster.worker_env``) through the job's
    ``runtime_env``, so nodes started without them still reach an ``s3://`` store. ``quiet``
    keeps Ray's own reports (a dead worker's or node's crash dump, unhandled-error notices) off
    the terminal: the stage that suffered is reported by bdgrid with its failure file."""
    import ray

    from grid.cluster import worker_env

    if address not in (None, "", "local"):
        _check_reachable(address, connect_timeout)
    if ray.is_initialized():
        return False
    if quiet:
        _quiet_ray()
    env = worker_env()
    common = dict(log_to_driver=False, configure_logging=False,
                  runtime_env={"env_vars": env} if env else None)
    if address in (None, "", "local"):
        _quiet_token_notice()
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), _node_ip_address=loopback_ip(),
                 include_dashboard=False, **common)
        return True
    host = _host_of(address)
    # a cluster on this machine's loopback (tests, a laptop): the driver's node is on loopback too
    local = {"_node_ip_address": host} if host.startswith("127.") else {}
    ray.init(address=address, **common, **local)
    return True


def _quiet_ray() -> None:
    """Ray reports a dead worker or node through its Python loggers and prints "Unhandled error"
    for failed results nobody fetched; with -q neither shows (bdgrid reports the stage, and the
    raylet's own output stays in its log files: ``log_to_driver=False``). Set before ``ray.init``."""
    import logging

    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    for name in ("ray", "ray._private", "ray.util"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _quiet_token_notice() -> None:
    """Ray 2.60 logs "Token authentication is enabled for this Ray cluster..." at WARNING on every
    local start with RAY_AUTH_MODE unset; it is a notice (auth stays on), so it shows with -v only."""
    import logging

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if logging.getLogger().getEffectiveLevel() > logging.INFO and not getattr(log, "_bdgrid_quiet", False):
        log.addFilter(lambda r: "Token authentication is enabled" not in r.getMessage())
        log._bdgrid_quiet = True


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

    @ray.remote(num_returns=2)
    def run_stage(stage: Stage, data, store_uri: str, env: dict, started=None):
        """(the stage's output, its executed.log lines). What the stage writes under its "out"
        goes to a scratch folder of this worker and comes back to the driver, who writes it into
        the real run folder: that folder may not exist on this node."""
        import shutil
        import tempfile

        if started is not None:  # tell the driver this stage left Ray's queue (fire and forget)
            started.mark.remote(stage.key)
        scratch = tempfile.mkdtemp(prefix="bdgrid-stage-")
        env = {**env, "out": scratch, "node": ray.get_runtime_context().get_node_id()[:12]}
        try:
            try:
                output = stages.execute(stage, data, ArtifactStore(store_uri), env)
            except Exception as e:
                log = Path(scratch) / "logs" / f"{stage.kind}-{stage.key}.log"
                if log.exists():  # the stage's lines before it failed (``stages._Capture``)
                    try:
                        e.bdgrid_log = log.read_text()
                    except (AttributeError, TypeError):
                        pass  # an exception type that takes no attributes: the traceback alone then
                raise
            done = Path(scratch) / "executed.log"
            return output, done.read_text() if done.exists() else ""
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    return run_stage


def _start_log():
    """A CPU-free actor that collects the keys of stages that began running: a submitted Ray
    task may wait for a free CPU/GPU, and the progress bar should call it queued, not running."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)  # restarted if its node dies: only progress marks are lost
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
        self.status: dict = {k: "cached" for k in cached}  # only the stages wanted so far
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
            self.bar.update(self.task, completed=finished_n, total=max(self.total_run, 1),
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
    art = ls.spec.artifacts
    if art and "://" not in art and not Path(art).expanduser().is_absolute():
        art = str((ls.base_dir / art).resolve())  # a path in a spec is relative to the spec file, as every other
    return str(override or art or os.environ.get("BDGRID_ARTIFACTS") or Path(out).resolve() / "artifacts")


class Runner:
    """The driver loop over a plan that may grow while it runs: ``bdgrid run`` wants every eval
    of the grid at once; ``bdgrid tune`` adds each trial's defense and eval stages to the same
    plan and wants them as Optuna asks. Both get the same resume, artifact checks, retries,
    timeouts, failure files, warnings, progress and state file.

    ``want(keys)`` schedules eval stages (and whatever they need); ``poll()`` waits a little and
    handles what finished; ``status[key]`` is one of pending, queued, running, done, cached,
    failed, skipped; ``rows[key]`` holds the rows of each eval executed in this run.
    """

    def __init__(self, ls: LoadedSpec, plan: Plan, out: Path, store: ArtifactStore, *, show_progress: bool = True,
                 console=None):
        import ray

        from grid import lock

        self.ls, self.plan, self.out, self.store, self.spec = ls, plan, Path(out), store, ls.spec
        self._lock = lock.acquire(self.out)  # before anything is written here: one driver per folder
        try:
            self._start(plan, show_progress, console)
        except BaseException:
            lock.release(self._lock)
            raise
        self._ray = ray

    def _start(self, plan: Plan, show_progress: bool, console) -> None:
        ls = self.ls
        self.res = RunResult(plan, self.out)
        self.t0 = time.time()
        self.moved: list = []  # damaged result files set aside while reading what is done
        self.have = done_evals(self.out, self.moved)
        self.verified: set = set()
        self.need: set = set()
        self.rows: dict = {}
        self.env = {"out": str(self.out), "grid": plan.grid, "spec_hash": plan.spec_hash,
                    "imports": list(self.spec.imports), "import_path": [str(ls.base_dir.resolve())]}
        self.prog = _Progress(plan, self.out, 0, set(), show_progress, console)
        self.console = console or (self.prog.bar.console if self.prog.bar is not None else None)
        if self.console is None:
            from rich.console import Console

            self.console = Console(stderr=True)
        self.run_stage = _remote()
        self.start_log = _start_log()
        self.running: dict = {}  # ObjectRef -> key
        self.began: dict = {}  # key -> when its current attempt left Ray's queue (the timeout counts from here)
        self.attempts: dict = {}
        self.lost: dict = {}  # key -> resubmissions after its input dataset was lost with a node
        self.logs: dict = {}  # ObjectRef of a stage's output -> ObjectRef of its executed.log lines
        self.data_refs: dict = {}  # data stage key -> ObjectRef (kept while a child still needs it)
        from grid.remote_out import mirror_of

        self.remote = mirror_of(self.out)  # --out s3://...: pushed as stages finish (see poll, close)

    @property
    def status(self) -> dict:
        return self.prog.status

    def want(self, targets) -> None:
        """Schedule the eval stages ``targets`` and what they need that is not done yet."""
        targets = [k for k in targets if self.status.get(k) not in ("done", "cached", "failed", "skipped")]
        need, done, corrupt = needed_stages(self.plan, self.store, self.out, targets, self.have, self.verified)
        self.res.recomputed_corrupt += [k for k in corrupt if k not in self.res.recomputed_corrupt]
        for k in done:
            if k not in self.status:
                self.status[k] = "cached"
                self.res.cached.add(k)
        new = [k for k in self.plan.stages if k in need and k not in self.need and k not in self.status]
        self.need |= need
        self.prog.total_run += len(new)
        for k in new:
            self.status[k] = "pending"
        for k in new:  # a stage below one that already failed in this run cannot run either
            if any(self.status.get(p) in ("failed", "skipped") for p in self.plan.stages[k].parents):
                self.res.skipped.add(k)
                self.status[k] = "skipped"
        for k in new:
            if self._ready(k):
                self._submit(k)
        self.prog.update()

    def finished(self, key: str) -> bool:
        return self.status.get(key) in ("done", "cached", "failed", "skipped")

    def _ready(self, key: str) -> bool:
        s = self.plan.stages[key]
        return self.status.get(key) == "pending" and all(
            self.status.get(p) in ("done", "cached") for p in s.parents)

    def _submit(self, key: str) -> None:
        s = self.plan.stages[key]
        dk = s.parents[0] if s.parents and self.plan.stages[s.parents[0]].kind == "data" else None
        if dk is not None and dk not in self.data_refs:
            if self.status.get(dk) == "done":
                # loaded earlier and released once nothing needed it; a stage wanted since needs it again
                self.prog.total_run += 1
                self.status[dk] = "pending"
                self._submit(dk)
            return  # submitted when the data stage finishes (see poll)
        data = self.data_refs.get(dk) if dk else None
        ref, log = self.run_stage.options(num_cpus=s.cpus, num_gpus=s.gpus, max_retries=SYSTEM_RETRIES,
                                          retry_exceptions=False, name=s.label).remote(s, data, self.store.uri,
                                                                                       self.env, self.start_log)
        self.running[ref] = key
        self.logs[ref] = log
        self.began.pop(key, None)
        self.prog.set(key, "queued")

    def _fail(self, key: str, err: str, tb: str) -> None:
        from grid.stages import plain_text

        fdir = self.out / "failures"
        fdir.mkdir(exist_ok=True)
        s = self.plan.stages[key]
        f = fdir / f"{s.kind}-{key}.txt"
        f.write_text(plain_text(f"{s.label}\nattempts: {self.attempts.get(key, 0)}\n\n{tb}"))
        self.res.failed[key] = err
        ident = {k: s.info[k] for k in ("dataset", "arch", "attack", "pratio", "seed", "defense") if k in s.info}
        self.prog.set(key, "failed", {"stage": s.label, "error": err, "file": str(f), "info": ident})
        children = self.plan.children()
        stack = list(children[key])
        while stack:  # everything below a failed stage cannot run this time
            c = stack.pop()
            if self.status.get(c) == "pending":
                self.res.skipped.add(c)
                self.prog.set(c, "skipped")
                stack.extend(children[c])

    def poll(self, timeout: float = 0.5) -> list[str]:
        """Wait up to ``timeout`` s for stages to finish and handle them; returns the keys that
        reached a final state (done or failed) in this call."""
        ray, spec = self._ray, self.spec
        from grid import stages

        if not self.running:
            return []
        refs = list(self.running)
        done_refs, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        try:
            started = {k: time.time() for k in ray.get(self.start_log.take.remote(), timeout=30)}
        except Exception:  # noqa: BLE001 - the actor is gone: count a stage as started when submitted
            started = {k: time.time() for k in self.running.values() if k not in self.began}
        for k, t in started.items():
            if self.status.get(k) == "queued":
                self.status[k] = "running"
                self.began[k] = t
        now = time.time()
        if spec.timeout:  # cancel attempts that ran too long; they count as failures
            for ref in refs:
                k = self.running[ref]
                if ref not in done_refs and k in self.began and now - self.began[k] > spec.timeout:
                    ray.cancel(ref, force=True)
        ended = []
        children = self.plan.children()
        for ref in done_refs:
            key = self.running.pop(ref)
            log_ref = self.logs.pop(ref)
            t_start = self.began.pop(key, None)
            s = self.plan.stages[key]
            try:
                output = ray.get(ref)
                if s.kind == "eval":
                    stages.write_rows(self.out, s, output)
                self._append("executed.log", ray.get(log_ref, timeout=60))
            except Exception as e:  # RayTaskError (exception in the stage), WorkerCrashedError (retries spent), cancel
                if self._lost_input(key, e):
                    continue
                self.attempts[key] = self.attempts.get(key, 0) + 1
                self._keep_failure_log(s, e)
                if isinstance(e, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
                    # Ray already re-ran the task SYSTEM_RETRIES times after its worker or node died:
                    # the spec's retries are for exceptions, and retrying here would multiply the attempts
                    self.attempts[key] = spec.retries + 1
                timed_out = spec.timeout and t_start is not None and time.time() - t_start > spec.timeout
                cause = getattr(e, "cause", None) or e
                first = str(cause).splitlines()[0][:300] if str(cause) else ""
                msg = f"timed out after {spec.timeout:g}s" if timed_out else f"{type(cause).__name__}: {first}"
                if self.attempts[key] <= spec.retries:
                    self.prog.set(key, "pending")
                    self._submit(key)
                else:
                    self._fail(key, msg, "".join(traceback.format_exception(e)))
                    ended.append(key)
                continue
            self.res.done.add(key)
            if s.kind == "eval":
                self.rows[key] = output["rows"]
                self.have[key] = {r["split"] for r in output["rows"]}
            report_said(self.out, s, output, self.console)
            (self.out / "failures" / f"{s.kind}-{key}.txt").unlink(missing_ok=True)
            if s.kind == "data":
                self.data_refs[key] = ref
            self.prog.set(key, "done")
            ended.append(key)
            for c in children[key]:
                if self._ready(c):
                    self._submit(c)
        # free a dataset from the object store once nothing pending needs it
        for dk in list(self.data_refs):
            if all(self.status.get(c) not in ("pending", "queued", "running") for c in children[dk]):
                del self.data_refs[dk]
        self.prog.update()
        self._push()
        return ended

    def _lost_input(self, key: str, e: Exception) -> bool:
        """A stage that failed because the dataset it reads was lost with its node (and Ray could
        not rebuild it) is resubmitted with the data stage, not counted against ``retries``;
        True when it was (at most SYSTEM_RETRIES times)."""
        ray = self._ray
        cause = getattr(e, "cause", None)
        if not (isinstance(e, ray.exceptions.ObjectLostError) or isinstance(cause, ray.exceptions.ObjectLostError)):
            return False
        if self.lost.get(key, 0) >= SYSTEM_RETRIES:
            return False
        self.lost[key] = self.lost.get(key, 0) + 1
        for p in self.plan.stages[key].parents:
            self.data_refs.pop(p, None)  # _submit loads it again
        self.prog.set(key, "pending")
        self._submit(key)
        return True

    def _keep_failure_log(self, s: Stage, e: Exception) -> None:
        text = getattr(getattr(e, "cause", None), "bdgrid_log", None) or getattr(e, "bdgrid_log", None)
        if text:
            (self.out / "logs").mkdir(exist_ok=True)
            (self.out / "logs" / f"{s.kind}-{s.key}.log").write_text(text)

    def _append(self, name: str, text: str) -> None:
        if text:
            with open(self.out / name, "a") as f:  # the driver is the only writer of its folder
                f.write(text)

    def _push(self, force: bool = False) -> None:
        """--out s3://...: bring what this run wrote to the remote (at most every few seconds;
        a failed push is retried at the next one and, at close, raises)."""
        if self.remote is None:
            return
        from grid.remote_out import RemoteOutError

        try:
            self.remote.maybe_push(force)
        except RemoteOutError as e:
            if force:
                raise
            if not getattr(self, "_push_warned", False):
                self.console.print(f"[yellow]warning[/] {e}; retried at the next push", highlight=False)
                self._push_warned = True

    def close(self) -> RunResult:
        from grid import lock

        self.res.wall_s = time.time() - self.t0
        try:
            if not self.running:  # no task is still writing: fold many small result files into parts
                from results.compact import compact_run

                try:
                    compact_run(self.out, locked=True)
                except OSError as e:  # a full disk: the small files stay, readable as they are
                    self.console.print(f"[yellow]note[/] results not compacted: {e}", highlight=False)
            self.prog.update(finished=not self.running, force=True)
            self.prog.stop()
            try:
                self._ray.kill(self.start_log)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
            self._push(force=True)
        finally:
            lock.release(self._lock)
        return self.res


def ensure_writable(out: str | Path) -> Path:
    """Create ``out`` and prove a file can be written there, before any Ray start-up or compute:
    a read-only or full disk is one ``WriteError`` naming the folder."""
    import tempfile

    from results.writer import WriteError

    out = Path(out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe.", suffix=".tmp"):
            pass
    except OSError as e:
        raise WriteError.of(out, e) from None
    return out


def run_artifact_root(out: str | Path) -> str:
    """The artifact root a run folder's last driver used (``<out>/spec.yaml``), else ``<out>/artifacts``:
    for the commands that work on a finished run (verify, export-model)."""
    import yaml

    meta = Path(out) / "spec.yaml"
    doc = (yaml.safe_load(meta.read_text()) or {}) if meta.exists() else {}
    return doc.get("artifacts") or str((Path(out) / "artifacts").resolve())


def save_spec(ls: LoadedSpec, out: Path, artifacts: str | None = None) -> None:
    """``<out>/spec.yaml``: the spec as resolved (every default filled in) with its hash and source
    file, so a run folder says what produced it; ``<out>/spec.source.yaml``: the file as written."""
    import yaml

    from results.writer import atomic_write

    doc = {"spec_hash": ls.hash, "source": str(Path(ls.file).resolve()) if ls.file else None,
           "artifacts": artifacts, "spec": ls.spec.model_dump(mode="json")}
    atomic_write(out / "spec.yaml", yaml.safe_dump(doc, sort_keys=False).encode())
    if ls.text:
        atomic_write(out / "spec.source.yaml", ls.text.encode())


def open_runner(ls: LoadedSpec, out: str | Path, plan: Plan, *, artifacts: str | None = None,
                show_progress: bool = True, console=None, shared_fs: bool = False) -> Runner:
    """A Runner on the connected Ray cluster (see ``connect``) for ``plan``, writing under ``out``.
    On a cluster of several nodes a local artifact root must be shared (``grid.cluster``)."""
    from grid.cluster import check_artifacts
    from results.writer import clean_stale_tmp, set_aside_damaged

    out = ensure_writable(out)  # a read-only or full disk: one message before Ray does any work
    import_plugins(ls.spec.imports, [str(ls.base_dir.resolve())])  # validation reported any failure
    store = ArtifactStore(artifact_root(ls, out, artifacts))
    check_artifacts(store.uri, shared_fs)  # ClusterError before any compute
    runner = Runner(ls, plan, out, store, show_progress=show_progress, console=console)
    save_spec(ls, out, store.uri)
    # the driver holds the folder now: what a crash left (temporary files of dead processes,
    # result files that fail their checksum) is cleared before anything is read or written
    clean_stale_tmp(out)
    if "://" not in store.uri:
        clean_stale_tmp(store.uri)
    # the runner's own read set the damaged result files aside; the curves and trials tables here
    for path, moved in runner.moved + set_aside_damaged(out, tables=("curves", "trials")):
        runner.console.print(f"[yellow]damaged[/] {path}: set aside in {moved}; its stage will be recomputed",
                             highlight=False)
    return runner


def execute_plan(ls: LoadedSpec, out: str | Path, *, artifacts: str | None = None, show_progress: bool = True,
                 console=None, plan: Plan | None = None, shared_fs: bool = False) -> RunResult:
    """Run every needed stage of ``ls``'s grid (or of ``plan``) on the connected Ray cluster."""
    import_plugins(ls.spec.imports, [str(ls.base_dir.resolve())])
    plan = plan or build_plan(ls)
    runner = open_runner(ls, out, plan, artifacts=artifacts, show_progress=show_progress, console=console,
                         shared_fs=shared_fs)
    try:
        runner.want([s.key for s in plan.of_kind("eval")])
        while runner.running:
            runner.poll()
    finally:
        res = runner.close()
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
    from results.reader import run_failures
    from results.tables import markdown  # the results package's paper table (mean +- std over seeds)

    rows = "attack"
    if "model" in df.columns and df["model"].notna().any():  # imported models (models:): a row per model
        df, rows = df.assign(model=df["model"].fillna("(trained)")), ["attack", "model"]
    return markdown(df, metrics=list(metrics), rows=rows, cols="defense", failures=run_failures(out))
