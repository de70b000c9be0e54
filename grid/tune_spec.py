"""The tune spec: which backdoored models to tune on, which defense, its search space, the
objectives, the sampler and the storage. YAML (``yaml.safe_load``) -> pydantic models, then
every problem (unknown name with a did-you-mean, a parameter the defense does not have, an
empty or inverted range, a grid sampler over a continuous range, ...) is reported together,
each with its location in the file, before any compute starts -- as the grid spec does.

Example (``examples/tune-quickstart.yaml``)::

    study: tsbd-synthetic
    defense: tsbd
    params: {}                       # fixed parameters, merged under the tuned ones
    space:
      n: {type: float, low: 0.01, high: 0.5, log: true}
      m: {type: float, low: 0.3, high: 0.95}
      alpha: {type: categorical, choices: [0.0, 0.7, 1.0]}
    objectives: [acc, asr]           # maximise ACC, minimise ASR -> Pareto front; or [der]
    sampler: tpe                     # tpe | nsga2 | grid | random
    n_trials: 24
    parallelism: 2
    base: {dataset: synthetic, arch: tiny_cnn, recipe: fast}
    tune_on: [{attack: badnets}]     # cells whose validation split the objectives read
    report_on: [{attack: blended}]   # transfer: evaluated with the chosen params afterwards
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from defense.trial import TrialConfig

# Direction of each objective a trial can report; all read the validation split only.
DIRECTIONS = {"acc": "maximize", "asr": "minimize", "ra": "maximize", "der": "maximize"}
SAMPLERS = ("tpe", "nsga2", "grid", "random")


class SpecError(ValueError):
    """A tune spec with problems; ``problems`` lists each with its location."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Dist(BaseModel):
    """One search-space entry: float / int range (optionally log scale or stepped) or categorical."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"] = "float"
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Any]] = None


_T = TrialConfig()


class Cell(BaseModel):
    """A backdoored model to tune on: the fields of ``defense.trial.TrialConfig`` that define it."""

    model_config = ConfigDict(extra="forbid")
    # defaults are TrialConfig's (one place): a cell left unsaid is the trial a user would run
    dataset: str = _T.dataset
    arch: str = _T.arch
    attack: str = _T.attack
    pratio: float = _T.pratio
    target: int = _T.target
    seed: int = _T.seed
    attack_params: dict[str, Any] = Field(default_factory=dict)
    dataset_params: dict[str, Any] = Field(default_factory=dict)
    data_root: Optional[str] = _T.data_root
    recipe: str = _T.recipe
    epochs: Optional[int] = _T.epochs  # attack-training epochs (None: the recipe's)
    defender_ratio: float = _T.defender_ratio  # BackdoorBench: the defender holds 5% of the clean training set
    val_ratio: float = _T.val_ratio  # share of the test set held out as the validation split

    def label(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.attack}@{self.pratio:g}/t{self.target}/s{self.seed}"

    def key(self) -> str:
        """Content key of the backdoored model (and its splits): sha256 of the canonical cell."""
        blob = json.dumps(self.model_dump(), sort_keys=True, default=str)
        return hashlib.sha256(f"tune-cell-v1:{blob}".encode()).hexdigest()[:16]


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_cpus: float = 1  # per trial task (also its torch thread count)
    num_gpus: float = 0  # fractional allowed: small trials can share a GPU


class TuneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str
    defense: str
    params: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Dist]
    objectives: list[str] = Field(default_factory=lambda: ["acc", "asr"])
    select: str = "der"  # how to pick one trial from a Pareto front: highest validation DER
    # only trials whose validation ACC is at most this far below the backdoored model's (mean over
    # cells, as a fraction: 0.02 = 2 points) may be picked, when any is; the clean-accuracy budget
    # FP/ANP/RNP use to stop pruning, applied to the choice of parameters
    max_acc_drop: Optional[float] = None
    sampler: str = "tpe"
    n_trials: int = 20  # COMPLETE trials the study should reach (counting earlier runs)
    parallelism: int = 2  # trials in flight at once
    max_failures: Optional[int] = None  # stop after this many failed trials (default n_trials)
    seed: int = 0
    storage: Optional[str] = None  # journal file path or RDB URL; default <out>/optuna.journal
    out: Optional[str] = None  # default runs/tune/<study>
    base: dict[str, Any] = Field(default_factory=dict)  # fields shared by every cell
    tune_on: list[dict[str, Any]]
    report_on: list[dict[str, Any]] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    device: str = "auto"
    imports: list[str] = Field(default_factory=list)  # modules registering extra defenses/attacks
    stale_after_s: float = 900.0  # a RUNNING trial of another host with no heartbeat for this long is failed
    # Tune on cells of a grid spec (tune_on/report_on are then filters over its cells, and the
    # backdoored models come from the grid's artifact store): see grid/tune_grid.py.
    grid: Optional[str] = None  # path, relative to the tune spec
    grid_out: Optional[str] = None  # the grid's output folder (default: its `out`, else runs/<name>)
    artifacts: Optional[str] = None  # the grid's artifact root (default: as `bdgrid run` picks it)

    @field_validator("study")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\n"):
            raise ValueError("study must be a non-empty name without slashes")
        return v

    # ---- derived
    def cells(self, which: str = "tune_on") -> list[Cell]:
        if self.grid:
            from grid import tune_grid

            return tune_grid.select(self.grid, getattr(self, which))
        return [Cell(**{**self.base, **c}) for c in getattr(self, which)]

    def directions(self) -> list[str]:
        return [DIRECTIONS[o] for o in self.objectives]

    def out_dir(self) -> Path:
        return Path(self.out or f"runs/tune/{self.study}")

    def storage_url(self) -> str:
        return self.storage or str(self.out_dir() / "optuna.journal")

    def tuned_on(self) -> list[str]:
        return [c.label() for c in self.cells()]


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> TuneSpec:
    """Read and validate a tune spec; raise ``SpecError`` listing every problem."""
    p = Path(path)
    if not p.exists():
        raise SpecError([f"{p}: no such file"])
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError([f"{p}: not valid YAML: {e}"])
    if not isinstance(raw, dict):
        raise SpecError([f"{p}: expected a mapping at the top level"])
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if isinstance(raw.get("grid"), str) and not Path(raw["grid"]).is_absolute():
        raw["grid"] = str(p.resolve().parent / raw["grid"])  # relative to the tune spec
    return parse_spec(raw, where=str(p))


def parse_spec(raw: dict, where: str = "spec") -> TuneSpec:
    try:
        spec = TuneSpec(**raw)
    except ValidationError as e:
        raise SpecError([f"{where}: {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()])
    problems = check_spec(spec, where)
    if problems:
        raise SpecError(problems)
    return spec


def distribution(d: Dist):
    """Our search-space entry -> an Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if d.type == "categorical":
        return CategoricalDistribution(d.choices)
    if d.type == "int":
        return IntDistribution(int(d.low), int(d.high), log=d.log, step=int(d.step or 1))
    return FloatDistribution(d.low, d.high, log=d.log, step=d.step)


