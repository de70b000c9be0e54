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
from grid.cells import expand
from grid.spec import (CELL_AXES, STAGE_KINDS, LoadedSpec, Problem, canon, cell_matches, defense_configs, line_of,
                       read_params_from)

# URI schemes pyarrow.fs.FileSystem.from_uri understands (checked by name only: resolving an
# s3:// URI would contact the cloud at validation time).
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock")


# A grid over this many stages is refused before it is expanded (``--max-stages`` raises it): the
# plan of 10^7 stages alone would take minutes and gigabytes; a typo of an axis should not.
MAX_STAGES = 10_000_000


def stage_estimate(s) -> int:
    """An upper bound of the plan's stage count from the axis lengths alone (no expansion): per
    cell a data share, an attack, a no-defense eval, and per defense config prepare + defense + eval."""
    cells = len(s.datasets) * len(s.archs) * len(s.attacks) * len(s.pratios) * len(s.seeds) + len(s.include) * max(
        1, len(s.archs) * len(s.pratios) * len(s.seeds))
    configs = 0
    for d in s.defenses:
        n = 1
        for vals in d.sweep.values():
            n *= max(1, len(vals))
        configs += n
    # a models: glob counts once here (its matches are only known once the folders are listed)
    return (cells + len(s.models)) * (2 + 3 * configs) + len(s.datasets)


def every_problem(ls: LoadedSpec, parse_problems: list[Problem], gpus_available: float | None = None,
                  max_stages: int = MAX_STAGES) -> list[Problem]:
    """The parse problems and the semantic ones in one list. When the spec did not parse, the
    semantic checks run on what did (``ls.partial``: the wrong values dropped), so a user fixes
    everything in one pass instead of finding the unknown names only after the type errors."""
    spec = ls.spec or ls.partial
    if spec is not None and stage_estimate(spec) > max_stages:
        return parse_problems + [Problem((), f"the grid has up to {stage_estimate(spec):,} stages, over the limit of "
                                             f"{max_stages:,}; check the axes for a typo, or raise the limit with "
                                             f"--max-stages", 1)]
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
    from defense.registry import BadParams, UnknownName

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

    _check_names(ls, add, check_entry)
    model_cells = _check_models(ls, problems)
    _check_numbers(ls, add)
    _check_duplicates(ls, add)
    _check_include_exclude(ls, add, model_cells)
    _check_store_and_gpus(ls, add, gpus_available)
    if s.tune is not None:
        _check_tune(ls, add)

    # the grid after include/exclude must not be empty, every exclude must match something and
    # every include must add something (an include of cells the product already has is a typo or a
    # misunderstanding of include, and silently changes nothing)
    if not problems:
        cells = expand(ls)
        if not cells:
            add(("exclude",), "exclude removes every cell; the grid is empty")
        for which, what in (("exclude", "matches no cell of the grid"),
                            ("include", "adds no cell: the grid has every cell it names already, or an "
                                        "exclude removes them")):
            for i, entry in enumerate(getattr(s, which)):
                if not _entry_changes(ls, which, entry):
                    add((which, i), f"{which} entry {entry} {what} (a typo?)")
    return problems




def _check_names(ls: LoadedSpec, add, check_entry) -> None:
    """Empty axes; dataset, arch, attack and defense names and parameters; dataset roots."""
    from defense.attacks import ATTACKS
    from defense.data import DATASETS
    from defense.models import MODELS

    s = ls.spec

    # empty axes; with models: alone, the trained grid's three may be left out (datasets may
    # then be given only to say where the imported models' clean data are)
    trained = not s.models or bool(s.archs) or bool(s.attacks)
    for axis in ("datasets", "archs", "attacks") if trained else ():
        if getattr(s, axis):
            continue
        if axis not in s.model_fields_set:
            add((axis,), f"required field '{axis}' is missing" + (
                " (a grid of trained models needs datasets, archs and attacks; leave out archs and attacks "
                "to run the models: alone)" if s.models else ""))
        else:
            add((axis,), f"'{axis}' is empty; list at least one value")
    for axis in ("pratios", "seeds", "defenses"):
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
    _check_defenses(ls, add, check_entry)


def _check_defenses(ls: LoadedSpec, add, check_entry) -> None:
    """Defense names, sweep keys, params_from, and every expanded config's params."""
    from defense.methods import DEFENSES
    from defense.registry import BadParams

    s = ls.spec
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



