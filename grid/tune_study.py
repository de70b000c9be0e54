"""The Optuna side of ``bdgrid tune``: storage, sampler, study, and resuming a dead driver's trials.

Resume: every trial the driver asks carries a ``bdgrid_owner`` user attribute (host, pid, process
start time) and a heartbeat. ``recover`` fails the RUNNING trials whose owner process is gone
(same host) or whose heartbeat is older than ``stale_after_s`` (other hosts) and re-enqueues
their parameters; COMPLETE trials are never touched.

Sources: ``JournalStorage(JournalFileBackend(path))`` and ``RDBStorage`` (Optuna storages
reference); TPE's ``constant_liar`` for parallel asks (Optuna docs, TPESampler).
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from grid.tune_spec import TuneSpec, grid_values

OWNER_ATTR = "bdgrid_owner"
HEARTBEAT_ATTR = "bdgrid_heartbeat"


def open_storage(url: str):
    """An RDB URL (postgresql://, mysql://, sqlite:///) or else a journal file path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in url:
        # pool_pre_ping: a cluster's long-lived driver survives the database closing idle connections
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(url)))


def make_sampler(spec: TuneSpec):
    import optuna

    s = spec.sampler
    if s == "tpe":
        # constant_liar: parallel trials in flight are treated as bad results so that TPE does not
        # propose the same point `parallelism` times (Optuna docs, TPESampler).
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=min(10, max(2, spec.n_trials // 3)))
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed, population_size=max(4, min(50, spec.n_trials // 2)))
    if s == "grid":
        return _AskTellGridSampler({n: grid_values(d) for n, d in spec.space.items()}, seed=spec.seed)
    return optuna.samplers.RandomSampler(seed=spec.seed)


def _grid_sampler_class():
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """GridSampler calls ``study.stop()`` once the grid is exhausted, which raises outside
        ``study.optimize``; under ask/tell the driver's ``n_trials`` bound ends the study instead
        (the tell itself is already stored when after_trial raises: Optuna's _tell.py)."""

        def after_trial(self, study, trial, state, values):
            try:
                super().after_trial(study, trial, state, values)
            except RuntimeError as e:
                if "Study.stop" not in str(e):
                    raise

    return AskTellGridSampler


def _AskTellGridSampler(*a, **kw):
    return _grid_sampler_class()(*a, **kw)


def open_study(spec: TuneSpec, storage=None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage if storage is not None else open_storage(spec.storage_url())
    study = optuna.create_study(storage=storage, study_name=spec.study, sampler=make_sampler(spec),
                                directions=spec.directions(), load_if_exists=True)
    have = [d.name.lower() for d in study.directions]
    if have != spec.directions():
        raise ValueError(f"study '{spec.study}' exists with directions {have}, the spec asks {spec.directions()}; "
                         f"use another study name")
    if "defense" not in study.user_attrs:
        study.set_user_attr("defense", spec.defense)
        study.set_user_attr("objectives", spec.objectives)
        study.set_user_attr("tuned_on", spec.tuned_on())
    elif study.user_attrs["defense"] != spec.defense:
        raise ValueError(f"study '{spec.study}' tunes {study.user_attrs['defense']}, the spec says {spec.defense}")
    return study


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, /proc/<pid>/stat field 22): tells a
    live process from a later one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie is dead, only not yet reaped


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid())}"


def owner_alive(owner: str | None) -> bool | None:
    """True/False for an owner on this host; None when it cannot be told (other host, no owner)."""
    if not owner:
        return None
    host, pid, start = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    return _proc_start(int(pid)) == start and start != "None"


def recover(study, stale_after_s: float = 900.0) -> list[int]:
    """Fail the RUNNING trials whose driver is gone and re-enqueue their parameters.
    Returns the numbers of the trials failed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage, done = study._storage, []
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        alive = owner_alive(owner)
        if alive is None:
            last = t.user_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
            alive = now - last < stale_after_s
        if alive:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "bdgrid_fail_reason", f"driver {owner} died")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (UpdateFinishedTrialError, RuntimeError):
            continue  # another driver recovered it first
        study.enqueue_trial(t.params, user_attrs={"bdgrid_retry_of": t.number})
        done.append(t.number)
    return done


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    c = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        c[t.state.name.lower()] += 1
    return c
