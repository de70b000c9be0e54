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
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from grid.cells import expand, paused_gc
from grid.spec import STAGE_KINDS, Cell, LoadedSpec

CODE_VERSION = {"data": 1, "resource": 2, "attack": 1, "import": 1, "prepare": 2, "defense": 2, "eval": 1}
# an import stage reads a model and scores it on the test set, as an eval does: it runs with eval's resources
RESOURCES_OF = {"import": "eval"}


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
        parts = [i.get("model"), i.get("dataset"), i.get("arch"), i.get("attack"),
                 f"p={i['pratio']:g}" if "pratio" in i else None,
                 f"s={i['seed']}" if "seed" in i else None, i.get("defense")]
        return f"{self.kind}[{' '.join(str(p) for p in parts if p is not None)}]"


@dataclass
class CellStages:
    """The stages of one cell that every defense on it hangs from (what the tuner adds trials to)."""

    cell: Cell
    ident: dict  # identity columns of the cell's rows
    data: str  # data stage key
    attack: str  # attack stage key
    none_eval: str  # the eval stage of the backdoored model itself


@dataclass
class Plan:
    stages: dict[str, Stage]  # key -> stage, parents always before children
    cells: int
    grid: str
    spec_hash: str
    resources: Any = None  # the spec's per-kind Ray resources (for stages added later)
    cell_stages: dict = field(default_factory=dict)  # Cell -> CellStages
    _kids: dict = field(default_factory=dict, repr=False)  # key -> children, grown with the plan

    def of_kind(self, kind: str) -> list[Stage]:
        return [s for s in self.stages.values() if s.kind == kind]

    def children(self) -> dict[str, list[str]]:
        """key -> the keys of its children. Kept up to date as stages are added (the runner asks
        on every poll, and a tune adds stages while it runs), so only new stages are indexed."""
        if len(self._kids) != len(self.stages):
            for k, s in self.stages.items():  # parents come before children in this order
                if k not in self._kids:
                    self._kids[k] = []
                    for p in s.parents:
                        self._kids[p].append(k)
        return self._kids

    def only(self, evals: list[str]) -> "Plan":
        """The plan of just what the eval stages ``evals`` need."""
        keep = ancestors(self, evals)
        return Plan({k: s for k, s in self.stages.items() if k in keep}, self.cells, self.grid, self.spec_hash,
                    self.resources, dict(self.cell_stages))

    def counts(self) -> dict[str, int]:
        c = {k: len(self.of_kind(k)) for k in STAGE_KINDS}
        if not c["import"]:  # only grids with models: have the kind (the counts of the rest read as before)
            del c["import"]
        return c

    def add(self, kind: str, config: dict, parents: tuple, run: dict | None = None, info: dict | None = None) -> Stage:
        """The stage of this content, added once (the same key from another cell or trial is the same work)."""
        key = stage_key(kind, config, parents)
        if key not in self.stages:
            r = getattr(self.resources, RESOURCES_OF.get(kind, kind)) if self.resources is not None else None
            self.stages[key] = Stage(kind, key, config, parents, run or {}, info or {},
                                     r.cpus if r else 1.0, r.gpus if r else 0.0)
        return self.stages[key]


def ancestors(plan: Plan, keys) -> set[str]:
    """``keys`` and every stage they depend on."""
    out, stack = set(), list(keys)
    while stack:
        k = stack.pop()
        if k not in out:
            out.add(k)
            stack.extend(plan.stages[k].parents)
    return out


def stage_key(kind: str, config: dict, parents: tuple[str, ...]) -> str:
    # the bytes of canon({"kind", "version", "config", "parents"}) with its keys in sorted order,
    # written out so that only the config goes through the JSON encoder (the parents are hex
    # keys and the kind a plain name: nothing to escape); tests/test_results_store.py checks
    # that this equals the canon() of the whole dict
    blob = (f'{{"config":{_CANON(config)},"kind":"{kind}","parents":['
            + ",".join(f'"{p}"' for p in parents) + f'],"version":{CODE_VERSION[kind]}}}')
    return hashlib.sha256(blob.encode()).hexdigest()


