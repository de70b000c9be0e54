"""The Optuna side of ``bdgrid tune``: storage, sampler, opening a study, and resuming a dead
driver's trials -- with Optuna's public API only.

Liveness: Optuna records heartbeats (``heartbeat_interval`` of ``RDBStorage``, read by
``optuna.storages.fail_stale_trials`` and ``RetryFailedTrialCallback``) only from inside
``study.optimize``; under ask/tell, which the driver needs to run trials as Ray stages, no
public API beats for a trial, and a journal file has no heartbeat at all. So every trial the
driver asks carries a ``bdgrid_owner`` user attribute (host, pid, process start time) and a
``bdgrid_heartbeat`` time it refreshes with ``Trial.set_user_attr``; ``recover`` fails the
RUNNING trials whose owner process is gone (same host) or whose heartbeat is older than
``stale_after_s`` (other hosts) with ``study.tell(number, state=FAIL)`` and re-enqueues their
parameters (``study.enqueue_trial``), as ``RetryFailedTrialCallback`` would. COMPLETE trials
are never touched.

Sources: Optuna reference -- ``JournalStorage(JournalFileBackend(path))``, ``RDBStorage``,
``Study.tell`` (accepts a trial number), ``Study.enqueue_trial``, ``Study.set_metric_names``,
``TPESampler(constant_liar=True)`` for parallel asks.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from grid.tune.space import TuneBlock, grid_values

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


def make_sampler(t: TuneBlock):
    """The sampler; Optuna marks ``multivariate``/``constant_liar`` experimental and says so on every
    construction: that notice shows with ``-v`` only (logging), not as a warning per run."""
    import logging
    import warnings

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        sampler = _make_sampler(t)
    for w in said:
        logging.getLogger("bdgrid.tune").info("optuna: %s", w.message)
    return sampler


def _make_sampler(t: TuneBlock):
    import optuna

    s = t.sampler
    if s == "tpe":
        # constant_liar: parallel trials in flight are treated as bad results so that TPE does not
        # propose the same point `parallelism` times (Optuna docs, TPESampler)
        return optuna.samplers.TPESampler(seed=t.seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=min(10, max(2, t.n_trials // 3)))
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=t.seed, population_size=max(4, min(50, t.n_trials // 2)))
    if s == "grid":
        return _ask_tell_grid_sampler()({n: grid_values(d) for n, d in t.space.items()}, seed=t.seed)
    return optuna.samplers.RandomSampler(seed=t.seed)


def _ask_tell_grid_sampler():
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


def open_study(t: TuneBlock, study_name: str, storage_url: str, tuned_on: list[str]):
    """Create or load the study; its objectives are named for optuna-dashboard."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(storage_url), study_name=study_name, sampler=make_sampler(t),
                                directions=t.directions(), load_if_exists=True)
    have = [d.name.lower() for d in study.directions]
    if have != t.directions():
        raise ValueError(f"study '{study_name}' exists with directions {have}, the spec asks {t.directions()}; "
                         f"use another study name")
    if "defense" not in study.user_attrs:
        with warnings.catch_warnings():  # set_metric_names is marked experimental
            warnings.simplefilter("ignore")
            study.set_metric_names(list(t.objectives))
        study.set_user_attr("defense", t.defense)
        study.set_user_attr("objectives", list(t.objectives))
        study.set_user_attr("tuned_on", tuned_on)
    elif study.user_attrs["defense"] != t.defense:
        raise ValueError(f"study '{study_name}' tunes {study.user_attrs['defense']}, the spec says {t.defense}")
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
    from optuna.trial import TrialState

    done, now = [], time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        alive = owner_alive(owner)
        if alive is None:
            last = t.user_attrs.get(HEARTBEAT_ATTR) or (t.datetime_start.timestamp() if t.datetime_start else now)
            alive = now - last < stale_after_s
        if alive:
            continue
        # skip_if_finished: another driver may have recovered it first
        frozen = study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if frozen.state != TrialState.FAIL or any(
                x.user_attrs.get("bdgrid_retry_of") == t.number for x in study.get_trials(deepcopy=False)):
            continue
        study.enqueue_trial(t.params, user_attrs={"bdgrid_retry_of": t.number,
                                                  "bdgrid_retry_reason": f"driver {owner} died"})
        done.append(t.number)
    return done


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    c = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        c[t.state.name.lower()] += 1
    return c
