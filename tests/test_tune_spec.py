"""Tune spec validation, search-space conversion and resume bookkeeping: no Ray, no training."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parent.parent
EXAMPLE = REPO / "examples" / "tune-quickstart.yaml"


def raw_spec(**kw):
    d = dict(study="s", defense="tsbd", space={"n": {"type": "float", "low": 0.01, "high": 0.5, "log": True}},
             tune_on=[{"attack": "badnets"}])
    d.update(kw)
    return d


def test_every_problem_reported_with_its_location():
    from grid.tune_spec import SpecError, parse_spec

    bad = raw_spec(
        defense="tsdb",
        objectives=["acc", "asrr"],
        sampler="cmaes",
        n_trials=0,
        tune_on=[{"attack": "badnets"}, {"attack": "badnet", "pratio": 1.5}],
        report_on=[{"attack": "blended", "arhc": "tiny_cnn"}],
    )
    with pytest.raises(SpecError) as e:
        parse_spec(bad, where="t.yaml")
    text = "\n".join(e.value.problems)
    for needle in ["t.yaml: defense: unknown defense 'tsdb' (did you mean 'tsbd'?)",
                   "objectives[1]: unknown objective 'asrr' (did you mean 'asr'?)",
                   "sampler: unknown sampler 'cmaes'",
                   "n_trials: must be >= 1",
                   "tune_on[1].attack: unknown attack 'badnet' (did you mean 'badnets'?)",
                   "tune_on[1].pratio: must be in (0, 1), got 1.5",
                   "report_on[0].arhc: Extra inputs are not permitted"]:
        assert needle in text, (needle, text)


def test_space_checked_against_the_defense_params():
    from grid.tune_spec import SpecError, parse_spec

    bad = raw_spec(
        params={"m": 0.7, "ft_epochs": "many"},
        space={"nn": {"low": 0.1, "high": 0.2},  # typo of n
               "m": {"low": 0.2, "high": 0.9},  # also fixed in params
               "alpha": {"low": 0.9, "high": 0.1},  # inverted
               "lr_un": {"low": 0.0, "high": 1e-3, "log": True},  # log from 0
               "r": {"type": "categorical", "choices": []},
               "n": {"low": 0.0, "high": 1.5}},  # 1.5 fails TSBDParams.check
        sampler="grid")
    with pytest.raises(SpecError) as e:
        parse_spec(bad)
    text = "\n".join(e.value.problems)
    for needle in ["space.nn: tsbd has no parameter 'nn' (did you mean 'n'?)",
                   "params.m: also in space",
                   "space.alpha: low 0.9 > high 0.1",
                   "space.lr_un: log scale needs low > 0",
                   "space.r: categorical needs a non-empty 'choices' list",
                   "space.n: value 1.5: tsbd: n must be in [0, 1], got 1.5",
                   "params: tsbd: parameter 'ft_epochs': expected an integer",
                   "space.n: the grid sampler needs finite values"]:
        assert needle in text, (needle, text)


def test_distributions_and_grid_values():
    import optuna.distributions as od

    from grid.tune_spec import Dist, distribution, grid_values

    assert distribution(Dist(low=1e-4, high=1e-2, log=True)) == od.FloatDistribution(1e-4, 1e-2, log=True)
    assert distribution(Dist(type="int", low=2, high=20, step=2)) == od.IntDistribution(2, 20, step=2)
    assert distribution(Dist(type="categorical", choices=[0.0, 0.7, 1.0])) == od.CategoricalDistribution([0.0, 0.7, 1.0])
    assert grid_values(Dist(low=0.1, high=0.3, step=0.1)) == [0.1, 0.2, 0.3]
    assert grid_values(Dist(type="int", low=1, high=5, step=2)) == [1, 3, 5]


def test_example_spec_checks_clean(tmp_path):
    from typer.testing import CliRunner

    from grid.cli import app

    for example in (EXAMPLE, REPO / "examples" / "tune-on-grid.yaml"):
        r = CliRunner().invoke(app, ["tune", str(example), "--check"])
        assert r.exit_code == 0, r.output
        assert "ok (1 cell(s) to tune on, 4 parameter(s)" in " ".join(r.output.split())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw_spec(defense="tsdb", sampler="cmaes")))
    r = CliRunner().invoke(app, ["tune", str(bad), "--check"])
    assert r.exit_code == 2
    assert "did you mean 'tsbd'" in r.output and "unknown sampler 'cmaes'" in r.output


def test_recover_fails_only_trials_of_dead_drivers(tmp_path):
    """A dead driver's RUNNING trials are failed and re-enqueued; a live one's, or a fresh
    heartbeat from another host, are left alone; COMPLETE trials are never touched."""
    import optuna

    from grid import tune_study

    storage = tune_study.open_storage(str(tmp_path / "j.journal"))
    study = optuna.create_study(storage=storage, study_name="r", directions=["maximize"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid now names no process (or a later one with another start time)
    host = __import__("socket").gethostname()
    me = tune_study.owner_id()
    owners = {"done": me, "alive": me, "dead": f"{host}:{dead.pid}:{tune_study._proc_start(dead.pid)}",
              "far_stale": "elsewhere:1:1", "far_fresh": "elsewhere:2:2"}
    trials = {}
    for name, owner in owners.items():
        t = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        t.set_user_attr(tune_study.OWNER_ATTR, owner)
        t.set_user_attr(tune_study.HEARTBEAT_ATTR, time.time() - (10_000 if name == "far_stale" else 0))
        trials[name] = t
    study.tell(trials["done"], 0.5)
    failed = tune_study.recover(study, stale_after_s=900)
    assert sorted(failed) == sorted([trials["dead"].number, trials["far_stale"].number])
    st = {t.number: t.state.name for t in study.get_trials()}
    assert st[trials["done"].number] == "COMPLETE" and st[trials["alive"].number] == "RUNNING"
    assert st[trials["far_fresh"].number] == "RUNNING" and st[trials["dead"].number] == "FAIL"
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(w.user_attrs["bdgrid_retry_of"] for w in waiting) == sorted(failed)
    assert {(w.params or w.system_attrs["fixed_params"])["x"] for w in waiting} == {trials["dead"].params["x"], trials["far_stale"].params["x"]}
    assert tune_study.recover(study) == []  # idempotent


def test_max_acc_drop_limits_the_chosen_trial(tmp_path):
    """From a real Optuna study's Pareto front: DER alone picks the trial that kills the backdoor
    at a high clean-accuracy cost; with a 2-point budget the pick is the best trial within it;
    with a budget no trial meets, the budget is ignored rather than returning nothing."""
    import optuna

    from grid import tune_best, tune_study
    from grid.tune_spec import SpecError, parse_spec

    study = optuna.create_study(storage=tune_study.open_storage(str(tmp_path / "j.journal")), study_name="s",
                                directions=["maximize", "minimize"])
    # (val acc, val asr, der); the backdoored model had val acc 0.90
    for acc, asr, d in [(0.90, 0.60, 0.70), (0.89, 0.30, 0.83), (0.80, 0.02, 0.90), (0.70, 0.00, 0.85)]:
        t = study.ask({"n": optuna.distributions.FloatDistribution(0, 1)})
        t.set_user_attr("cell:c", {"acc": acc, "asr": asr, "bd_acc": 0.90, "der": d})
        t.set_user_attr("der", d)
        study.tell(t, [acc, asr])
    pick = lambda **kw: tune_best.pick_best(parse_spec(raw_spec(**kw)), study)[0].number
    assert pick() == 2  # highest DER on the front
    assert pick(max_acc_drop=0.02) == 1  # best DER with at most 2 points of ACC lost
    assert pick(max_acc_drop=0.02, select="asr") == 1
    assert pick(max_acc_drop=0.0) == 0
    doc = tune_best.best_doc(parse_spec(raw_spec(max_acc_drop=0.02)), study)
    assert doc["trial"] == 1 and doc["acc_drop"] == pytest.approx(0.01) and doc["max_acc_drop"] == 0.02
    with pytest.raises(SpecError, match="max_acc_drop: a fraction in"):
        parse_spec(raw_spec(max_acc_drop=2.0))
