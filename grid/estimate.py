"""What a grid will cost, from what its stages took before (issue 18: ``validate`` and ``run
--dry-run`` state the grid's size and, when a previous run exists, its compute time).

The measured times are each stage's own seconds in ``<out>/executed.log`` (one line per executed
stage: kind, key, pid, seconds, node). A stage not measured yet is costed at the median of the
measured stages most like it: the same kind, method (attack or defense name), architecture and
dataset; else the same kind and method; else the same kind. Stages of a kind never measured are
counted and named, not guessed. The total is stage time summed, as on one worker: stages that run
at the same time divide the wall clock, not the compute.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from grid.plan import Plan, Stage


def measured_seconds(out: str | Path) -> dict[str, float]:
    """Stage key -> its own seconds, from ``<out>/executed.log`` (the latest line of a key wins);
    empty when the folder has no log."""
    path = Path(out) / "executed.log"
    seconds: dict[str, float] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return seconds
    for ln in lines:
        parts = ln.split()
        if len(parts) >= 4:
            try:
                seconds[parts[1]] = float(parts[3])
            except ValueError:  # a line cut by a crash: skip it, the rest is good
                continue
    return seconds


def _groups(st: Stage) -> list[tuple]:
    c, i = st.config, st.info
    method = c.get("defense") or c.get("attack") or c.get("dataset") or ""
    return [(st.kind, method, i.get("arch", ""), i.get("dataset", "")), (st.kind, method), (st.kind,)]


@dataclass
class Estimate:
    stages: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    measured: int = 0            # stages whose own time (or a like stage's) is known
    unknown: dict[str, int] = field(default_factory=dict)  # kind -> stages with nothing like them measured
    basis: int = 0               # measured stages the medians come from


def estimate(plan: Plan, keys, seconds: dict[str, float]) -> Estimate:
    """Cost of running the stages ``keys`` of ``plan``, from ``seconds`` (``measured_seconds``)."""
    samples: dict[tuple, list[float]] = {}
    for k, s in seconds.items():
        st = plan.stages.get(k)
        if st is not None:
            for g in _groups(st):
                samples.setdefault(g, []).append(s)
    medians = {g: statistics.median(v) for g, v in samples.items()}
    est = Estimate(basis=sum(1 for k in seconds if k in plan.stages))
    for k in keys:
        st = plan.stages[k]
        est.stages += 1
        est.by_kind[st.kind] = est.by_kind.get(st.kind, 0) + 1
        own = seconds.get(k)
        if own is None:
            own = next((medians[g] for g in _groups(st) if g in medians), None)
        if own is None:
            est.unknown[st.kind] = est.unknown.get(st.kind, 0) + 1
        else:
            est.seconds += own
            est.measured += 1
    return est


def _hms(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def describe(est: Estimate, out: str | Path, what: str = "to run") -> str:
    """One line for the terminal: how many stages of each kind, and the time they will take."""
    order = ["data", "resource", "import", "attack", "prepare", "defense", "eval"]
    kinds = ", ".join(f"{est.by_kind[k]} {k}" for k in sorted(est.by_kind, key=lambda k: (k not in order,
                                                                                          order.index(k) if k in order else 0, k)))
    line = f"cost: {est.stages} stages {what} ({kinds})" if est.stages else f"cost: nothing {what}"
    if not est.stages:
        return line
    if not est.basis:
        return (line + f"; no measured stage times yet ({Path(out) / 'executed.log'} absent): run a slice of the grid "
                "(e.g. one seed) to get an estimate")
    line += (f"; about {_hms(est.seconds)} of stage time (summed as on one worker; parallel stages share the wall "
             f"clock), from {est.basis} stages measured in {Path(out) / 'executed.log'}")
    if est.unknown:
        line += "; not costed (nothing like them measured): " + ", ".join(f"{n} {k}" for k, n in est.unknown.items())
    return line
