"""Plan: cells -> a DAG of stages, each with a content key.

    data -> [resource] -> attack -> [prepare] -> defense -> eval
                                \\----------------------------> eval (defense 'none')

A stage's key is sha256 of the canonical JSON of (kind, code version, its config, its
parents' keys). The config holds every resolved parameter (registry defaults filled in), so
writing a default explicitly gives the same key, and a changed default changes it. Same key
= same work = done once, across cells, grids and runs: the backdoored model of a (dataset,
arch, attack, attack params, pratio, target, seed, recipe) is trained once whatever the
number of defenses; a TSBD sweep over ``n`` shares one ``prepare`` stage (Stages 1a/1b) per
distinct value of its ``shared`` params.

Per-stage code versions live in ``CODE_VERSION``: bump one when a stage's output would change
for the same config (old artifacts are then recomputed, not reused). Attacks and defenses may
also register ``version=`` to invalidate only their own stages.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

from grid.spec import STAGE_KINDS, LoadedSpec, canon, expand

CODE_VERSION = {"data": 1, "resource": 1, "attack": 1, "prepare": 2, "defense": 2, "eval": 1}


@dataclass
class Stage:
    kind: str
    key: str
    config: dict  # hashed: everything that determines the output
    parents: tuple[str, ...]
    run: dict = field(default_factory=dict)  # not hashed: where to find things (dataset root), probes
    info: dict = field(default_factory=dict)  # identity columns for result rows and the progress display
    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def label(self) -> str:
        i = self.info
        parts = [i.get("dataset"), i.get("arch"), i.get("attack"),
                 f"p={i['pratio']:g}" if "pratio" in i else None,
                 f"s={i['seed']}" if "seed" in i else None, i.get("defense")]
        return f"{self.kind}[{' '.join(str(p) for p in parts if p is not None)}]"


@dataclass
class Plan:
    stages: dict[str, Stage]  # key -> stage, parents always before children
    cells: int
    grid: str
    spec_hash: str

    def of_kind(self, kind: str) -> list[Stage]:
        return [s for s in self.stages.values() if s.kind == kind]

    def children(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {k: [] for k in self.stages}
        for s in self.stages.values():
            for p in s.parents:
                out[p].append(s.key)
        return out

    def counts(self) -> dict[str, int]:
        return {k: len(self.of_kind(k)) for k in STAGE_KINDS}


def stage_key(kind: str, config: dict, parents: tuple[str, ...]) -> str:
    blob = canon({"kind": kind, "version": CODE_VERSION[kind], "config": config, "parents": list(parents)})
    return hashlib.sha256(blob.encode()).hexdigest()


def _resolved(entry, params: dict) -> dict:
    p = entry.make_params(params)
    return {} if p is None else dataclasses.asdict(p)


def sweep_label(name: str, user: dict, swept: list[str]) -> str:
    if not swept:
        return name
    return f"{name}(" + ",".join(f"{k}={user[k]}" for k in swept) + ")"


def build_plan(ls: LoadedSpec) -> Plan:
    """The stage DAG of a *validated* spec."""
    from defense.attacks import ATTACKS
    from defense.data import DATASETS
    from defense.methods import DEFENSES
    from defense.train import get_recipe

    s = ls.spec
    stages: dict[str, Stage] = {}
    res = s.resources

    def add(kind: str, config: dict, parents: tuple, run: dict | None = None, info: dict | None = None) -> Stage:
        key = stage_key(kind, config, parents)
        if key not in stages:
            r = getattr(res, kind)
            stages[key] = Stage(kind, key, config, parents, run or {}, info or {}, r.cpus, r.gpus)
        return stages[key]

    recipe = dataclasses.asdict(get_recipe(s.recipe, epochs=s.epochs))
    cells = expand(ls)
    for cell, defenses in cells:
        ds, atk = s.datasets[cell.dataset], s.attacks[cell.attack]
        data = add("data", {"dataset": ds.name, "params": _resolved(DATASETS.get(ds.name), ds.params)}, (),
                   run={"root": ds.root, "base_dir": str(ls.base_dir)}, info={"dataset": ds.name})
        aentry = ATTACKS.get(atk.name)
        aparams = _resolved(aentry, atk.params)
        ident = {"dataset": ds.name, "arch": cell.arch, "attack": atk.name, "attack_params": canon(aparams),
                 "pratio": cell.pratio, "target": s.target, "seed": cell.seed}
        parents: tuple = (data.key,)
        if aentry.meta.get("resources"):
            # one per (data, attack, params, arch, recipe, target): resources do not depend on
            # the rate; the probe seed/rate only drive the poisoning call that builds them.
            r = add("resource", {"attack": atk.name, "attack_params": aparams, "arch": cell.arch,
                                 "recipe": recipe, "target": s.target,
                                 "version": aentry.meta.get("version", 1)}, (data.key,),
                    run={"seed": cell.seed, "pratio": cell.pratio},
                    info={"dataset": ds.name, "arch": cell.arch, "attack": atk.name})
            parents = (data.key, r.key)
        attack = add("attack", {"attack": atk.name, "attack_params": aparams, "pratio": cell.pratio,
                                "target": s.target, "seed": cell.seed, "arch": cell.arch, "recipe": recipe,
                                "val_ratio": s.val_ratio, "version": aentry.meta.get("version", 1)},
                     parents, info=dict(ident))
        # the no-defense rows of every cell: evaluate the backdoored model itself
        none_params = _resolved(DEFENSES.get("none"), {})
        add("eval", {"defense": "none", "params": none_params, "val_ratio": s.val_ratio},
            (data.key, attack.key), info={**ident, "defense": "none", "params": canon(none_params)})
        for dc in defenses:
            if dc.name == "none":
                continue
            dentry = DEFENSES.get(dc.name)
            dparams = _resolved(dentry, dc.params_dict)
            sweep_keys = sorted(next((d.sweep for i, d in enumerate(s.defenses) if ("defenses", i) == dc.where), {}))
            label = dc.label if dc.label != dc.name else sweep_label(dc.name, dc.params_dict, sweep_keys)
            dident = {**ident, "defense": label, "defense_name": dc.name, "params": canon(dparams)}
            dparents: tuple = (data.key, attack.key)
            if dentry.meta.get("prepare") is not None:
                shared = {k: dparams[k] for k in dentry.meta.get("shared", ())}
                prep = add("prepare", {"defense": dc.name, "shared": shared, "defender_ratio": s.defender_ratio,
                                       "seed": cell.seed, "version": dentry.meta.get("version", 1)},
                           (data.key, attack.key), run={"params": dc.params_dict},
                           info={**ident, "defense": dc.name})
                dparents = (data.key, attack.key, prep.key)
            d = add("defense", {"defense": dc.name, "params": dparams, "defender_ratio": s.defender_ratio,
                                "seed": cell.seed, "version": dentry.meta.get("version", 1)},
                    dparents, info=dident)
            add("eval", {"defense": dc.name, "params": dparams, "val_ratio": s.val_ratio},
                (data.key, attack.key, d.key), info=dident)
    return Plan(stages, len(cells), s.name, ls.hash)