def grid_values(d: Dist) -> list:
    """The finite values of an entry, for the grid sampler."""
    if d.type == "categorical":
        return list(d.choices)
    if d.type == "int":
        return list(range(int(d.low), int(d.high) + 1, int(d.step or 1)))
    n = int(round((d.high - d.low) / d.step))
    return [round(d.low + i * d.step, 12) for i in range(n + 1)]


def _check_dist(name: str, d: Dist, loc: str) -> list[str]:
    out = []
    if d.type == "categorical":
        if not d.choices:
            out.append(f"{loc}: categorical needs a non-empty 'choices' list")
        if d.low is not None or d.high is not None or d.log or d.step is not None:
            out.append(f"{loc}: categorical takes only 'choices'")
        return out
    if d.choices is not None:
        out.append(f"{loc}: 'choices' is for type: categorical (this is {d.type})")
    if d.low is None or d.high is None:
        out.append(f"{loc}: {d.type} needs 'low' and 'high'")
        return out
    if d.low > d.high:
        out.append(f"{loc}: low {d.low:g} > high {d.high:g}")
    if d.log and d.low <= 0:
        out.append(f"{loc}: log scale needs low > 0, got {d.low:g}")
    if d.log and d.step is not None:
        out.append(f"{loc}: log scale and step cannot be combined (Optuna)")
    if d.type == "int":
        for k in ("low", "high", "step"):
            v = getattr(d, k)
            if v is not None and float(v) != int(v):
                out.append(f"{loc}: int range needs an integer {k}, got {v}")
    if d.step is not None and d.step <= 0:
        out.append(f"{loc}: step must be > 0")
    return out


