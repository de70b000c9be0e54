"""``bdgrid tune SPEC``: run or resume an Optuna study of a defense's parameters over the grid
engine (a grid spec with a ``tune:`` block; see ``grid.tune``)."""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from grid.cli.common import console, err, fail, load_spec_or_exit, out_dir, ray_session
from grid.lock import RunLocked


def tune(
    spec_file: str = typer.Argument(..., metavar="SPEC", help="Grid spec with a tune: block, e.g. examples/tune-quickstart.yaml."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run folder (default: the spec's 'out', else runs/<name>); "
                                                                 "the study lives in <out>/tune/<study>/."),
    storage: Optional[str] = typer.Option(None, help="Journal file path or RDB URL (postgresql+psycopg2://...); overrides tune.storage."),
    n_trials: Optional[int] = typer.Option(None, help="COMPLETE trials the study should reach (overrides tune.n_trials)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    artifacts: Optional[str] = typer.Option(None, help="Artifact root URI (default: as `bdgrid run` picks it)."),
    check: bool = typer.Option(False, "--check", help="Validate the spec and stop (as `bdgrid validate`)."),
    report: bool = typer.Option(False, "--report", help="Only write best.yaml and the plots from the stored study."),
    evaluate: bool = typer.Option(False, "--evaluate",
                                  help="After tuning, score default vs tuned parameters on the REPORTED test split "
                                       "of the tune_on and report_on cells."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
):
    """Tune a defense's parameters with Optuna on the validation split; every trial runs as the
    grid's own stages (models, resources and shared prepare stages are reused). A rerun resumes
    the study; the chosen parameters go to <out>/tune/<study>/best.yaml."""
    from grid.cluster import ClusterError
    from grid.run import execute_plan, open_runner
    from grid.tune.driver import choose, report_evals, run_study, tune_plan
    from grid.tune.plots import write_plots
    from grid.tune.study import counts

    tu = _tuning(spec_file, out, storage, n_trials)
    ls = tu.ls
    if check:
        console.print(f"[green]ok[/]: {spec_file}: tune {ls.spec.tune.defense} on {len(tu.cells())} cell(s), "
                      f"{len(ls.spec.tune.space)} parameter(s), {ls.spec.tune.n_trials} trials, storage {tu.storage}")
        return
    say = (lambda m: err.print(m, highlight=False)) if as_json else (lambda m: console.print(m, highlight=False))
    summary: dict = {"study": tu.study_name, "storage": tu.storage}
    started = False
    try:
        if not report or evaluate:
            started = ray_session(address)
        if not report:
            plan = tune_plan(tu)
            try:
                runner = open_runner(ls, tu.out, plan, artifacts=artifacts, show_progress=not (quiet or as_json),
                                     console=err if as_json else console)
            except RunLocked as e:
                fail(str(e), 1)
            except ClusterError as e:  # a local artifact path on several nodes (grid.cluster)
                fail(str(e))
            try:
                summary = run_study(tu, runner, plan, say)
            finally:
                res = runner.close()
            summary["stages"] = {"run": len(res.done), "already done": len(res.cached), "failed": len(res.failed)}
        study = tu.open()
        if not counts(study)["complete"]:
            fail(f"study '{tu.study_name}' in {tu.storage} has no complete trial yet")
        doc, path = choose(tu, study)
        summary.update(best=str(path), params=doc["params"], warnings=doc["warnings"],
                       plots=[str(p) for p in write_plots(ls.spec.tune, study, tu.dir / "plots")])
        if evaluate:
            plan = tune_plan(tu)
            sets = {"default": dict(ls.spec.tune.params), "tuned": doc["params"]}
            evals = report_evals(tu, plan, sets)
            execute_plan(ls, tu.out, artifacts=artifacts, plan=plan.only([k for _, _, k in evals]),
                         show_progress=not (quiet or as_json), console=err if as_json else console)
            summary["evaluation"] = _evaluation(tu.out, evals)
    finally:
        if started:
            import ray

            ray.shutdown()
    if as_json:
        print(json.dumps(summary, default=str))
        return
    _print(summary, doc, ls.spec.tune.defense, evaluate)


def _tuning(spec_file: str, out: str | None, storage: str | None, n_trials: int | None):
    """The validated spec with its command-line overrides, as a Tuning whose folder is writable."""
    from grid.run import ensure_writable
    from grid.tune.driver import Tuning
    from results.writer import WriteError

    ls = load_spec_or_exit(spec_file, None)
    if ls.spec.tune is None:
        fail(f"{spec_file} has no tune: block; `bdgrid tune` needs one (see examples/tune-quickstart.yaml), "
             f"`bdgrid run` runs a plain grid")
    updates = {k: v for k, v in (("storage", storage), ("n_trials", n_trials)) if v is not None}
    if updates:
        ls.spec = ls.spec.model_copy(update={"tune": ls.spec.tune.model_copy(update=updates)})
    tu = Tuning(ls, out_dir(ls, out).resolve())
    try:
        ensure_writable(tu.out)
    except WriteError as e:
        fail(f"{e}; choose a writable --out", 1)
    return tu


def _print(summary: dict, doc: dict, defense: str, evaluate: bool) -> None:
    for w in doc["warnings"]:
        console.print(f"[yellow]warning[/] {w}", highlight=False)
    vals = ", ".join(f"{k} {100 * v:.1f}" for k, v in doc["values"].items())
    console.print(f"best on the validation split: trial {doc['trial']} ({vals}; {doc['interval']['n_images']} images)")
    console.print(f"params -> {summary['best']}  (use `params_from: {summary['best']}` in a grid spec)")
    for p in summary["plots"]:
        console.print(f"plot: {p}")
    if evaluate:
        t = Table(title=f"{defense}: default vs tuned on the reported test split "
                        f"(tuned on {', '.join(doc['tuned_on'])})")
        for c in ["cell", "params", "tuned on it", "ACC", "ASR", "RA", "DER", "ACC before", "ASR before"]:
            t.add_column(c, justify="right", overflow="fold")
        for r in summary["evaluation"]:
            t.add_row(r["cell"], r["params_set"], "yes" if r["tuned_here"] else "no",
                      *(f"{100 * r[k]:.2f}" for k in ("acc", "asr", "ra", "der", "bd_acc", "bd_asr")))
        console.print(t)


def _evaluation(out, evals) -> list[dict]:
    import results

    df = results.load(out)
    test = df[df["split"] == "test"].set_index("key")
    rows = []
    for name, label, key in evals:
        r = test.loc[key]
        r = r.iloc[-1] if getattr(r, "ndim", 1) == 2 else r
        rows.append({"params_set": name, "cell": label, "tuned_here": bool(r.get("tuned_here")),
                     **{k: float(r[k]) for k in ("acc", "asr", "ra", "der", "bd_acc", "bd_asr")}})
    return rows
