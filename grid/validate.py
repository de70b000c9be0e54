"""Semantic checks of a parsed spec: every problem at once, each with its YAML line and what
would be valid, before any compute starts.

Names are checked against the registries of ``defense`` (did-you-mean from
``defense.registry``), parameters through ``Entry.make_params`` (which reports unknown names,
wrong types and the params class's own range checks), then rates, empty axes, duplicates,
dataset roots, include/exclude entries, the artifact URI and GPUs.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from grid.plugins import import_plugins
from grid.spec import CELL_AXES, STAGE_KINDS, LoadedSpec, Problem, canon, defense_configs, expand, line_of, read_params_from

# URI schemes pyarrow.fs.FileSystem.from_uri understands (checked by name only: resolving an
# s3:// URI would contact the cloud at validation time).
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock")


def every_problem(ls: LoadedSpec, parse_problems: list[Problem], gpus_available: float | None = None) -> list[Problem]:
    """The parse problems and the semantic ones in one list. When the spec did not parse, the
    semantic checks run on what did (``ls.partial``: the wrong values dropped), so a user fixes
    everything in one pass instead of finding the unknown names only after the type errors."""
    if not parse_problems:
        return validate(ls, gpus_available)
    if ls.partial is None:
        return parse_problems
    seen = {p.path for p in parse_problems}
    more = validate(dataclasses.replace(ls, spec=ls.partial), gpus_available)
    return parse_problems + [p for p in more if p.path not in seen]


def validate(ls: LoadedSpec, gpus_available: float | None = None) -> list[Problem]:
    """Every semantic problem of ``ls`` (``ls.spec`` must have parsed). ``gpus_available``:
    GPUs in the cluster, or None when unknown (then GPU requests are not checked)."""
    from defense.attacks import ATTACKS
    from defense.data import DATASETS
    from defense.methods import DEFENSES
    from defense.models import MODELS
    from defense.registry import BadParams, UnknownName
    from defense.train import RECIPES

    s, lines = ls.spec, ls.lines
    problems: list[Problem] = []

    def add(path: tuple, msg: str) -> None:
        problems.append(Problem(path, msg, line_of(lines, path)))

    # first: the user's modules register names that the checks below look up
    for i, msg in import_plugins(s.imports, [str(ls.base_dir)]):
        add(("imports", i), msg)

    def check_entry(reg, name: str, params: dict | None, path: tuple):
        try:
            e = reg.get(name)
        except UnknownName as ex:
            add(path + ("name",) if params is not None else path, str(ex))
            return None
        if params is not None:
            try:
                e.make_params(params)
            except BadParams as ex:
                for m in ex.problems:
                    add(_param_path(path, m, params), m)
        return e

    # empty axes
    for axis in ("datasets", "archs", "attacks", "pratios", "seeds", "defenses"):
        if not getattr(s, axis):
            add((axis,), f"'{axis}' is empty; list at least one value")

    # datasets
    for i, d in enumerate(s.datasets):
        e = check_entry(DATASETS, d.name, d.params, ("datasets", i))
        if e is None:
            continue
        info = e.meta["info"]
        if info.needs_root:
            if d.root is None:
                add(("datasets", i), f"dataset '{d.name}' needs 'root:' (the folder with its standard files); "
                                     f"only generated datasets (synthetic) need none")
            elif not _resolve(d.root, ls.base_dir).exists():
                add(("datasets", i, "root"), f"dataset root not found: {d.root}")
            elif (d.params or {}).get("download", True) is False and not (d.params or {}).get("cache_dir"):
                # with downloads off, missing files would only surface in the data stage
                from defense.data.files import dataset_problem

                why = dataset_problem(d.name, _resolve(d.root, ls.base_dir))
                if why:
                    add(("datasets", i, "root"), why.splitlines()[0] + " (download: false)")
        if not 0 <= s.target < info.num_classes:
            add(("target",), f"target {s.target} is not a class of '{d.name}' (0..{info.num_classes - 1})")
    for i, a in enumerate(s.archs):
        check_entry(MODELS, a, None, ("archs", i))
    for i, a in enumerate(s.attacks):
        check_entry(ATTACKS, a.name, a.params, ("attacks", i))

    # defenses: names, sweep keys, params_from, and every expanded config's params
    for i, d in enumerate(s.defenses):
        e = check_entry(DEFENSES, d.name, None, ("defenses", i, "name"))
        _, prob = read_params_from(ls, d)
        if prob:
            add(("defenses", i, "params_from"), prob)
        for k, vals in d.sweep.items():
            if not vals:
                add(("defenses", i, "sweep", k), f"sweep of '{k}' has no values")
            if e is not None and e.params is not None and k not in e.defaults():
                from defense.registry import did_you_mean
                add(("defenses", i, "sweep", k), f"{d.name}: cannot sweep unknown parameter '{k}'"
                                                 f"{did_you_mean(k, e.defaults())}; valid: {', '.join(e.defaults())}")
    seen_problem = set()
    for dc in defense_configs(ls):
        if dc.name not in DEFENSES:
            continue
        entry = DEFENSES.get(dc.name)
        d = s.defenses[dc.where[1]]
        # an unknown sweep key is reported above; leaving it in would hide the range checks
        known = entry.defaults() if entry.params is not None else {}
        params = {k: v for k, v in dc.params_dict.items() if k not in d.sweep or k in known}
        try:
            entry.make_params(params)
        except BadParams as ex:
            for m in ex.problems:
                path = _param_path(dc.where, m, params, set(d.sweep))
                if (path, m) not in seen_problem:
                    seen_problem.add((path, m))
                    add(path, m)

    # rates and numbers
    for i, p in enumerate(s.pratios):
        if not 0 < p < 1:
            add(("pratios", i), f"poisoning rate must be in (0, 1), got {p} (10% is 0.1)")
    if not 0 < s.defender_ratio <= 1:
        add(("defender_ratio",), f"defender_ratio must be in (0, 1], got {s.defender_ratio} (BackdoorBench: 0.05)")
    if not 0 <= s.val_ratio < 1:
        add(("val_ratio",), f"val_ratio must be in [0, 1), got {s.val_ratio}")
    if s.recipe not in RECIPES:
        from defense.registry import did_you_mean
        add(("recipe",), f"unknown recipe '{s.recipe}'{did_you_mean(s.recipe, RECIPES)}; valid: {', '.join(RECIPES)}")
    if s.epochs is not None and s.epochs < 1:
        add(("epochs",), f"epochs must be >= 1, got {s.epochs}")

    # duplicates on every axis (the same cell would be listed twice)
    # (parameters compared with registry defaults filled in: {patch: 3} is BadNets' default)
    _dups(add, "datasets", [canon([d.name, _resolved(DATASETS, d.name, d.params)]) for d in s.datasets])
    _dups(add, "archs", list(s.archs))
    _dups(add, "attacks", [canon([a.name, _resolved(ATTACKS, a.name, a.params)]) for a in s.attacks])
    _dups(add, "pratios", [float(p) for p in s.pratios])
    _dups(add, "seeds", list(s.seeds))
    seen: dict[str, Any] = {}
    for dc in defense_configs(ls):
        k = canon([dc.name, _resolved(DEFENSES, dc.name, dc.params_dict)])
        if k in seen:
            add(dc.where, f"duplicate defense config {dc.name} {dc.params_dict or ''} (also {_ps(seen[k])})")
        else:
            seen[k] = dc.where

    # include / exclude
    names = {"dataset": {d.name for d in s.datasets}, "attack": {a.name for a in s.attacks},
             "defense": {d.name for d in s.defenses} | {d.label for d in s.defenses if d.label}}
    for which, allowed in (("include", CELL_AXES), ("exclude", CELL_AXES + ("defense",))):
        for i, entry in enumerate(getattr(s, which)):
            if not entry:
                add((which, i), f"empty {which} entry; give some of {', '.join(allowed)}")
            for k, v in entry.items():
                if k not in allowed:
                    from defense.registry import did_you_mean
                    add((which, i, k), f"unknown {which} key '{k}'{did_you_mean(k, allowed)}; valid: {', '.join(allowed)}")
                elif k in names and v not in names[k]:
                    add((which, i, k), f"{which} names {k} '{v}', which is not in the spec's "
                                       f"{k}s ({', '.join(sorted(names[k]))})")
                elif k == "pratio" and not (isinstance(v, (int, float)) and 0 < v < 1):
                    add((which, i, k), f"pratio must be a number in (0, 1), got {v!r}")
                elif k == "seed" and not isinstance(v, int):
                    add((which, i, k), f"seed must be an integer, got {v!r}")
                elif k == "arch" and v not in MODELS:
                    add((which, i, k), _unknown(MODELS, v))

    # artifact URI
    if s.artifacts and "://" in s.artifacts:
        scheme = s.artifacts.split("://", 1)[0]
        if scheme not in URI_SCHEMES:
            add(("artifacts",), f"unsupported artifact URI scheme '{scheme}://'; valid: a local path or "
                                f"{', '.join(x + '://' for x in URI_SCHEMES)}")

    # GPUs
    if gpus_available is not None:
        for kind in STAGE_KINDS:
            g = getattr(s.resources, kind).gpus
            if g > 0 and gpus_available <= 0:
                add(("resources", kind, "gpus"), f"{kind} stages ask for {g} GPU(s) but the cluster has none; "
                                                 f"set gpus: 0 or run with --address on a GPU cluster")
            elif g > gpus_available > 0 and g > 1:
                add(("resources", kind, "gpus"), f"{kind} stages ask for {g} GPUs per task; the largest the cluster "
                                                 f"could give is {gpus_available}")

    # the grid after include/exclude must not be empty, and every exclude must match something
    if not problems:
        cells = expand(ls)
        if not cells:
            add(("exclude",), "exclude removes every cell; the grid is empty")
        for i, entry in enumerate(s.exclude):
            if not _exclude_hits(ls, entry):
                add(("exclude", i), f"exclude entry {entry} matches no cell of the grid (a typo?)")
    return problems


def _resolved(reg, name: str, params: dict) -> dict:
    """Params with the entry's defaults filled in (as given when the entry or params are invalid)."""
    import dataclasses

    try:
        p = reg.get(name).make_params(params)
    except Exception:  # unknown name or bad params: reported on their own
        return params
    return {} if p is None else dataclasses.asdict(p)


