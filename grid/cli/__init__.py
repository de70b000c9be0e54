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
                  rich_markup_mode=None)  # plain click help, no boxes

# Typer writes every value's type into help ("--out <str>"); the convention of argparse and most
# Unix tools is a placeholder that says what the value is ("--out DIR", "--param KEY=VALUE").
# Options without an explicit metavar get one here, from this table or their own name.
_METAVARS = {"out": "DIR", "dest": "DIR", "resources": "DIR", "data_root": "DIR", "output": "FILE",
             "artifacts": "URI", "storage": "URI", "address": "ADDRESS", "param": "KEY=VALUE",
             "attack_param": "KEY=VALUE", "data_param": "KEY=VALUE", "filter_": "COLUMN=VALUE",
             "spec_file": "SPEC"}


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        # the installed torch's metadata, not `import torch` (5+ s on a loaded 2-core machine)
        print(f"bdgrid {version('bdgrid')} (torch {version('torch')}, python {sys.version.split()[0]})")
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


def _name_metavars(cmd) -> None:
    import click

    for p in cmd.params:
        if p.metavar is None and not (isinstance(p, click.Option) and p.is_flag):
            p.metavar = _METAVARS.get(p.name, p.name.strip("_").upper())
        if p.param_type_name == "argument":  # typer prints "SPEC <str>" for arguments even with a metavar
            p.display_type_rich = lambda ctx: None
    for sub in getattr(cmd, "commands", {}).values():
        _name_metavars(sub)


def command():
    """The click command behind ``bdgrid`` (what the console script runs), with every value's
    placeholder named for what it is rather than its Python type."""
    cmd = typer.main.get_command(app)
    _name_metavars(cmd)
    return cmd


def main():  # pragma: no cover
    command()(prog_name="bdgrid")


if __name__ == "__main__":  # pragma: no cover
    main()