def _canon_encoder():
    """grid.spec.canon as one prebuilt encoder. ``json.dumps`` with these options builds a
    JSONEncoder and then the C encoder on every call; for the planner's small configs that was
    a third of the encoding time. The C encoder built here is the one json.dumps itself uses
    (``json.encoder.c_make_encoder``, same arguments), so the bytes are the same
    (tests/test_results_store.py compares every key of a plan with canon())."""
    enc = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return enc.encode
    c = make(None, enc.default, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, True)
    return lambda obj: "".join(c(obj, 0)) if isinstance(obj, (dict, list)) else enc.encode(obj)


_CANON = _canon_encoder()
_RESOLVED: dict = {}  # (id(entry), canon(params)) -> (entry, resolved params, their canon())


def _resolved_canon(entry, params: dict) -> tuple[dict, str]:
    """The entry's params dataclass built from ``params`` (defaults filled in) as a plain dict,
    and its canonical JSON. Built once per distinct (entry, params): a grid asks for the same
    few thousand times, and ``dataclasses.asdict`` (which deep-copies every value) was a third
    of the planner's time. Each call gets its own copy of the top-level dict."""
    ck = (id(entry), _CANON(params) if params else "{}")
    hit = _RESOLVED.get(ck)
    if hit is None or hit[0] is not entry:
        from defense.registry import params_dict

        d = params_dict(entry.make_params(params))
        hit = _RESOLVED[ck] = (entry, d, _CANON(d))
    return dict(hit[1]), hit[2]


def _resolved(entry, params: dict) -> dict:
    return _resolved_canon(entry, params)[0]


@functools.lru_cache(maxsize=1024)
def _recipe(name: str, dataset: str, epochs) -> dict:
    """The training recipe as a plain dict, built once per (recipe, dataset, epochs) instead of
    once per cell (``dataclasses.asdict`` deep-copies it)."""
    from defense.train import get_recipe

    return dataclasses.asdict(get_recipe(name, dataset, epochs=epochs))


def sweep_label(name: str, user: dict, swept: list[str]) -> str:
    if not swept:
        return name
    return f"{name}(" + ",".join(f"{k}={user[k]}" for k in swept) + ")"


@paused_gc()
def build_plan(ls: LoadedSpec, cells: list | None = None, with_defenses: bool = True) -> Plan:
    """The stage DAG of a *validated* spec: every cell (or only ``cells``, (Cell, defenses) pairs
    from ``expand``) with its data, resource, attack and no-defense eval stages, and, with
    ``with_defenses``, each defense config's prepare/defense/eval stages."""
    s = ls.spec
    plan = Plan({}, 0, s.name, ls.hash, s.resources)
    cells = expand(ls) if cells is None else cells
    sweeps = {("defenses", i): sorted(d.sweep or {}) for i, d in enumerate(s.defenses)}  # once, not per defense
    for cell, defenses in cells:
        cs = add_cell(plan, ls, cell) if isinstance(cell, Cell) else add_model_cell(plan, ls, cell)
        for dc in defenses if with_defenses else ():
            if dc.name == "none":
                continue
            sweep_keys = sweeps.get(dc.where, [])
            label = dc.label if dc.label != dc.name else sweep_label(dc.name, dc.params_dict, sweep_keys)
            add_defense(plan, ls, cs, dc.name, dc.params_dict, label, info=tuned_info(ls, s.defenses[dc.where[1]]))
    plan.cells = len(plan.cell_stages)
    return plan


def tuned_info(ls: LoadedSpec, d) -> dict:
    """Rows of a defense whose params come from a tune's best.yaml say what it was tuned on."""
    if not d.params_from:
        return {}
    from grid.spec import read_best

    doc = read_best(ls, d)
    tuned = doc.get("tuned_on") if isinstance(doc, dict) else None
    return {"tuned_on": ",".join(map(str, tuned))} if tuned else {}


