"""The ``bdgrid`` command line: one module per command group, over ``common`` (shared helpers).

    trial            grid.cli.trial      one trial, no Ray
    run/validate/status   grid.cli.grid  a grid spec
    tune             grid.cli.tune       Optuna over a grid spec's tune: block
    attacks ...      grid.cli.attacks    list attacks, preview triggers
    table/plot       results.results_cli
"""
from __future__ import annotations

import typer

from grid.cli import attacks, grid, trial, tune
from results.results_cli import plot, table

app = typer.Typer(help="bdgrid: attack-by-defense experiment grids for backdoor-defense research.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what is happening at INFO level.")):
    """bdgrid: attack-by-defense experiment grids for backdoor-defense research."""
    import logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


app.command("trial")(trial.trial)
app.command("run")(grid.run_cmd)
app.command("validate")(grid.validate_cmd)
app.command("status")(grid.status_cmd)
app.command("tune")(tune.tune)
app.command("table")(table)
app.command("plot")(plot)
app.add_typer(attacks.attacks_app, name="attacks")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
