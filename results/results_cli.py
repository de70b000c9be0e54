"""``bdgrid table`` and ``bdgrid plot``: paper tables and figures from a run directory."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

FORMATS = ("md", "latex", "csv", "html")


def _fail(msg: str, code: int = 2):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _folder(out: str) -> Path:
    """The run folder: ``out`` itself, or for ``s3://...`` its local mirror pulled first
    (``grid.remote_out``; the figures and report written there are pushed back by ``_push``)."""
    from grid.remote_out import RemoteOutError, is_remote, open_out

    if not is_remote(out):
        return Path(out)
    try:
        return open_out(out, existing=True).local
    except RemoteOutError as e:
        _fail(str(e))


def _push(folder: Path) -> None:
    from grid.remote_out import RemoteOutError, mirror_of

    remote = mirror_of(folder)
    if remote is not None:
        try:
            remote.push()
        except RemoteOutError as e:
            _fail(f"{e} (the files are in {folder})", code=1)


def _filters(items):
    from results.tables import parse_filters

    try:
        return parse_filters(items)
    except ValueError as e:
        _fail(str(e))


def table(
    out: str = typer.Option(..., "--out", "-o", help="Run folder (holds results/*.parquet) or an s3:// --out."),
    fmt: str = typer.Option("md", "--format", "-f", help="md, latex (booktabs), csv (tidy: one line per cell and metric) or html."),
    metrics: str = typer.Option("acc,asr,der", help="Comma-separated: acc, asr, ra, der, bd_acc, bd_asr, bd_ra."),
    rows: str = typer.Option("attack", help="Column(s) for the table rows, comma-separated (e.g. attack,pratio)."),
    cols: str = typer.Option("defense", help="Column(s) for the table columns, comma-separated."),
    filter_: Optional[List[str]] = typer.Option(None, "--filter", help="column=value[,value] (repeatable), e.g. dataset=cifar10."),
    split: str = typer.Option("test", help="Which split to report: test (reported) or val (tuning)."),
    digits: int = typer.Option(1, help="Decimals of the percentages."),
    seeds: Optional[int] = typer.Option(None, help="Seeds asked per cell; cells with fewer show (n=k). Default: the most any cell has."),
    compare: Optional[str] = typer.Option(None, help="Show ours beside published numbers: backdoorbench."),
    output: Optional[Path] = typer.Option(None, "--output", "-O", help="Write the table to this file instead of stdout."),
):
    """Attack x defense table of mean ± std over seeds (in %), best defense per row in bold."""
    from results.compact import maybe_compact
    from results.reader import load_report, run_failures
    from results.tables import columns_needed, render

    if fmt not in FORMATS:
        _fail(f"unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
    out = _folder(out)
    if not (out / "results").is_dir():
        _fail(f"no results in {out} (expected {out / 'results'}/*.parquet)")
    filters = _filters(filter_)
    maybe_compact(out)  # many small per-stage files: folded into parts first (results.compact)
    read, extra = columns_needed(metrics, rows, cols, filters)
    df, report = load_report(out, columns=read, extra=extra, split=split)  # damaged files are named on stderr and left out
    damaged = report.damaged
    try:
        text, notes = render(df, fmt, metrics=metrics, rows=rows, cols=cols, filters=filters, split=split,
                             digits=digits, compare_with=compare, expected_n=seeds, failures=run_failures(out))
    except ValueError as e:
        _fail(str(e))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        typer.echo(f"wrote {output}", err=True)
    else:
        sys.stdout.write(text)
    if fmt == "csv" or output:
        for n in notes:  # md/latex/html carry their notes inside the text
            typer.echo(f"note: {n}", err=True)
    if damaged:
        typer.echo(f"note: {len(damaged)} damaged result file(s) left out (named above); the table lacks "
                   f"their rows. `bdgrid run` with the same spec recomputes them.", err=True)
    if notes and notes[0].startswith("No results"):
        raise typer.Exit(1)


def plot(
    out: str = typer.Option(..., "--out", "-o", help="Run folder (holds results/ and curves/) or an s3:// --out."),
    kind: str = typer.Option(..., "--kind", help="acc-asr, tsbd-n or curves."),
    dest: Optional[Path] = typer.Option(None, help="Folder for the PNG and PDF (default <out>/figures)."),
    filter_: Optional[List[str]] = typer.Option(None, "--filter", help="column=value[,value] (repeatable)."),
    split: str = typer.Option("test", help="Split for acc-asr and tsbd-n."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", help="curves: only these metrics (repeatable)."),
):
    """Draw a figure (PNG at 300 dpi and PDF) from a run directory."""
    from results.plots import KINDS, NothingToPlot
    from results.plots import plot as draw

    if kind not in KINDS:
        _fail(f"unknown plot kind '{kind}'; valid: {', '.join(KINDS)}")
    out = _folder(out)
    if not out.is_dir():
        _fail(f"no run directory {out}")
    try:
        paths = draw(out, kind, dest, _filters(filter_), split, metric)
    except NothingToPlot as e:
        _fail(f"{e} in {out}", code=1)
    except OSError as e:  # the figures folder: e.g. a read-only run folder with the default --dest
        where = dest or out / "figures"
        _fail(f"cannot write the figures to {where}: {e.strerror or e}; choose a writable folder with --dest", code=1)
    except ValueError as e:
        _fail(str(e))
    if dest is None:
        _push(out)  # the figures went into an s3:// out's mirror
    for p in paths:
        typer.echo(str(p))


def report(
    out: str = typer.Option(..., "--out", "-o", help="Run folder or an s3:// --out."),
    output: Optional[Path] = typer.Option(None, "--output", "-O", help="The HTML file (default <out>/report.html)."),
):
    """One self-contained HTML page of a run: tables, figures, failures, warnings, diagnostics,
    provenance and time per stage; it opens with no network."""
    from results.report import write
    from results.writer import WriteError

    out = _folder(out)
    if not out.is_dir():
        _fail(f"no run folder {out}")
    try:
        path = write(out, output)
    except WriteError as e:
        _fail(f"{e}; write it elsewhere with --output", code=1)
    if output is None:
        _push(out)
    typer.echo(str(path))
