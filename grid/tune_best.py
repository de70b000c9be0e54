"""Choosing the tuned parameters from a study, and best.yaml (what a grid spec's ``params_from`` reads)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from grid.tune_spec import TuneSpec

log = logging.getLogger("bdgrid.tune")


def acc_drop(trial) -> float:
    """Validation ACC lost by the defense, mean over the trial's cells (fraction)."""
    cells = [v for k, v in trial.user_attrs.items() if k.startswith("cell:")]
    return sum(c["bd_acc"] - c["acc"] for c in cells) / len(cells) if cells else 0.0


def pick_best(spec: TuneSpec, study) -> tuple[Any, list]:
    """(chosen trial, Pareto trials). Single objective: the best trial. Several: the Pareto
    front, and from it the trial with the best ``spec.select`` value (validation DER by default).
    With ``max_acc_drop``, only trials within that clean-accuracy budget are chosen from, when
    any is (else the budget is ignored and the log says so)."""
    from optuna.trial import TrialState

    def within(ts):
        if spec.max_acc_drop is None:
            return ts
        ok = [t for t in ts if acc_drop(t) <= spec.max_acc_drop + 1e-9]
        if not ok:
            log.warning(f"no trial keeps validation ACC within {spec.max_acc_drop:.3f} of the backdoored "
                        f"model's; choosing among all")
        return ok or ts

    if len(spec.objectives) == 1:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            raise ValueError(f"study '{study.study_name}' has no complete trial yet")
        sign = 1 if spec.directions()[0] == "maximize" else -1
        best = max(within(done), key=lambda t: (sign * t.values[0], -t.number))
        return best, [best]
    front = study.best_trials

    def score(t):
        if spec.select in spec.objectives:
            v = t.values[spec.objectives.index(spec.select)]
        else:
            v = t.user_attrs.get(spec.select, t.user_attrs.get("der", 0.0))
        return v if spec.select != "asr" else -v

    return max(within(front), key=lambda t: (score(t), -t.number)), front


def best_doc(spec: TuneSpec, study) -> dict:
    best, front = pick_best(spec, study)
    attacks = sorted({c.attack for c in spec.cells()})
    return {
        "defense": spec.defense,
        "params": {**spec.params, **best.params},
        "tuned_on": attacks,
        "tuned_on_cells": spec.tuned_on(),
        "study": spec.study,
        "storage": spec.storage_url(),
        "objectives": {o: spec.directions()[i] for i, o in enumerate(spec.objectives)},
        "trial": best.number,
        "values": dict(zip(spec.objectives, best.values)),
        "acc_drop": round(acc_drop(best), 6),
        "max_acc_drop": spec.max_acc_drop,
        "split": "val",
        "pareto": [{"trial": t.number, "params": {**spec.params, **t.params},
                    "values": dict(zip(spec.objectives, t.values))} for t in front],
    }


def write_best(spec: TuneSpec, study, path: Path | None = None) -> Path:
    """best.yaml: what a grid spec reads with ``params_from: <file>`` (keys defense, params)."""
    import yaml

    path = path or spec.out_dir() / "best.yaml"
    doc = best_doc(spec, study)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("# written by `bdgrid tune`; chosen on the validation split\n"
                   + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    os.replace(tmp, path)
    return path


def load_best(path: str | Path) -> dict:
    """Read a best.yaml back (``params_from``): returns {defense, params, tuned_on, ...}."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict) or "defense" not in doc or not isinstance(doc.get("params"), dict):
        raise ValueError(f"{path}: not a bdgrid tune result (needs 'defense' and a 'params' mapping)")
    return doc
