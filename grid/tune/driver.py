"""``bdgrid tune``: Optuna ask/tell over the grid engine.

Each trial adds, for every ``tune_on`` cell, a defense stage and a validation-only eval stage to
the grid's own plan (``grid.plan.add_defense``) and hands them to the grid's runner
(``grid.run.Runner``). So the backdoored models, attack resources and shared prepare stages
(TSBD Stages 1a/1b) are the grid's content-keyed artifacts: a ``bdgrid run`` before the tune
trains nothing the tune needs again, a killed tune resumes without recomputing a finished stage,
and retries, timeouts, failure files, warnings, the state file and ``bdgrid status`` are the
grid's. What is tuning code: asking, telling, and choosing (``grid.tune.choose``).

The objectives read the validation split only: a trial's eval stage has ``splits: [val]`` and
scores no reported-test image. ``report`` (``--evaluate``) scores chosen parameter sets on
both splits afterwards, as ordinary grid evals labelled ``<defense> (default)`` and
``<defense> (tuned)``, with ``tuned_on`` naming the attacks tuned on.

Sources: Optuna ask/tell interface (optuna.readthedocs.io, "Ask-and-Tell Interface"); Ray
``ray.wait`` (docs.ray.io, "Pattern: using ray.wait to limit pending tasks").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from grid.plan import Plan, add_cell, add_defense, ancestors, build_plan
from grid.cells import expand
from grid.spec import LoadedSpec
from grid.tune.choose import best_doc, trial_stats, write_best
from grid.tune.space import distribution
from grid.tune.study import HEARTBEAT_ATTR, OWNER_ATTR, counts, open_study, owner_id, recover

HEARTBEAT_EVERY_S = 30.0


@dataclass
class Tuning:
    """Where a tune of spec ``ls`` lives: ``<out>/tune/<study>/`` (best.yaml, plots, trials table,
    the journal unless ``storage`` names another)."""

    ls: LoadedSpec
    out: Path
    _cells: dict = field(default_factory=dict, repr=False)

    @property
    def t(self):
        return self.ls.spec.tune

    @property
    def study_name(self) -> str:
        return self.t.study or self.ls.spec.name

    @property
    def dir(self) -> Path:
        return self.out / "tune" / self.study_name

    @property
    def storage(self) -> str:
        return self.t.storage or str(self.dir / "optuna.journal")

    def cells(self, which: str = "tune_on") -> list:
        """The grid's (cell, defenses) pairs that ``which``'s filters select, in grid order
        (expanded once: trial rows and labels ask for them on every trial)."""
        from grid.spec import cell_matches

        if which not in self._cells:
            self._cells[which] = [(c, d) for c, d in expand(self.ls)
                                  if any(cell_matches(f, self.ls.spec, c) for f in getattr(self.t, which))]
        return self._cells[which]

    def label(self, cell) -> str:
        """``dataset/arch/attack@pratio/sSEED``; an imported model's cell (``models:``) by its
        ``model`` name, as its rows and filters name it."""
        from grid.spec import cell_names

        n = cell_names(self.ls.spec, cell)
        if "model" in n:
            return f"{n['dataset']}/{n['arch']}/{n['model']}"
        return f"{n['dataset']}/{n['arch']}/{n['attack']}@{n['pratio']:g}/s{n['seed']}"

    def tuned_on(self) -> list[str]:
        return [self.label(c) for c, _ in self.cells()]

    def attacks_tuned_on(self) -> str:
        from grid.spec import cell_names

        return ",".join(sorted({cell_names(self.ls.spec, c)["attack"] for c, _ in self.cells()}))

    def open(self):
        return open_study(self.t, self.study_name, self.storage, self.tuned_on())


def _default_trial(t, entry) -> dict | None:
    """The defense's default value of every tuned parameter, when each lies in its range. A
    default that is no point of a range (TSBD's ``n: auto``) gives way to the defense's
    registered ``baseline`` value for it (TSBD: the fixed n 0.1)."""
    defaults = {**entry.defaults(), **t.params}
    baseline = entry.meta.get("baseline") or {}
    out = {}
    for name, d in t.space.items():
        v = defaults.get(name)
        if isinstance(v, str) and d.type != "categorical" and name in baseline:
            v = baseline[name]
        if d.type == "categorical":
            if v not in (d.choices or []):
                return None
        elif v is None or isinstance(v, str) or not (d.low <= v <= d.high):
            return None
        out[name] = v
    return out


def run_study(tu: Tuning, runner, plan: Plan, say: Callable[[str], None] = print) -> dict:
    """Run (or resume) the study until it has ``n_trials`` COMPLETE trials."""
    from optuna.trial import TrialState

    from defense.methods import DEFENSES

    t, ls = tu.t, tu.ls
    study = tu.open()
    recovered = recover(study, t.stale_after_s)
    if recovered:
        say(f"resumed: trials {recovered} were left running by a dead driver; failed and re-enqueued")
    entry = DEFENSES.get(t.defense)
    if t.default_first and not study.trials:
        base = _default_trial(t, entry)
        if base is not None:  # every study starts from the defense's own defaults: its baseline
            study.enqueue_trial(base, user_attrs={"bdgrid_default": True})
        else:
            say(f"note: {t.defense}'s default parameters lie outside the search space; no baseline trial")
    dists = {n: distribution(d) for n, d in t.space.items()}
    cells = [plan.cell_stages[c] for c, _ in tu.cells()]
    me = owner_id()
    inflight: dict[int, tuple] = {}  # trial number -> (trial, [eval keys])
    told, failed = [], []
    max_fail = t.max_failures if t.max_failures is not None else t.n_trials
    stored = _StoredRows(tu.out)
    last_beat = time.time()
    while True:
        c = counts(study)
        running_elsewhere = c["running"] - len(inflight)
        while (len(inflight) < t.parallelism and len(failed) < max_fail
               and c["complete"] + running_elsewhere + len(inflight) < t.n_trials):
            trial = study.ask(dists)
            trial.set_user_attr(OWNER_ATTR, me)
            trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            params = {**t.params, **trial.params}
            evals = [add_defense(plan, ls, cs, t.defense, params, f"{t.defense} (trial)", splits=("val",)).key
                     for cs in cells]
            runner.want(evals)
            inflight[trial.number] = (trial, evals)
        if not inflight:
            break
        runner.poll(timeout=1.0)
        if time.time() - last_beat > HEARTBEAT_EVERY_S:
            for trial, _ in inflight.values():
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            last_beat = time.time()
        for number in list(inflight):
            trial, evals = inflight[number]
            if not all(runner.finished(k) for k in evals):
                continue
            del inflight[number]
            bad = [k for k in evals if runner.status[k] in ("failed", "skipped")]
            if bad:
                why = "; ".join(sorted({runner.res.failed.get(k) or _failed_parent(runner, plan, k) for k in bad}))
                trial.set_user_attr("bdgrid_fail_reason", why[:2000])
                study.tell(trial, state=TrialState.FAIL)
                failed.append(number)
                say(f"trial {number} failed: {why}"[:500])
                continue
            per_cell = [_val_row(runner, stored, k) for k in evals]
            stats = trial_stats(per_cell, t.confidence)
            values = [stats[o] for o in t.objectives]
            for cs, r in zip(cells, per_cell):
                trial.set_user_attr(f"cell:{tu.label(cs.cell)}", {k: r.get(k) for k in (
                    "acc", "asr", "ra", "der", "bd_acc", "bd_asr", "bd_ra", "n_clean", "n_bd")})
            trial.set_user_attr("stats", stats)
            trial.set_user_attr("der", stats["der"])
            study.tell(trial, values)
            told.append(number)
            write_trial_rows(tu, trial, values, stats, cells, per_cell, evals)
            say(f"trial {number}: " + ", ".join(
                f"{o} {100 * stats[o]:.1f}" + (f" [{100 * stats[o + '_lo']:.1f}, {100 * stats[o + '_hi']:.1f}]"
                                               if o + "_hi" in stats else "") for o in t.objectives)
                + f"  params {trial.params}")
    c = counts(study)
    summary = {"study": tu.study_name, "storage": tu.storage, "told": told, "failed": failed,
               "recovered": recovered, "counts": c}
    return summary


def _failed_parent(runner, plan: Plan, key: str) -> str:
    for k in ancestors(plan, [key]):
        if k in runner.res.failed:
            return f"{plan.stages[k].kind} stage failed: {runner.res.failed[k]}"
    return "skipped"


class _StoredRows:
    """Rows of evals that finished in an earlier run (read once, lazily)."""

    def __init__(self, out: Path):
        self.out, self.df = out, None

    def get(self, key: str, split: str) -> dict:
        import results

        if self.df is None:
            self.df = results.load(self.out)
        rows = self.df[(self.df["key"] == key) & (self.df["split"] == split)]
        return rows.iloc[0].to_dict()


def _val_row(runner, stored: _StoredRows, key: str) -> dict:
    rows = runner.rows.get(key)
    if rows is not None:
        return next(r for r in rows if r["split"] == "val")
    return stored.get(key, "val")


def write_trial_rows(tu: Tuning, trial, values: list[float], stats: dict, cells, per_cell: list[dict],
                     evals: list[str]) -> None:
    """One Parquet row per (trial, cell) in the ``trials`` table of the tune folder, split val."""
    import results

    t = tu.t
    rows = []
    for cs, r, key in zip(cells, per_cell, evals):
        rows.append({**cs.ident, "grid": f"tune:{tu.study_name}", "defense": t.defense,
                     "params": {**t.params, **trial.params}, "split": "val",
                     "tuned_on": tu.attacks_tuned_on(), "study": tu.study_name, "trial": trial.number,
                     "cell": tu.label(cs.cell), "values": dict(zip(t.objectives, [float(v) for v in values])),
                     "eval_key": key,
                     **{k: r.get(k) for k in ("acc", "asr", "ra", "der", "bd_acc", "bd_asr", "bd_ra",
                                              "n_clean", "n_bd")},
                     **{k: v for k, v in stats.items() if k.endswith(("_lo", "_hi"))}})
    results.write_stage(tu.dir, "tune-trial", f"{trial.number:05d}", rows, table="trials")


def choose(tu: Tuning, study=None) -> tuple[dict, Path]:
    """best.yaml from the stored study; returns (its content, its path)."""
    study = study or tu.open()
    doc = best_doc(tu.t, study, tu.study_name, tu.storage, tu.attacks_tuned_on().split(","))
    doc["tuned_on_cells"] = tu.tuned_on()
    return doc, write_best(doc, tu.dir / "best.yaml")


def report_evals(tu: Tuning, plan: Plan, params_sets: dict[str, dict]) -> list[tuple[str, str, str]]:
    """Add, for every tune_on and report_on cell, each named parameter set (e.g. default, tuned)
    as an ordinary eval of both splits; returns (set name, cell label, eval key)."""
    out = []
    tuned = {c for c, _ in tu.cells("tune_on")}
    for which in ("tune_on", "report_on"):
        for cell, _ in tu.cells(which):
            cs = add_cell(plan, tu.ls, cell)  # the cell's stages, added once
            for name, params in params_sets.items():
                info = {"tuned_on": tu.attacks_tuned_on() if name != "default" else None, "params_set": name,
                        "tuned_here": cell in tuned}
                ev = add_defense(plan, tu.ls, cs, tu.t.defense, params, f"{tu.t.defense} ({name})", info=info)
                out.append((name, tu.label(cell), ev.key))
    return out


def tune_plan(tu: Tuning) -> Plan:
    """The grid's plan restricted to the cells the tune reads: their data, resource, attack and
    no-defense eval stages (trials add the rest)."""
    cells = {c: d for which in ("tune_on", "report_on") for c, d in tu.cells(which)}
    return build_plan(tu.ls, cells=list(cells.items()), with_defenses=False)
