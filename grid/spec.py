"""Grid spec: YAML -> pydantic models, with the line number of every value kept for messages.

A spec names the axes of a grid (datasets x archs x attacks x pratios x seeds, then every
defense config on every cell), the training recipe, per-stage Ray resources, retries and
where outputs go. ``load_spec`` parses it (``yaml.safe_load`` semantics: ``yaml.compose``
builds the node tree from which we read both values and lines) and returns the model plus
every *structural* problem; ``grid.validate`` adds the semantic ones (names, parameters,
ranges, duplicates, roots, GPUs). ``expand`` turns a valid spec into cells.

Reference: examples/quickstart.yaml and the README's grid section list every field.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from defense.registry import did_you_mean
from grid.tune.space import TuneBlock

# ``import``: a model trained elsewhere (``models:``), read in place of an ``attack`` stage
STAGE_KINDS = ("data", "resource", "attack", "import", "prepare", "defense", "eval")
CELL_AXES = ("dataset", "arch", "attack", "pratio", "seed")


# ----------------------------------------------------------------------------- problems

@dataclass(frozen=True)
class Problem:
    path: tuple  # YAML path, e.g. ("attacks", 1, "name")
    msg: str
    line: int | None = None  # 1-based

    def render(self, file: str = "spec") -> str:
        where = f"{file}:{self.line}" if self.line else file
        loc = path_str(self.path)
        return f"{where}: {loc + ': ' if loc else ''}{self.msg}"


def path_str(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class SpecError(Exception):
    """A spec with problems; ``problems`` lists every one (each rendered with file and line)."""

    def __init__(self, problems: list[Problem], file: str = "spec"):
        self.problems, self.file = problems, file
        super().__init__("\n".join(p.render(file) for p in problems))


# ----------------------------------------------------------------------------- models

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageResources(_Strict):
    cpus: float = Field(1.0, gt=0, description="Ray num_cpus of each task of this stage (also its torch threads)")
    gpus: float = Field(0.0, ge=0, description="Ray num_gpus, fractional allowed so small trials share a GPU")


def _res(cpus: float = 1.0, gpus: float = 0.0) -> Any:
    return Field(default_factory=lambda: StageResources(cpus=cpus, gpus=gpus))


class Resources(_Strict):
    data: StageResources = _res()
    resource: StageResources = _res()
    attack: StageResources = _res()
    prepare: StageResources = _res()
    defense: StageResources = _res()
    eval: StageResources = _res()


class DatasetSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    root: str | None = None  # folder with the standard files (not needed for synthetic)


class AttackSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class DefenseSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    # {param: [v1, v2, ...]}: one defense config per value (product over several params);
    # for a defense with ``shared=`` params (TSBD) the shared prepare stage is computed once.
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    # YAML written by `bdgrid tune`: {defense: name, params: {...}}; explicit params win.
    params_from: str | None = None
    label: str | None = None  # name shown in tables (default: the defense name)


class ModelEntry(_Strict):
    """One entry of ``models:``: a backdoored model bdgrid did not train (``grid.models``).

    ``backdoorbench``: a BackdoorBench record folder or a glob of them (every match is a cell);
    arch, dataset, attack, pratio and target are read from the record. ``checkpoint``: a
    state_dict file, with the arch, dataset and attack it was trained for (its backdoor test set
    is rebuilt by bdgrid's attack, or read from ``backdoor_test``). Paths are relative to the
    spec file."""

    backdoorbench: str | None = None
    checkpoint: str | None = None
    arch: str | None = None
    dataset: str | None = None
    attack: str | None = None
    attack_params: dict[str, Any] = Field(default_factory=dict)
    pratio: float | None = None
    target: int | None = None  # checkpoint: default the spec's target; records carry theirs
    # the defender subset's and the defense's seed (records: default the record's random_seed)
    seed: int | None = None
    backdoor_test: str | None = None  # folder <true label>/<test index>.png
    root: str | None = None  # the clean data (default: the root of the spec's dataset of that name)
    dataset_params: dict[str, Any] | None = None  # default: the spec's dataset entry's params
    label: str | None = None  # name in tables (default: the record folder / checkpoint file name)

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, v):
        if not isinstance(v, dict):
            raise ValueError("a models: entry is a mapping, '- backdoorbench: <record folder or glob>' or "
                             "'- checkpoint: <file>' with arch, dataset and attack")
        return v


def _named(v: Any) -> Any:
    """``- badnets`` is shorthand for ``- {name: badnets}``."""
    return {"name": v} if isinstance(v, str) else v


class GridSpec(_Strict):
    name: str = "grid"
    # the trained grid's axes; a spec with ``models:`` may leave all three out
    datasets: list[DatasetSpec] = Field(default_factory=list)
    archs: list[str] = Field(default_factory=list)
    attacks: list[AttackSpec] = Field(default_factory=list)
    models: list[ModelEntry] = Field(default_factory=list)  # models trained elsewhere (grid.models)
    pratios: list[float] = Field(default_factory=lambda: [0.1])  # BackdoorBench default rate
    seeds: list[int] = Field(default_factory=lambda: [0])
    defenses: list[DefenseSpec] = Field(default_factory=lambda: [DefenseSpec(name="none")])
    target: int = 0  # all-to-one target class (BackdoorBench default 0)
    # one default for `bdgrid trial`, grids and tunes (defense.trial.TrialConfig.recipe): the
    # paper protocol is `recipe: paper`; every result row records the recipe
    recipe: str = "fast"
    epochs: int | None = None  # override the recipe's attack-training epochs
    defender_ratio: float = 0.05  # BackdoorBench: the defender holds 5% of the clean train set
    val_ratio: float = 0.2  # part of the test set held out for tuning; not reported
    resources: Resources = Field(default_factory=Resources)
    retries: int = Field(2, ge=0, description="retries of a stage after an exception or a dead worker")
    timeout: float | None = Field(None, gt=0, description="seconds per stage attempt; none = no limit")
    out: str | None = None  # output folder (the CLI's --out wins)
    artifacts: str | None = None  # artifact root URI (default <out>/artifacts)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    # your own modules registering datasets/models/attacks/defenses (grid.plugins)
    imports: list[str] = Field(default_factory=list)
    # `bdgrid tune`: Optuna over one defense's parameters on some of this grid's cells (grid.tune)
    tune: TuneBlock | None = None

    @field_validator("datasets", "attacks", "defenses", mode="before")
    @classmethod
    def _shorthand(cls, v):
        return [_named(x) for x in v] if isinstance(v, list) else v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # the default output folder is runs/<name>: a path in the name would write elsewhere
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError("a grid name is letters, digits, '_', '-', '.' (no '/', no leading '.'), "
                             f"at most 100 characters; got {v!r}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, v: list[int]) -> list[int]:
        bad = [x for x in v if not 0 <= x < 2 ** 32]
        if bad:  # numpy's and torch's generators are seeded from 32 bits here; larger fail mid-run
            raise ValueError(f"seeds must be in 0 .. {2 ** 32 - 1}, got {bad}")
        return v


# ----------------------------------------------------------------------------- YAML with lines

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; a megabyte is not a spec
MAX_YAML_VALUES = 200_000  # values after aliases are expanded: stops an alias bomb in milliseconds
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class YamlProblem(yaml.YAMLError):
    """Something a spec must not contain, found while reading its YAML (with the line)."""

    def __init__(self, msg: str, line: int | None):
        super().__init__(msg)
        self.msg, self.line = msg, line


def _walk(node: yaml.Node, path: tuple, lines: dict, loader: yaml.SafeLoader, budget: list, dups: list) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlProblem(f"the YAML expands to more than {MAX_YAML_VALUES:,} values (nested aliases?); "
                          f"a spec is refused beyond that", node.start_mark.line + 1)
    lines[path] = node.start_mark.line + 1
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        raise YamlProblem(f"YAML tag {node.tag} is not allowed in a spec (plain mappings and lists only)",
                          node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out = {}
        for k, v in node.value:
            key = loader.construct_object(k, deep=True)
            if key in out:  # safe_load would keep the last one silently
                dups.append((path + (key,), k.start_mark.line + 1, lines.get(path + (key,))))
            out[key] = _walk(v, path + (key,), lines, loader, budget, dups)
            lines.setdefault(path + (key,), k.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(v, path + (i,), lines, loader, budget, dups) for i, v in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def parse_yaml(text: str, dups: list | None = None) -> tuple[Any, dict[tuple, int]]:
    """Safe-load ``text``; also return {path: 1-based line} for every value. Duplicate keys are
    appended to ``dups`` as (path, line, first line); tags on mappings and lists, and YAML that
    expands past ``MAX_YAML_VALUES`` values, raise ``YamlProblem``."""
    loader = yaml.SafeLoader(text)
    dups = [] if dups is None else dups
    try:
        node = loader.get_single_node()
        lines: dict[tuple, int] = {}
        data = _walk(node, (), lines, loader, [MAX_YAML_VALUES], dups) if node is not None else None
    finally:
        loader.dispose()
    return data, lines


def line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    for i in range(len(path), -1, -1):
        if path[:i] in lines:
            return lines[path[:i]]
    return None


def _pydantic_problems(e: ValidationError, lines: dict) -> list[Problem]:
    out = []
    fields = list(GridSpec.model_fields)
    for err in e.errors():
        path = tuple(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            name = path[-1]
            parent = path[:-1]
            valid = _valid_keys(parent) or fields
            msg = f"unknown field '{name}'{did_you_mean(str(name), valid)}; valid: {', '.join(valid)}"
        elif err["type"] == "missing":
            msg = f"required field '{path[-1]}' is missing"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg}, got {err['input']!r}"
        out.append(Problem(path, msg, line_of(lines, path)))
    return out


def _valid_keys(parent: tuple) -> list[str]:
    """Field names of the model at ``parent`` (for did-you-mean on unknown keys)."""
    import typing

    model: Any = GridSpec
    keyed = False  # the next path element is a key of a dict field (tune.space.<name>), not a field
    for p in parent:
        if isinstance(p, int):
            continue
        if keyed:
            keyed = False
            continue
        f = getattr(model, "model_fields", {}).get(p)
        if f is None:
            return []
        ann = f.annotation
        args = getattr(ann, "__args__", ())
        keyed = any(typing.get_origin(a) is dict for a in (ann, *args))
        inner = [x for a in (ann, *args) for x in (a, *getattr(a, "__args__", ()))]
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


@dataclass
class LoadedSpec:
    spec: GridSpec | None
    lines: dict[tuple, int]
    file: str
    base_dir: Path  # relative paths in the spec (params_from, roots) are relative to this
    text: str
    partial: GridSpec | None = None  # spec is None: what parsed once the wrong values were dropped

    @property
    def hash(self) -> str:
        """sha256 of the spec's canonical JSON (formatting and comments do not change it)."""
        if self.spec is None:
            return ""
        blob = json.dumps(self.spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_spec(path: str | Path) -> tuple[LoadedSpec, list[Problem]]:
    """Parse a spec file; return it and its structural problems (empty when it parsed)."""
    p = Path(path)
    empty = LoadedSpec(None, {}, str(p), Path("."), "")
    if not p.exists():
        return empty, [Problem((), f"spec file not found: {p}")]
    if not p.is_file():
        return empty, [Problem((), "not a file (a directory?); give the spec's YAML file")]
    if p.stat().st_size > MAX_SPEC_BYTES:
        return empty, [Problem((), f"{p.stat().st_size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,}")]
    raw = p.read_bytes()
    if b"\0" in raw:
        return empty, [Problem((), "a binary file, not a YAML spec")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return empty, [Problem((), f"not UTF-8 text (byte {raw[e.start]:#04x} at line {line}); save the spec as UTF-8",
                               line)]
    return parse_spec(text, str(p), p.resolve().parent)


def parse_spec(text: str, file: str = "spec", base_dir: Path | None = None) -> tuple[LoadedSpec, list[Problem]]:
    base = base_dir or Path(".")
    dups: list = []
    try:
        data, lines = parse_yaml(text, dups)
    except YamlProblem as e:
        return LoadedSpec(None, {}, file, base, text), [Problem((), e.msg, e.line)]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return LoadedSpec(None, {}, file, base, text), [
            Problem((), f"not valid YAML: {getattr(e, 'problem', None) or e}", mark.line + 1 if mark else None)]
    if not isinstance(data, dict):
        return LoadedSpec(None, lines, file, base, text), [
            Problem((), "a spec is a YAML mapping with at least datasets, archs, attacks (or models)", 1)]
    from grid.tune import legacy

    if legacy.is_legacy(data):
        return LoadedSpec(None, lines, file, base, text), [Problem((), legacy.message(data), 1)]
    early = [Problem(path, f"duplicate key '{path[-1]}' (also at line {first}); YAML would keep only the last one",
                     line) for path, line, first in dups] + _bool_numbers(data, lines)
    try:
        spec = GridSpec.model_validate(data)
    except ValidationError as e:
        ls = LoadedSpec(None, lines, file, base, text)
        ls.partial = salvage(data)
        return ls, early + _pydantic_problems(e, lines)
    if early:  # the spec parsed, but not as written: checked like any other problem
        ls = LoadedSpec(None, lines, file, base, text)
        ls.partial = spec
        return ls, early
    return LoadedSpec(spec, lines, file, base, text), []


# numeric fields where YAML's true/false would silently become 1/0 (pydantic's lax mode)
_NUMERIC = {("seeds", "*"), ("pratios", "*"), ("target",), ("epochs",), ("retries",), ("timeout",),
            ("defender_ratio",), ("val_ratio",)}


def _bool_numbers(data: dict, lines: dict) -> list[Problem]:
    out = []
    for field, *rest in _NUMERIC:
        v = data.get(field)
        items = list(enumerate(v)) if rest and isinstance(v, list) else ([(None, v)] if not rest else [])
        for i, x in items:
            if isinstance(x, bool):
                path = (field,) if i is None else (field, i)
                out.append(Problem(path, f"expected a number, got {str(x).lower()}", line_of(lines, path)))
    return out


def salvage(data: dict, rounds: int = 50) -> GridSpec | None:
    """The spec with every structurally wrong value dropped (its default then applies), so that
    the semantic checks can still run and a user sees every problem in one pass, not the type
    errors first and the unknown names only after fixing them. None when a required field is
    wrong or missing. Only for validation: a spec with problems is never run."""
    import copy

    data = copy.deepcopy(data)
    for _ in range(rounds):
        try:
            return GridSpec.model_validate(data)
        except ValidationError as e:
            for err in e.errors():
                if not _drop(data, tuple(err["loc"]), err["type"] == "missing"):
                    return None
    return None


def _drop(data: dict, loc: tuple, missing: bool) -> bool:
    """Delete the deepest mapping key on ``loc``. A list element is never removed alone (that
    would shift the indices other problems are reported at): the field holding the list goes."""
    if len(loc) == 2 and loc[0] == "models" and isinstance(data.get("models"), list) \
            and isinstance(loc[1], int) and 0 <= loc[1] < len(data["models"]) and data["models"][loc[1]] != {}:
        data["models"][loc[1]] = {}  # a models: entry that is not a mapping: the others are still checked
        return True
    node, last = data, None  # (mapping, key) of the deepest mapping key reached
    for k in loc[:-1] if missing else loc:  # a missing key is not there to delete: its parent goes
        if isinstance(node, dict) and k in node:
            last, node = (node, k), node[k]
        elif isinstance(node, list) and isinstance(k, int) and 0 <= k < len(node):
            node = node[k]
        else:
            break
    if last is None or (last[0] is data and last[1] in ("datasets", "archs", "attacks")):
        return False  # a required field: nothing left to check the rest against
    del last[0][last[1]]
    return True


# ----------------------------------------------------------------------------- expansion

def canon(obj: Any) -> str:
    """Canonical JSON: the one way a config is written into keys and result rows."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class DefenseConfig:
    name: str
    params: tuple  # sorted (k, v) items of the user's params (params_from < params < sweep point)
    label: str
    where: tuple  # YAML path of the defense entry

    @property
    def params_dict(self) -> dict:
        return dict(self.params)


@dataclass(frozen=True)
class Cell:
    dataset: int  # index into spec.datasets
    arch: str
    attack: int  # index into spec.attacks
    pratio: float
    seed: int


def read_best(ls: LoadedSpec, d: DefenseSpec) -> dict:
    """The whole ``params_from`` document (``{}`` when unreadable: read_params_from reports why)."""
    p = Path(d.params_from)
    p = p if p.is_absolute() else ls.base_dir / p
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_params_from(ls: LoadedSpec, d: DefenseSpec) -> tuple[dict, str | None]:
    """Tuned params from ``params_from`` (``{defense: name, params: {...}}``); (params, problem)."""
    if not d.params_from:
        return {}, None
    p = Path(d.params_from)
    if not p.is_absolute():
        p = ls.base_dir / p
    if not p.exists():
        return {}, f"params_from file not found: {p}"
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        return {}, f"params_from {p} is not valid YAML: {e}"
    if not isinstance(doc, dict) or not isinstance(doc.get("params", {}), dict):
        return {}, f"params_from {p} must be a mapping {{defense: name, params: {{...}}}}"
    if doc.get("defense") not in (None, d.name):
        return {}, f"params_from {p} holds params for defense '{doc.get('defense')}', not '{d.name}'"
    return dict(doc.get("params") or {}), None


def defense_configs(ls: LoadedSpec) -> list[DefenseConfig]:
    """Every defense config: each entry, times the product of its sweep values."""
    import itertools

    out = []
    for i, d in enumerate(ls.spec.defenses):
        base, _ = read_params_from(ls, d)
        base.update(d.params)
        keys = sorted(d.sweep)
        for combo in itertools.product(*(d.sweep[k] for k in keys)) if keys else [()]:
            params = dict(base)
            params.update(zip(keys, combo))
            label = d.label or d.name
            out.append(DefenseConfig(d.name, tuple(sorted(params.items(), key=lambda kv: kv[0])), label,
                                     ("defenses", i)))
    return out


def cell_names(spec: GridSpec, cell) -> dict:
    """The names a filter compares: dataset, arch, attack, pratio, seed (and model, for a
    ``grid.models.ModelCell``)."""
    if not isinstance(cell, Cell):
        return {"dataset": cell.dataset, "arch": cell.arch, "attack": cell.attack, "pratio": cell.pratio,
                "seed": cell.seed, "model": cell.label}
    return {"dataset": spec.datasets[cell.dataset].name, "arch": cell.arch, "attack": spec.attacks[cell.attack].name,
            "pratio": cell.pratio, "seed": cell.seed}


def cell_matches(entry: dict, spec: GridSpec, cell, defense: DefenseConfig | None = None) -> bool:
    """Does an include/exclude entry or a tune_on/report_on filter select this cell (and defense)?"""
    names = cell_names(spec, cell)
    for k, v in entry.items():
        if k == "pratio":
            p = names["pratio"]
            if p is None or not (isinstance(v, (int, float)) and abs(p - float(v)) < 1e-12):
                return False
        elif k in ("dataset", "arch", "attack", "seed", "model") and names.get(k) != v:
            return False
        if k == "defense" and (defense is None or v not in (defense.name, defense.label)):
            return False
    return True


