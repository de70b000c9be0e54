"""The ``bdgrid`` command line: one module per command group, over ``common`` (shared helpers).

    trial            grid.cli.trial      one trial, no Ray
    run/validate/status/verify   grid.cli.grid  a grid spec and its run folder
    tune             grid.cli.tune       Optuna over a grid spec's tune: block
    attacks ...      grid.cli.attacks    list attacks, preview triggers
    defenses list    grid.cli.defenses   every defense with its parameters, defaults and meanings
    export-model     grid.cli.export     a run's model as a plain state_dict
    table/plot/report  results.results_cli
"""
from __future__ import annotations

import sys

import typer

from grid.cli import attacks, defenses, export, grid, trial, tune
from results.results_cli import plot, report, table

app = typer.Typer(help="bdgrid: attack-by-defense experiment grids for backdoor-defense research.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)  # plain click help: "--out TEXT", no <type> tags or boxes


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        import torch

        print(f"bdgrid {version('bdgrid')} (torch {torch.__version__}, python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what is happening at INFO level."),
          _v: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                  help="Print the versions of bdgrid, torch and python, and exit.")):
    """bdgrid: attack-by-defense experiment grids for backdoor-defense research."""
    import logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


app.command("trial")(trial.trial)
app.command("run")(grid.run_cmd)
app.command("validate")(grid.validate_cmd)
app.command("status")(grid.status_cmd)
app.command("verify")(grid.verify_cmd)
app.command("tune")(tune.tune)
app.command("table")(table)
app.command("export-model")(export.export_model)
app.command("plot")(plot)
app.command("report")(report)
app.add_typer(attacks.attacks_app, name="attacks")
app.add_typer(defenses.defenses_app, name="defenses")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