def _unknown(reg, name) -> str:
    from defense.registry import UnknownName
    try:
        reg.get(name)
    except UnknownName as e:
        return str(e)
    return ""


def _exclude_hits(ls: LoadedSpec, entry: dict) -> bool:
    from grid.spec import GridSpec, expand

    # an exclude entry matches something iff dropping it changes the expansion
    data = ls.spec.model_dump()
    data["exclude"] = [e for e in ls.spec.exclude if e is not entry]
    other = LoadedSpec(GridSpec.model_validate(data), ls.lines, ls.file, ls.base_dir, ls.text)
    with_it, without = expand(ls), expand(other)
    return sum(len(d) + 1 for _, d in with_it) != sum(len(d) + 1 for _, d in without)


def _resolve(root: str, base: Path) -> Path:
    p = Path(root).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return base / p


def _ps(path: tuple) -> str:
    from grid.spec import path_str
    return path_str(path)


def _dups(add, axis: str, values: list) -> None:
    first: dict = {}
    for i, v in enumerate(values):
        if v in first:
            add((axis, i), f"duplicate entry (same as {axis}[{first[v]}]); each cell would run twice")
        else:
            first[v] = i


def _param_path(path: tuple, msg: str, params: dict, swept: set = frozenset()) -> tuple:
    """Point a parameter problem at the line of that parameter (under ``sweep`` when it is swept)
    when the message names it: quoted ('lr') or leading ("n must be in [0, 1]")."""
    for k in params:
        if f"'{k}'" in msg or re.match(rf"(\w+: )?{re.escape(k)}\b", msg):
            return path + (("sweep" if k in swept else "params"), k)
    return path + ("params",) if params else path