def add_cell(plan: Plan, ls: LoadedSpec, cell: Cell) -> CellStages:
    """A cell's data, resource, attack and no-defense eval stages."""
    from defense.attacks import ATTACKS
    from defense.data import DATASETS

    if cell in plan.cell_stages:
        return plan.cell_stages[cell]
    s = ls.spec
    ds, atk = s.datasets[cell.dataset], s.attacks[cell.attack]
    recipe = dict(_recipe(s.recipe, ds.name, s.epochs))  # paper: the dataset's epochs
    data = plan.add("data", {"dataset": ds.name, "params": _resolved(DATASETS.get(ds.name), ds.params)}, (),
                    run={"root": ds.root, "base_dir": str(ls.base_dir)}, info={"dataset": ds.name})
    aentry = ATTACKS.get(atk.name)
    aparams, aparams_json = _resolved_canon(aentry, atk.params)
    dparams_json = _resolved_canon(DATASETS.get(ds.name), ds.params)[1]
    ident = {"dataset": ds.name, "arch": cell.arch, "attack": atk.name, "attack_params": aparams_json,
             "pratio": cell.pratio, "target": s.target, "seed": cell.seed, "recipe": recipe["name"],
             "epochs": recipe["epochs"], "dataset_params": dparams_json, "defender_ratio": s.defender_ratio,
             "val_ratio": s.val_ratio}
    parents: tuple = (data.key,)
    if aentry.meta.get("resources"):
        # one per (data, attack, params, arch, recipe, target, seed): the resource cache
        # (defense.resources) keys its entries by the seed too, so two seeds are two resources
        r = plan.add("resource", {"attack": atk.name, "attack_params": aparams, "arch": cell.arch,
                                  "recipe": recipe, "target": s.target, "seed": cell.seed,
                                  "version": aentry.meta.get("version", 1)}, (data.key,),
                     run={"seed": cell.seed, "pratio": cell.pratio},
                     info={"dataset": ds.name, "arch": cell.arch, "attack": atk.name, "seed": cell.seed})
        parents = (data.key, r.key)
    attack = plan.add("attack", {"attack": atk.name, "attack_params": aparams, "pratio": cell.pratio,
                                 "target": s.target, "seed": cell.seed, "arch": cell.arch, "recipe": recipe,
                                 "val_ratio": s.val_ratio, "version": aentry.meta.get("version", 1)},
                      parents, info=dict(ident))
    return _with_no_defense(plan, ls, cell, ident, data.key, attack.key)


def add_model_cell(plan: Plan, ls: LoadedSpec, mc) -> CellStages:
    """A ``grid.models.ModelCell``'s data, import and no-defense eval stages. The import stage
    stands where a trained cell's attack stage does and stores the same artifact, keyed by the
    imported files' content (``mc.key``), not by where they are."""
    import json

    from defense.data import DATASETS

    if mc in plan.cell_stages:
        return plan.cell_stages[mc]
    s = ls.spec
    dparams, dparams_json = _resolved_canon(DATASETS.get(mc.dataset), json.loads(mc.dataset_params))
    data = plan.add("data", {"dataset": mc.dataset, "params": dparams}, (),
                    run={"root": mc.root, "base_dir": str(ls.base_dir)}, info={"dataset": mc.dataset})
    ident = {"dataset": mc.dataset, "arch": mc.arch, "attack": mc.attack, "attack_params": mc.attack_params,
             "target": mc.target, "seed": mc.seed, "dataset_params": dparams_json,
             "defender_ratio": s.defender_ratio, "val_ratio": s.val_ratio, "model": mc.label, **dict(mc.provenance)}
    if mc.pratio is not None:
        ident["pratio"] = mc.pratio
    config = {"source": mc.source, "content": mc.key, "arch": mc.arch, "target": mc.target, "val_ratio": s.val_ratio}
    if mc.source == "checkpoint":  # its backdoor test set may be rebuilt by bdgrid's attack, seeded
        config.update(attack=mc.attack, attack_params=json.loads(mc.attack_params), pratio=mc.pratio, seed=mc.seed)
    imp = plan.add("import", config, (data.key,), run={"path": mc.path, "backdoor_test": mc.backdoor_test},
                   info=dict(ident))
    return _with_no_defense(plan, ls, mc, ident, data.key, imp.key)


