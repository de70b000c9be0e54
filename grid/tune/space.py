"""The ``tune:`` block of a grid spec and its search space.

A tune spec is a grid spec (datasets, archs, attacks, pratios, seeds, recipe, resources, retries,
...: the same fields, defaults and checks) plus this block, which names the defense, the space,
the objectives and how to choose, and which of the grid's cells to tune on and report on::

    tune:
      defense: tsbd
      params: {un_threshold: 0.2}        # fixed, merged under the tuned ones
      space:
        n: {type: float, low: 0.01, high: 0.5, log: true}
        alpha: {type: categorical, choices: [0.0, 0.7, 1.0]}
      objectives: [acc, asr]             # validation split only; or [der]
      tune_on: [{attack: badnets}]       # filters over the grid's cells
      report_on: [{attack: blended}]     # transfer: scored with the chosen params afterwards

Sources: Optuna distributions (optuna.distributions: FloatDistribution, IntDistribution,
CategoricalDistribution; log and step cannot be combined).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

# Direction of each objective a trial can report; all read the validation split only.
DIRECTIONS = {"acc": "maximize", "asr": "minimize", "ra": "maximize", "der": "maximize"}
SAMPLERS = ("tpe", "nsga2", "grid", "random")
FILTER_KEYS = ("dataset", "arch", "attack", "pratio", "seed", "model")  # model: a ``models:`` entry's cell


class Dist(BaseModel):
    """One search-space entry: float / int range (optionally log scale or stepped) or categorical."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"] = "float"
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list[Any]] = None


class TuneBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    defense: str
    study: Optional[str] = None  # default: the grid's name
    params: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Dist]
    objectives: list[str] = Field(default_factory=lambda: ["acc", "asr"])
    select: str = "der"  # how to pick one trial from a Pareto front: highest validation DER
    # only trials whose validation ACC drop (mean over cells) is within this budget may be chosen;
    # with ``confidence`` the drop's upper confidence bound is what must fit (see grid.tune.choose)
    max_acc_drop: Optional[float] = None
    confidence: float = 0.95  # two-sided level of the binomial intervals on validation metrics
    sampler: str = "tpe"
    n_trials: int = 20  # COMPLETE trials the study should reach (counting earlier runs)
    parallelism: int = 2  # trials in flight at once
    max_failures: Optional[int] = None  # stop after this many failed trials (default n_trials)
    seed: int = 0
    storage: Optional[str] = None  # journal file path or RDB URL; default <out>/tune/<study>/optuna.journal
    tune_on: list[dict[str, Any]]
    report_on: list[dict[str, Any]] = Field(default_factory=list)
    default_first: bool = True  # enqueue the defense's defaults (fixed params) as trial 0: every study has its baseline
    stale_after_s: float = 900.0  # a RUNNING trial of another host with no heartbeat for this long is failed

    def directions(self) -> list[str]:
        return [DIRECTIONS[o] for o in self.objectives]


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


def dist_problems(d: Dist) -> list[tuple[tuple, str]]:
    """Problems of one entry, as (sub-path, message)."""
    out: list[tuple[tuple, str]] = []
    if d.type == "categorical":
        if not d.choices:
            out.append((("choices",), "categorical needs a non-empty 'choices' list"))
        if d.low is not None or d.high is not None or d.log or d.step is not None:
            out.append(((), "categorical takes only 'choices'"))
        return out
    if d.choices is not None:
        out.append((("choices",), f"'choices' is for type: categorical (this is {d.type})"))
    if d.low is None or d.high is None:
        out.append(((), f"{d.type} needs 'low' and 'high'"))
        return out
    if d.low > d.high:
        out.append((("low",), f"low {d.low:g} > high {d.high:g}"))
    if d.log and d.low <= 0:
        out.append((("low",), f"log scale needs low > 0, got {d.low:g}"))
    if d.log and d.step is not None:
        out.append((("step",), "log scale and step cannot be combined (Optuna)"))
    if d.type == "int":
        for k in ("low", "high", "step"):
            v = getattr(d, k)
            if v is not None and float(v) != int(v):
                out.append(((k,), f"int range needs an integer {k}, got {v}"))
    if d.step is not None and d.step <= 0:
        out.append((("step",), "step must be > 0"))
    return out