def check_spec(spec: TuneSpec, where: str = "spec") -> list[str]:
    """Every semantic problem of a parsed spec, each with its location."""
    from defense.registry import BadParams, UnknownName, did_you_mean

    from grid.plugins import import_plugins

    # reported, not raised: the user sees every problem at once
    problems: list[str] = [f"{where}: imports[{i}]: {msg}" for i, msg in import_plugins(spec.imports)]

    from defense.attacks import ATTACKS
    from defense.data import DATASETS
    from defense.methods import DEFENSES
    from defense.models import MODELS
    from defense.train import RECIPES

    # ---- objectives, sampler, counts
    for i, o in enumerate(spec.objectives):
        if o not in DIRECTIONS:
            problems.append(f"{where}: objectives[{i}]: unknown objective '{o}'{did_you_mean(o, DIRECTIONS)}; "
                            f"valid: {', '.join(DIRECTIONS)}")
    if not spec.objectives:
        problems.append(f"{where}: objectives: give at least one of {', '.join(DIRECTIONS)}")
    if len(set(spec.objectives)) != len(spec.objectives):
        problems.append(f"{where}: objectives: duplicate entries {spec.objectives}")
    if spec.select not in DIRECTIONS:
        problems.append(f"{where}: select: unknown metric '{spec.select}'; valid: {', '.join(DIRECTIONS)}")
    if spec.max_acc_drop is not None and not 0 <= spec.max_acc_drop <= 1:
        problems.append(f"{where}: max_acc_drop: a fraction in [0, 1] (0.02 = 2 points), got {spec.max_acc_drop}")
    if spec.sampler not in SAMPLERS:
        problems.append(f"{where}: sampler: unknown sampler '{spec.sampler}'{did_you_mean(spec.sampler, SAMPLERS)}; "
                        f"valid: {', '.join(SAMPLERS)}")
    if spec.n_trials < 1:
        problems.append(f"{where}: n_trials: must be >= 1, got {spec.n_trials}")
    if spec.parallelism < 1:
        problems.append(f"{where}: parallelism: must be >= 1, got {spec.parallelism}")
    if spec.resources.num_cpus <= 0 or spec.resources.num_gpus < 0:
        problems.append(f"{where}: resources: num_cpus must be > 0 and num_gpus >= 0")
    if spec.storage and "://" in spec.storage and not spec.storage.split("://")[0].split("+")[0] in (
            "postgresql", "mysql", "sqlite"):
        problems.append(f"{where}: storage: '{spec.storage}' is neither a journal file path nor an "
                        f"RDB URL (postgresql://, mysql://, sqlite:///)")
    if not spec.space:
        problems.append(f"{where}: space: empty search space")

    # ---- defense, fixed params and the space against its params dataclass
    entry = None
    try:
        entry = DEFENSES.get(spec.defense)
    except UnknownName as e:
        problems.append(f"{where}: defense: {e}")
    for name, d in spec.space.items():
        problems += _check_dist(name, d, f"{where}: space.{name}")
        if spec.sampler == "grid" and d.type == "float" and d.step is None and d.choices is None:
            problems.append(f"{where}: space.{name}: the grid sampler needs finite values: give 'step' "
                            f"or use type: categorical")
    if spec.sampler == "grid" and not any(_check_dist(n, d, "") for n, d in spec.space.items()):
        size = 1
        for d in spec.space.values():
            size *= len(grid_values(d)) if (d.type != "float" or d.step is not None) else 0
        if size and spec.n_trials > size:
            problems.append(f"{where}: n_trials: {spec.n_trials} exceeds the {size} points of the grid")
    if entry is not None:
        names = list(entry.defaults())
        for name in spec.space:
            if name not in names:
                problems.append(f"{where}: space.{name}: {spec.defense} has no parameter '{name}'"
                                f"{did_you_mean(name, names)}; valid: {', '.join(names) or '(none)'}")
        for name in spec.params:
            if name in spec.space:
                problems.append(f"{where}: params.{name}: also in space; fix it or tune it, not both")
        fixed = dict(spec.params)
        try:
            entry.make_params(spec.params)
        except BadParams as e:
            problems += [f"{where}: params: {p}" for p in e.problems]
            fixed = {}  # check the range ends against the defaults instead
        # the ends of every range (and every choice) must be valid parameter values
        ok_names = [n for n in spec.space if n in names and not _check_dist(n, spec.space[n], "")]
        for name in ok_names:
            d = spec.space[name]
            vals = d.choices if d.type == "categorical" else [d.low, d.high]
            for v in vals:
                v = int(v) if d.type == "int" else v
                try:
                    entry.make_params({**{k: x for k, x in fixed.items() if k in names}, name: v})
                except BadParams as e:
                    problems += [f"{where}: space.{name}: value {v!r}: {p}" for p in e.problems]

    # ---- cells
    if not spec.tune_on:
        problems.append(f"{where}: tune_on: name at least one backdoored model (cell) to tune on")
    if spec.grid:
        from grid import tune_grid

        if spec.base:
            problems.append(f"{where}: base: not used with grid (the grid spec defines the cells)")
        return problems + tune_grid.check(spec.grid, {"tune_on": spec.tune_on, "report_on": spec.report_on}, where)
    seen = {}
    for which in ("tune_on", "report_on"):
        for i, raw in enumerate(getattr(spec, which)):
            loc = f"{where}: {which}[{i}]"
            try:
                cell = Cell(**{**spec.base, **raw})
            except ValidationError as e:
                problems += [f"{loc}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
                continue
            for reg, name, params, fld in [(DATASETS, cell.dataset, cell.dataset_params, "dataset"),
                                           (MODELS, cell.arch, None, "arch"),
                                           (ATTACKS, cell.attack, cell.attack_params, "attack")]:
                try:
                    e = reg.get(name)
                    if params is not None:
                        e.make_params(params)
                except UnknownName as ex:
                    problems.append(f"{loc}.{fld}: {ex}")
                except BadParams as ex:
                    problems += [f"{loc}.{fld}_params: {p}" for p in ex.problems]
            if cell.recipe not in RECIPES:
                problems.append(f"{loc}.recipe: unknown recipe '{cell.recipe}'; valid: {', '.join(RECIPES)}")
            if not 0 < cell.pratio < 1:
                problems.append(f"{loc}.pratio: must be in (0, 1), got {cell.pratio}")
            if not 0 < cell.val_ratio < 1:
                problems.append(f"{loc}.val_ratio: must be in (0, 1), got {cell.val_ratio}")
            if not 0 < cell.defender_ratio <= 1:
                problems.append(f"{loc}.defender_ratio: must be in (0, 1], got {cell.defender_ratio}")
            if cell.dataset in DATASETS and DATASETS.get(cell.dataset).meta["info"].needs_root:
                if not cell.data_root or not Path(cell.data_root).exists():
                    problems.append(f"{loc}.data_root: dataset '{cell.dataset}' needs an existing data_root, "
                                    f"got {cell.data_root!r}")
            k = (which, cell.key())
            if k in seen:
                problems.append(f"{loc}: duplicate of {which}[{seen[k]}]")
            seen[k] = i
    return problems