def _check_models(ls: LoadedSpec, problems: list) -> list:
    """``models:``: every entry resolved to its cells (records inspected, checkpoints loaded
    safely, names and paths checked), each problem at its entry's line (``grid.models``)."""
    if not ls.spec.models:
        return []
    from grid.models import resolve

    cells, found = resolve(ls)
    problems += found
    return cells


def _check_numbers(ls: LoadedSpec, add) -> None:
    """Rates, ratios, the recipe and epochs."""
    from defense.train import RECIPES

    s = ls.spec

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



def _check_duplicates(ls: LoadedSpec, add) -> None:
    """The same value twice on an axis, or the same defense config twice."""
    from defense.attacks import ATTACKS
    from defense.data import DATASETS
    from defense.methods import DEFENSES

    s = ls.spec

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



def _check_include_exclude(ls: LoadedSpec, add, model_cells: list = ()) -> None:
    """include/exclude entries: known keys, names that are in the spec (or its models)."""
    from defense.models import MODELS

    s = ls.spec

    # include / exclude
    names = {"dataset": {d.name for d in s.datasets} | {c.dataset for c in model_cells},
             "attack": {a.name for a in s.attacks} | {c.attack for c in model_cells},
             "defense": {d.name for d in s.defenses} | {d.label for d in s.defenses if d.label},
             "model": {c.label for c in model_cells}}
    for which, allowed in (("include", CELL_AXES), ("exclude", CELL_AXES + ("model", "defense",))):
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



def _check_store_and_gpus(ls: LoadedSpec, add, gpus_available) -> None:
    """The artifact URI scheme, and GPU requests against the cluster's GPUs."""

    s = ls.spec

    # artifact URI
    if s.artifacts and "://" in s.artifacts:
        scheme = s.artifacts.split("://", 1)[0]
        if scheme not in URI_SCHEMES:
            add(("artifacts",), f"unsupported artifact URI scheme '{scheme}://'; valid: a local path or "
                                f"{', '.join(x + '://' for x in URI_SCHEMES)}")

    # GPUs
    if gpus_available is not None:
        for kind in (k for k in STAGE_KINDS if k != "import"):  # an import runs with eval's resources
            g = getattr(s.resources, kind).gpus
            if g > 0 and gpus_available <= 0:
                add(("resources", kind, "gpus"), f"{kind} stages ask for {g} GPU(s) but the cluster has none; "
                                                 f"set gpus: 0 or run with --address on a GPU cluster")
            elif g > gpus_available > 0 and g > 1:
                add(("resources", kind, "gpus"), f"{kind} stages ask for {g} GPUs per task; the largest the cluster "
                                                 f"could give is {gpus_available}")




def _resolved(reg, name: str, params: dict) -> dict:
    """Params with the entry's defaults filled in (as given when the entry or params are invalid)."""
    from defense.registry import params_dict

    try:
        p = reg.get(name).make_params(params)
    except Exception:  # unknown name or bad params: reported on their own
        return params
    return params_dict(p)


def _unknown(reg, name) -> str:
    from defense.registry import UnknownName
    try:
        reg.get(name)
    except UnknownName as e:
        return str(e)
    return ""


def _entry_changes(ls: LoadedSpec, which: str, entry: dict) -> bool:
    from grid.cells import expand
    from grid.spec import GridSpec

    # an include/exclude entry does something iff dropping it changes the expansion
    data = ls.spec.model_dump()
    data[which] = [e for e in getattr(ls.spec, which) if e is not entry]
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


# ----------------------------------------------------------------------------- the tune: block