def _with_no_defense(plan: Plan, ls: LoadedSpec, cell, ident: dict, data: str, model: str) -> CellStages:
    """A cell's no-defense eval (the backdoored or imported model itself), and the cell recorded
    with its stages: the end of add_cell and add_model_cell alike."""
    from defense.methods import DEFENSES

    none_params, none_json = _resolved_canon(DEFENSES.get("none"), {})
    ev = plan.add("eval", {"defense": "none", "params": none_params, "val_ratio": ls.spec.val_ratio},
                  (data, model), info={**ident, "defense": "none", "defense_name": "none", "params": none_json})
    cs = CellStages(cell, ident, data, model, ev.key)
    plan.cell_stages[cell] = cs
    return cs


def add_defense(plan: Plan, ls: LoadedSpec, cs: CellStages, name: str, params: dict, label: str,
                splits: tuple[str, ...] | None = None, info: dict | None = None) -> Stage:
    """A defense config on a cell: its shared prepare stage (when the defense has one), its
    defense stage and its eval stage (returned). ``splits=("val",)``: an eval that scores the
    validation split only, as tuning trials do (the reported test split is never read)."""
    from defense.methods import DEFENSES

    s = ls.spec
    dentry = DEFENSES.get(name)
    dparams, dparams_json = _resolved_canon(dentry, params)
    dident = {**cs.ident, "defense": label, "defense_name": name, "params": dparams_json, **(info or {})}
    dparents: tuple = (cs.data, cs.attack)
    seed = cs.cell.seed
    if dentry.meta.get("prepare") is not None:
        shared = {k: dparams[k] for k in dentry.meta.get("shared", ())}
        prep = plan.add("prepare", {"defense": name, "shared": shared, "defender_ratio": s.defender_ratio,
                                    "seed": seed, "version": dentry.meta.get("version", 1)},
                        (cs.data, cs.attack), run={"params": params}, info={**cs.ident, "defense": name})
        dparents = (cs.data, cs.attack, prep.key)
    d = plan.add("defense", {"defense": name, "params": dparams, "defender_ratio": s.defender_ratio,
                             "seed": seed, "version": dentry.meta.get("version", 1)}, dparents, info=dident)
    econf = {"defense": name, "params": dparams, "val_ratio": s.val_ratio}
    if splits is not None and tuple(splits) != ("test", "val"):
        econf["splits"] = list(splits)
    return plan.add("eval", econf, (cs.data, cs.attack, d.key), info=dident)


def trial_spec(cfg) -> LoadedSpec:
    """The one-cell grid of a ``defense.trial.TrialConfig``: what `bdgrid trial` runs, as a spec."""
    from pathlib import Path

    from grid.spec import GridSpec

    spec = GridSpec(name="trial", datasets=[{"name": cfg.dataset, "params": dict(cfg.dataset_params),
                                              "root": cfg.data_root}],
                    archs=[cfg.arch], attacks=[{"name": cfg.attack, "params": dict(cfg.attack_params)}],
                    pratios=[cfg.pratio], seeds=[cfg.seed], target=cfg.target, recipe=cfg.recipe, epochs=cfg.epochs,
                    defender_ratio=cfg.defender_ratio, val_ratio=cfg.val_ratio)
    return LoadedSpec(spec, {}, "trial", Path("."), "")


def trial_model_key(cfg) -> str:
    """The content key of the backdoored model a trial trains: the same as the attack stage key
    of a grid (or tune) with that one cell, so the three commands name one model alike."""
    [attack] = build_plan(trial_spec(cfg), with_defenses=False).of_kind("attack")
    return attack.key
