"""``bdgrid tune SPEC``: run or resume an Optuna study of a defense's hyperparameters on Ray."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def tune(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Tune spec (YAML), e.g. examples/tune-quickstart.yaml."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: the spec's `out`, else runs/tune/<study>)."),
    storage: Optional[str] = typer.Option(None, help="Journal file path or RDB URL (postgresql+psycopg2://...)."),
    study: Optional[str] = typer.Option(None, help="Study name (overrides the spec's)."),
    n_trials: Optional[int] = typer.Option(None, help="COMPLETE trials the study should reach (overrides the spec)."),
    parallelism: Optional[int] = typer.Option(None, help="Trials in flight at once (overrides the spec)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    check: bool = typer.Option(False, "--check", help="Validate the spec and stop."),
    report: bool = typer.Option(False, "--report", help="Only write best.yaml and the plots from the stored study."),
    evaluate: bool = typer.Option(False, "--evaluate",
                                  help="After tuning, score default vs tuned params on the REPORTED test split "
                                       "of tune_on and report_on cells."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary."),
):
    """Tune a defense's hyperparameters with Optuna; trials run as Ray tasks and read only the
    validation split. A rerun resumes the study; best params go to <out>/best.yaml."""
    from rich.console import Console
    from rich.table import Table

    from grid.tune import evaluate_on_test, run_study, write_plots
    from grid.tune_best import best_doc, write_best
    from grid.tune_study import counts, open_study
    from grid.cli import fail
    from grid.tune_spec import SpecError, load_spec

    console = Console()
    try:
        spec = load_spec(spec_path, {"out": out, "storage": storage, "study": study, "n_trials": n_trials,
                                     "parallelism": parallelism})
    except SpecError as e:
        fail("the tune spec has problems:\n  " + "\n  ".join(e.problems))
    if check:
        console.print(f"{spec_path}: ok ({len(spec.cells())} cell(s) to tune on, {len(spec.space)} parameter(s), "
                      f"{spec.n_trials} trials, storage {spec.storage_url()})")
        return
    say = (lambda m: None) if as_json else console.print
    summary: dict = {"study": spec.study, "storage": spec.storage_url()}
    if not report:
        summary = run_study(spec, address=address, log_fn=say)
    study_obj = open_study(spec)
    if not counts(study_obj)["complete"]:
        fail(f"study '{spec.study}' in {spec.storage_url()} has no complete trial yet")
    summary["best"] = str(write_best(spec, study_obj))
    summary["plots"] = [str(p) for p in write_plots(spec, study_obj)]
    doc = best_doc(spec, study_obj)
    summary["params"] = doc["params"]
    if evaluate:
        rows = evaluate_on_test(spec, {"default": dict(spec.params), "tuned": doc["params"]}, address=address)
        summary["evaluation"] = [{k: r[k] for k in ("params_set", "cell", "tuned", "acc", "asr", "ra", "der",
                                                    "bd_acc", "bd_asr")} for r in rows]
    if as_json:
        print(json.dumps(summary, default=str))
        return
    console.print(f"best ({', '.join(spec.objectives)} on the validation split): trial {doc['trial']} "
                  f"{ {k: round(v, 4) for k, v in doc['values'].items()} }")
    console.print(f"params -> {summary['best']}  (use `params_from: {summary['best']}` in a grid spec)")
    for p in summary["plots"]:
        console.print(f"plot: {p}")
    if evaluate:
        t = Table(title=f"{spec.defense}: default vs tuned on the reported test split (tuned on "
                        f"{', '.join(doc['tuned_on'])})")
        for c in ["cell", "params", "tuned on it", "ACC", "ASR", "RA", "DER", "ACC before", "ASR before"]:
            t.add_column(c, justify="right")
        for r in summary["evaluation"]:
            t.add_row(r["cell"], r["params_set"], "yes" if r["tuned"] else "no",
                      *(f"{100 * r[k]:.2f}" for k in ("acc", "asr", "ra", "der", "bd_acc", "bd_asr")))
        console.print(t)
