"""The dependency rules of the code base, checked: ``defense`` never imports ray or optuna; no
import cycles between bdgrid's modules; no function over 80 lines in ``grid/`` without a reason."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parent.parent
PACKAGES = ("grid", "results", "defense")


def test_defense_never_imports_ray_or_optuna():
    code = ("import sys, defense, defense.trial, defense.methods, defense.attacks, defense.data, defense.models, "
            "defense.resources, defense.metrics, defense.train\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'optuna'))\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every import (module level or inside a function) of a bdgrid module by another."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    target = full if full in mods else node.module
                    if target in mods and target != m:
                        edges[m].add(target)
            elif isinstance(node, ast.Import):
                edges[m] |= {a.name for a in node.names if a.name in mods and a.name != m}
    return edges


def test_no_import_cycles():
    """A package's ``__init__`` may import its own modules (registries fill themselves that way);
    any other cycle, lazy imports included, is a design error."""
    edges = _imports(_modules())
    cycles, state, stack = [], {}, []

    def visit(u: str) -> None:
        state[u] = "open"
        stack.append(u)
        for v in edges[u]:
            if v.startswith(u + "."):
                continue
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_grid_functions_stay_short():
    """No function in grid/ over 80 lines unless its docstring says why ("long because ...")."""
    long = []
    for p in (REPO / "grid").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80 and "long because" not in (ast.get_docstring(node) or ""):
                    long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
