"""Import a spec's ``imports``: the user's own modules that register datasets, models, attacks or
defenses (``@register_dataset``, ``@register_model``, ``@register_attack``, ``@register_defense``).

They are imported in the driver before the spec is validated (so their names are known) and in
every worker before a stage runs (a Ray worker is a fresh process). The spec's own folder is put
on ``sys.path`` first, so a ``my_defense.py`` next to the spec needs no install; on a cluster the
module must be importable on every node (installed, or the same path on a shared filesystem).
"""
from __future__ import annotations

import importlib
import sys


def import_plugins(modules: list[str], search: list[str] = ()) -> list[tuple[int, str]]:
    """Import ``modules`` (after putting ``search`` folders on ``sys.path``); returns
    ``(index, message)`` for each that failed, with the cause."""
    for folder in reversed(list(search)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    problems = []
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is a spec problem
            where = f"; searched the spec's folder {list(search)} and sys.path" if isinstance(e, ModuleNotFoundError) else ""
            problems.append((i, f"cannot import '{name}': {type(e).__name__}: {e}{where}"))
    return problems


def require_plugins(modules: list[str], search: list[str] = ()) -> None:
    """``import_plugins`` where the spec was already checked: a failure here (a worker that
    cannot import what the driver could) raises, with every cause."""
    failed = import_plugins(modules, search)
    if failed:
        raise ImportError("; ".join(m for _, m in failed))
