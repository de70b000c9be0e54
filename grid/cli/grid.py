"""``bdgrid run``, ``bdgrid validate`` and ``bdgrid status``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from grid.cli.common import console, fail, load_spec_or_exit, local_gpus, out_dir, ray_session, run_folder
from grid.lock import RunLocked
from results.writer import WriteError


def validate_cmd(
    spec_file: str = typer.Argument(..., help="Grid spec (YAML)."),
    gpus: Optional[float] = typer.Option(None, help="Check GPU requests against a cluster of this many GPUs "
                                                    "(default: not checked; `bdgrid run` checks the cluster it joins)."),
    max_stages: Optional[int] = typer.Option(None, help="Refuse a grid of more stages than this (default 10,000,000)."),
):
    """Check a grid spec and report every problem with its line; exit 2 if there is any. The
    same checks as `bdgrid run --dry-run`."""
    from grid.plan import build_plan

    from grid.estimate import describe, estimate, measured_seconds

    ls = load_spec_or_exit(spec_file, gpus, max_stages)
    plan = build_plan(ls)
    c = plan.counts()
    console.print(f"[green]ok[/]: {spec_file}: grid '{plan.grid}', {plan.cells} cells, "
                  + ", ".join(f"{v} {k}" for k, v in c.items() if v) + " stages")
    prev = out_dir(ls, None)
    console.print(describe(estimate(plan, plan.stages, measured_seconds(prev)), prev, "in all"))
    asked = max(getattr(ls.spec.resources, k).gpus for k in ("attack", "prepare", "defense", "eval"))
    if asked and gpus is None:
        console.print(f"note: stages ask for GPUs (up to {asked:g} per task); not checked here "
                      f"(this machine has {local_gpus()}); `--gpus N` checks against a cluster of N")


def run_cmd(
    spec_file: str = typer.Argument(..., help="Grid spec (YAML)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder or s3://bucket/prefix[?endpoint_override=HOST:PORT"
                                                                 "&scheme=http] (default: the spec's 'out', else runs/<name>)."),
    address: Optional[str] = typer.Option(None, help="Join a Ray cluster: 'auto' (the one on this node) or ray://host:10001. "
                                                     "Default: start a local Ray bounded to this machine's cores."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (cells, stages per kind, done/to run) and stop."),
    num_cpus: Optional[int] = typer.Option(None, help="Local mode: CPUs Ray may use (default: all cores)."),
    gpu_check: bool = typer.Option(True, "--gpu-check/--no-gpu-check",
                                   help="Refuse GPU stages when the cluster has no GPU now (turn off for autoscaling GPU workers)."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root URI (local path, s3://, gs://); default: the spec's "
                                                       "'artifacts', else $BDGRID_ARTIFACTS, else <out>/artifacts."),
    shared_fs: bool = typer.Option(False, "--shared-fs", help="The local artifact path is on a file system every node of the "
                                                              "cluster mounts (NFS); bdgrid checks it from every node."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress bar."),
    max_stages: Optional[int] = typer.Option(None, help="Refuse a grid of more stages than this (default 10,000,000)."),
):
    """Run a grid: every cell's backdoored model once, every defense on it, every evaluation.
    Resumes by default: finished stages are skipped, failed ones retried."""
    import os

    from grid.cluster import ClusterError
    from grid.remote_out import RemoteOutError, mirror_of
    from grid.run import cluster_gpus, ensure_writable, execute_plan
    from grid.validate import validate

    ls = load_spec_or_exit(spec_file, None, max_stages, data_missing_ok=dry_run)
    out_path = out_dir(ls, out, remote_ok=True)
    remote = mirror_of(out_path)
    if remote is not None and not (artifacts or ls.spec.artifacts or os.environ.get("BDGRID_ARTIFACTS")):
        artifacts = remote.child_uri("artifacts")  # beside the results, not in the local mirror
    if dry_run:
        return _dry_run(ls, out_path, artifacts)
    try:
        ensure_writable(out_path)
    except WriteError as e:
        fail(str(e).replace("; nothing was written under that name (what was there before is kept)", "")
             + "; choose a writable --out", 1)
    started = ray_session(address, num_cpus, quiet)
    try:
        if gpu_check:
            problems = [p for p in validate(ls, gpus_available=cluster_gpus()) if p.path[:1] == ("resources",)]
            if problems:
                fail("\n  ".join(p.render(ls.file) for p in problems))
        try:
            res = execute_plan(ls, out_path, artifacts=artifacts, show_progress=not quiet, console=console,
                               shared_fs=shared_fs)
        except (RunLocked, ClusterError) as e:
            fail(str(e), 1 if isinstance(e, RunLocked) else 2)
        except RemoteOutError as e:  # the last push: every result is in the local mirror
            fail(f"{e}\nThe run's files are in {out_path}; rerun the same command to push them.", 1)
        except WriteError as e:  # a full or read-only disk: say where; finished stages are on disk
            fail(f"{e}\nEvery stage that finished before is kept; free space (or fix the permissions) and rerun "
                 f"`bdgrid run` to resume.", 1)
    finally:
        if started:
            import ray

            ray.shutdown()
    _summary(res, remote)
    if not res.ok:
        raise typer.Exit(1)


def _dry_run(ls, out_path, artifacts) -> None:
    """The plan per stage kind (total, done, to run) and its cost; changes nothing on disk."""
    from grid.estimate import describe, estimate, measured_seconds
    from grid.plan import build_plan
    from grid.run import artifact_root, needed_stages
    from grid.store import ArtifactStore

    plan = build_plan(ls)
    store = ArtifactStore(artifact_root(ls, out_path, artifacts))
    need, done, corrupt = needed_stages(plan, store, out_path, repair=False)  # a dry run changes nothing
    t = Table(title=f"plan of grid '{plan.grid}': {plan.cells} cells -> {out_path}")
    for col in ("stage", "total", "done", "to run"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for kind, n in plan.counts().items():
        if n:
            keys = [s.key for s in plan.of_kind(kind)]
            t.add_row(kind, str(n), str(sum(k in done for k in keys)), str(sum(k in need for k in keys)))
    console.print(t)
    console.print(describe(estimate(plan, need, measured_seconds(out_path)), out_path))
    if corrupt:
        console.print(f"[yellow]{len(corrupt)} corrupt artifact(s); a run will recompute them[/]")


def _summary(res, remote) -> None:
    """What ran, what failed (with its traceback file) and the paper table."""
    from grid.remote_out import shown
    from grid.run import paper_table

    s = res.plan.counts()
    console.print(f"grid '{res.plan.grid}': {res.plan.cells} cells, {sum(s.values())} stages: "
                  f"{len(res.done)} run, {len(res.cached)} already done, {len(res.failed)} failed, "
                  f"{len(res.skipped)} skipped, in {res.wall_s:.1f}s -> "
                  + (f"{shown(remote.uri)} (local mirror {res.out})" if remote else str(res.out)), highlight=False)
    if res.recomputed_corrupt:
        console.print(f"[yellow]recomputed {len(res.recomputed_corrupt)} corrupt artifact(s)[/]")
    for key, e in res.failed.items():
        console.print(f"[red]failed[/] {res.plan.stages[key].label}: {e} "
                      f"(traceback: {res.out / 'failures' / (res.plan.stages[key].kind + '-' + key + '.txt')})")
    print(paper_table(res.out, res.plan))  # plain print: rich would re-wrap the Markdown lines


def status_cmd(out: str = typer.Option(..., "--out", "-o", help="The output folder (or s3:// --out) of a running or "
                                                                "finished grid.")):
    """Show a grid's progress from disk (works from another terminal while it runs)."""
    from grid.status import read_state, render

    out = run_folder(out)
    st = read_state(out)
    if st is None:
        fail(f"no grid state in {out} (expected {Path(out) / 'state.json'}; has `bdgrid run` started there?)")
    render(st, console)
    from grid.run import paper_table

    print(paper_table(Path(out), grid=st.get("grid")))
    failed = sum(c.get("failed", 0) for c in (st.get("counts") or {}).values())
    for f in st.get("failures") or []:
        console.print(f"[red]failed[/] {f.get('stage')}: {f.get('error')} (traceback: {f.get('file')})", highlight=False)
    if st.get("finished") and failed:  # a finished run with failures is not a success, for scripts too
        console.print(f"the run ended with {failed} failed stage(s); rerun `bdgrid run` to retry them")
        raise typer.Exit(1)


