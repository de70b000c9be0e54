"""``bdgrid defenses list``: every registered defense with each parameter's default and meaning."""
from __future__ import annotations

from typing import Optional

import typer

defenses_app = typer.Typer(help="List the defenses and their parameters.", no_args_is_help=True,
                           rich_markup_mode=None)


@defenses_app.command("list")
def list_defenses(name: Optional[str] = typer.Argument(None, help="Show only this defense.")):
    """Every registered defense: what it is, whether it has a shared prepare stage (computed once
    per model and reused across its configs), and each parameter with its default and meaning."""
    from rich.table import Table

    from defense.methods import DEFENSES
    from defense.registry import UnknownName
    from grid.cli.common import console, fail, param_docs

    entries = DEFENSES.entries()
    if name:
        try:
            entries = [DEFENSES.get(name)]
        except UnknownName as e:
            fail(str(e))
    for e in entries:
        doc = (e.doc or "").splitlines()[0] if e.doc else ""
        shared = e.meta.get("shared", ())
        title = f"{e.name}: {doc}" + (f"  [shared prepare stage: {', '.join(shared)}]" if e.meta.get("prepare") else "")
        t = Table(title=title, title_justify="left", show_lines=False)
        for c in ("parameter", "default", "meaning"):
            t.add_column(c, overflow="fold")
        for p, (default, meaning) in param_docs(e.params).items():
            t.add_row(p, repr(default), meaning)
        if not e.params:
            t.add_row("(none)", "", "")
        console.print(t)