def _check_tune(ls: LoadedSpec, add) -> None:
    """The ``tune:`` block: objectives, sampler, counts, storage, the defense and its space
    against the defense's parameters, and tune_on/report_on as filters over the grid's cells."""
    from defense.registry import did_you_mean
    from grid.tune.space import DIRECTIONS, SAMPLERS

    t = ls.spec.tune
    T = ("tune",)
    for i, o in enumerate(t.objectives):
        if o not in DIRECTIONS:
            add(T + ("objectives", i), f"unknown objective '{o}'{did_you_mean(o, DIRECTIONS)}; valid: {', '.join(DIRECTIONS)}")
    if not t.objectives:
        add(T + ("objectives",), f"give at least one of {', '.join(DIRECTIONS)}")
    if len(set(t.objectives)) != len(t.objectives):
        add(T + ("objectives",), f"duplicate entries {t.objectives}")
    if t.select not in DIRECTIONS:
        add(T + ("select",), f"unknown metric '{t.select}'; valid: {', '.join(DIRECTIONS)}")
    if t.max_acc_drop is not None and not 0 <= t.max_acc_drop <= 1:
        add(T + ("max_acc_drop",), f"a fraction in [0, 1] (0.02 = 2 points), got {t.max_acc_drop}")
    if not 0.5 <= t.confidence < 1:
        add(T + ("confidence",), f"a confidence level in [0.5, 1), e.g. 0.95, got {t.confidence}")
    if t.sampler not in SAMPLERS:
        add(T + ("sampler",), f"unknown sampler '{t.sampler}'{did_you_mean(t.sampler, SAMPLERS)}; valid: {', '.join(SAMPLERS)}")
    for k in ("n_trials", "parallelism"):
        if getattr(t, k) < 1:
            add(T + (k,), f"must be >= 1, got {getattr(t, k)}")
    if t.storage and "://" in t.storage and t.storage.split("://")[0].split("+")[0] not in ("postgresql", "mysql", "sqlite"):
        add(T + ("storage",), f"'{t.storage}' is neither a journal file path nor an RDB URL "
                              f"(postgresql://, mysql://, sqlite:///)")
    if t.study is not None and (not t.study or any(c in t.study for c in "/\\\n")):
        add(T + ("study",), "a study name is a non-empty name without slashes")
    _check_tune_space(ls, add)
    _check_tune_cells(ls, add)


def _check_tune_space(ls: LoadedSpec, add) -> None:
    """The tuned defense, its fixed params and the search space against its parameters."""
    from defense.methods import DEFENSES
    from defense.registry import BadParams, UnknownName, did_you_mean
    from grid.tune.space import dist_problems, grid_values

    t = ls.spec.tune
    T = ("tune",)
    if not t.space:
        add(T + ("space",), "empty search space")
    entry = None
    try:
        entry = DEFENSES.get(t.defense)
    except UnknownName as e:
        add(T + ("defense",), str(e))
    bad_dist, infinite = set(), False
    for name, d in t.space.items():
        for sub, msg in dist_problems(d):
            bad_dist.add(name)
            add(T + ("space", name) + sub, msg)
        if t.sampler == "grid" and d.type == "float" and d.step is None:
            infinite = True
            add(T + ("space", name), "the grid sampler needs finite values: give 'step' or use type: categorical")
    if t.sampler == "grid" and not bad_dist and not infinite:
        size = 1
        for d in t.space.values():
            size *= len(grid_values(d))
        if t.n_trials > size:
            add(T + ("n_trials",), f"{t.n_trials} exceeds the {size} points of the grid")
    if entry is not None:
        names = list(entry.defaults())
        for name in t.space:
            if name not in names:
                bad_dist.add(name)
                add(T + ("space", name), f"{t.defense} has no parameter '{name}'{did_you_mean(name, names)}; "
                                         f"valid: {', '.join(names) or '(none)'}")
        for name in t.params:
            if name in t.space:
                add(T + ("params", name), "also in space; fix it or tune it, not both")
        fixed = dict(t.params)
        try:
            entry.make_params(t.params)
        except BadParams as e:
            for m in e.problems:
                add(_param_path(T, m, t.params), m)
            fixed = {}  # check the range ends against the defaults instead
        for name in [n for n in t.space if n not in bad_dist]:
            d = t.space[name]
            for v in (d.choices if d.type == "categorical" else [d.low, d.high]):
                v = int(v) if d.type == "int" else v
                try:
                    entry.make_params({**{k: x for k, x in fixed.items() if k in names}, name: v})
                except BadParams as e:
                    for m in e.problems:
                        add(T + ("space", name), f"value {v!r}: {m}")


def _check_tune_cells(ls: LoadedSpec, add) -> None:
    """tune_on / report_on: filters over the grid's cells that name known axes and match a cell."""
    from defense.registry import did_you_mean
    from grid.tune.space import FILTER_KEYS

    t = ls.spec.tune
    T = ("tune",)
    if not t.tune_on:
        add(T + ("tune_on",), "name at least one cell to tune on, e.g. [{attack: badnets}]")
    cells = None
    for which in ("tune_on", "report_on"):
        for i, f in enumerate(getattr(t, which)):
            bad = [k for k in f if k not in FILTER_KEYS]
            for k in bad:
                add(T + (which, i, k), f"not a cell axis{did_you_mean(k, FILTER_KEYS)}; filter on {', '.join(FILTER_KEYS)}")
            if bad:
                continue
            if cells is None:
                try:
                    cells = expand(ls)
                except Exception:  # noqa: BLE001 - a grid part with problems: reported on its own
                    return
            if not any(cell_matches(f, ls.spec, c) for c, _ in cells):
                add(T + (which, i), f"{f} matches no cell of the grid")