def verify_cmd(
    out: str = typer.Option(..., "--out", "-o", help="The run folder (or s3:// --out) to check."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root (default: the run's, from <out>/spec.yaml)."),
    repair: bool = typer.Option(False, "--repair", help="Set aside what is damaged and recompute it (runs the "
                                                        "run's saved spec, as `bdgrid run` would)."),
    address: Optional[str] = typer.Option(None, help="With --repair: a Ray cluster to join (default: local)."),
):
    """Check every artifact and result file of a run (checksums, the safe loader, row invariants);
    exit 1 if anything is damaged. Without --repair nothing changes."""
    from grid.cluster import ClusterError
    from grid.run import execute_plan, run_artifact_root
    from grid.store import ArtifactStore
    from grid.verify import check, saved_spec, set_aside

    out = run_folder(out)
    if not out.is_dir():
        fail(f"no run folder {out}")
    artifacts = artifacts or run_artifact_root(out)
    store = ArtifactStore(artifacts)
    f = check(out, store)
    console.print(f"checked {f.artifacts_checked} artifact(s) in {artifacts} and {f.results_checked} result file(s) "
                  f"in {out}", highlight=False)
    for kind, key, why in f.bad_artifacts:
        console.print(f"[red]damaged artifact[/] {kind} {key}: {why}", highlight=False)
    for p, why in f.bad_results:
        console.print(f"[red]damaged result file[/] {p}: {why}", highlight=False)
    if f.ok:
        console.print("[green]all intact[/]")
        return
    if not repair:
        console.print("nothing changed; `bdgrid verify --repair` sets them aside and recomputes them")
        raise typer.Exit(1)
    ls = saved_spec(out)
    if ls is None:
        fail(f"no usable saved spec in {out} (spec.source.yaml); set the damaged files aside by hand and rerun "
             f"`bdgrid run SPEC --out {out}`", 1)
    set_aside(out, store, f)
    started = ray_session(address)
    try:
        res = execute_plan(ls, out, artifacts=artifacts, show_progress=False, console=console)
    except RunLocked as e:
        fail(str(e), 1)
    except ClusterError as e:
        fail(str(e))
    finally:
        if started:
            import ray

            ray.shutdown()
    n = sum(1 for k in res.done if res.plan.stages[k].kind != "data")  # the data load is not a recomputation
    console.print(f"repaired: {n} stage(s) recomputed; {len(res.failed)} failed")
    if not res.ok:
        raise typer.Exit(1)
