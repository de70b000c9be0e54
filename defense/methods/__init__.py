"""Defense registry. Every defense has one signature:

    defend(model, clean: Data, params, ctx: DefenseContext) -> DefenseOutput

``model`` is the backdoored model (the defense must not modify it in place: copy first),
``clean`` the defender's clean subset. No defense sees poisoned data or test data.

A defense with an expensive part that does not depend on all of its parameters (TSBD's
Stages 1a/1b do not depend on n or m) registers ``prepare=`` and ``shared=``: the grid
and the tuner compute ``prepare(model, clean, params, ctx)`` once per distinct value of the
``shared`` parameters and pass its result to ``defend`` as ``ctx.prepared``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from defense.data import Data
from defense.registry import Registry

DEFENSES = Registry("defense")


@dataclass
class DefenseContext:
    device: str | torch.device = "cpu"
    seed: int = 0
    target: int | None = None  # never used by honest defenses; here only for diagnostics
    progress: bool = False
    prepared: Any = None  # result of the entry's prepare(), when it has one
    log: Callable[[str], None] = lambda msg: None
    accel_on_cpu: bool = False  # run the GPU code path's options on the CPU too (CI; defense.train.accel_for)


@dataclass
class DefenseOutput:
    model: torch.nn.Module  # the purified model
    diagnostics: dict = field(default_factory=dict)  # JSON-able scalars/lists (rankings, counts); run_defense
    # adds weights_changed and neurons_pruned (defense.methods._common.model_change)
    curves: list[dict] = field(default_factory=list)  # per-epoch rows: {"phase", "epoch", ...}


def register_defense(name: str, params: type | None = None, prepare: Callable | None = None,
                     shared: tuple[str, ...] = (), **meta) -> Callable:
    return DEFENSES.register(name, params=params, prepare=prepare, shared=tuple(shared), **meta)


def run_defense(name: str, model: torch.nn.Module, clean: Data, params: dict | None = None,
                ctx: DefenseContext | None = None) -> DefenseOutput:
    entry = DEFENSES.get(name)
    p = entry.make_params(params)
    ctx = ctx or DefenseContext()
    if entry.meta.get("prepare") is not None and ctx.prepared is None:
        ctx.prepared = entry.meta["prepare"](model, clean, p, ctx)
    out = entry.fn(model, clean, p, ctx)
    # every defense, plug-ins included, records whether it changed the model (flat result columns)
    from defense.methods._common import model_change

    out.diagnostics = {**out.diagnostics, **model_change(model, out.model)}
    return out


@register_defense("none")
def no_defense(model, clean, params, ctx):
    """No defense: the backdoored model as it is (the 'before' row of every table)."""
    return DefenseOutput(model)


def _import_methods():
    import importlib
    import pkgutil

    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")


_import_methods()  # every module in this package registers its defenses on import
