"""The tune: block of a grid spec (validation with lines, in one pass with the grid's checks), the
old format's refusal, search-space conversion, resume bookkeeping and the choice of the best trial
with confidence intervals: no Ray, no training."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parent.parent
EXAMPLES = [REPO / "examples" / "tune-quickstart.yaml", REPO / "examples" / "tune-on-grid.yaml"]


def grid_with(tune: dict, **kw) -> dict:
    d = dict(name="t", datasets=[{"name": "synthetic", "params": {"n_train": 1000, "n_test": 300}}],
             archs=["tiny_cnn"], attacks=["badnets", "blended"], seeds=[0], tune=tune)
    d.update(kw)
    return d


def tune_block(**kw) -> dict:
    d = dict(defense="tsbd", space={"n": {"type": "float", "low": 0.01, "high": 0.5, "log": True}},
             tune_on=[{"attack": "badnets"}])
    d.update(kw)
    return d


def problems(tmp_path: Path, d: dict) -> list[str]:
    from grid.spec import load_spec
    from grid.validate import every_problem

    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    ls, probs = load_spec(f)
    return [p.render("t.yaml") for p in every_problem(ls, probs)]


def test_every_problem_of_both_parts_in_one_pass_with_lines(tmp_path):
    bad = grid_with(tune_block(defense="tsdb", objectives=["acc", "asrr"], sampler="cmaes", n_trials=0,
                               confidence=1.5, tune_on=[{"attack": "badnets"}, {"attack": "wanet"}, {"atack": "x"}],
                               report_on=[{"attack": "blended", "arch": "tiny_cnn", "arhc": 1}],
                               space={"n": {"low": 0.1, "high": 0.2, "lwo": 1}}),  # a type error in the block
                    pratios=[1.5], attacks=["badnets", "blended", "badnet"])  # and grid problems
    text = "\n".join(problems(tmp_path, bad))
    for needle in ["tune.space.n.lwo: unknown field 'lwo' (did you mean 'low'?)",
                   "tune.defense: unknown defense 'tsdb' (did you mean 'tsbd'?)",
                   "tune.objectives[1]: unknown objective 'asrr' (did you mean 'asr'?)",
                   "tune.sampler: unknown sampler 'cmaes'",
                   "tune.n_trials: must be >= 1",
                   "tune.confidence: a confidence level in [0.5, 1)",
                   "tune.tune_on[1]: {'attack': 'wanet'} matches no cell of the grid",
                   "tune.tune_on[2].atack: not a cell axis (did you mean 'attack'?)",
                   "tune.report_on[0].arhc: not a cell axis (did you mean 'arch'?)",
                   "pratios[0]: poisoning rate must be in (0, 1)",
                   "attacks[2].name: unknown attack 'badnet' (did you mean 'badnets'?)"]:
        assert needle in text, (needle, text)
    # every problem carries its line in the file
    assert all(line.startswith("t.yaml:") and line.split(":")[1].isdigit() for line in text.splitlines()
               if line.startswith("t.yaml")), text


def test_space_checked_against_the_defense_params(tmp_path):
    bad = grid_with(tune_block(
        params={"m": 0.7, "ft_epochs": "many"},
        space={"nn": {"low": 0.1, "high": 0.2},  # typo of n
               "m": {"low": 0.2, "high": 0.9},  # also fixed in params
               "alpha": {"low": 0.9, "high": 0.1},  # inverted
               "lr_un": {"low": 0.0, "high": 1e-3, "log": True},  # log from 0
               "r": {"type": "categorical", "choices": []},
               "n": {"low": 0.0, "high": 1.5}},  # 1.5 fails TSBDParams.check
        sampler="grid"))
    text = "\n".join(problems(tmp_path, bad))
    for needle in ["tune.space.nn: tsbd has no parameter 'nn' (did you mean 'n'?)",
                   "tune.params.m: also in space",
                   "tune.space.alpha.low: low 0.9 > high 0.1",
                   "tune.space.lr_un.low: log scale needs low > 0",
                   "tune.space.r.choices: categorical needs a non-empty 'choices' list",
                   "tune.space.n: value 1.5: tsbd: n must be in [0, 1], got 1.5",
                   "tune.params.ft_epochs: tsbd: parameter 'ft_epochs': expected an integer",
                   "tune.space.n: the grid sampler needs finite values"]:
        assert needle in text, (needle, text)


def test_distributions_and_grid_values():
    import optuna.distributions as od

    from grid.tune.space import Dist, distribution, grid_values

    assert distribution(Dist(low=1e-4, high=1e-2, log=True)) == od.FloatDistribution(1e-4, 1e-2, log=True)
    assert distribution(Dist(type="int", low=2, high=20, step=2)) == od.IntDistribution(2, 20, step=2)
    assert distribution(Dist(type="categorical", choices=[0.0, 0.7, 1.0])) == od.CategoricalDistribution([0.0, 0.7, 1.0])
    assert grid_values(Dist(low=0.1, high=0.3, step=0.1)) == [0.1, 0.2, 0.3]
    assert grid_values(Dist(type="int", low=1, high=5, step=2)) == [1, 3, 5]


def test_examples_check_clean_and_a_bad_spec_exits_2(tmp_path):
    from typer.testing import CliRunner

    from grid.cli import app

    for example in EXAMPLES:
        r = CliRunner().invoke(app, ["tune", str(example), "--check"])
        assert r.exit_code == 0, r.output
        assert "tune tsbd on 1 cell(s), 4 parameter(s)" in " ".join(r.output.split())
        r = CliRunner().invoke(app, ["validate", str(example)])  # `validate` and `tune --check` agree
        assert r.exit_code == 0, r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(grid_with(tune_block(defense="tsdb", sampler="cmaes"))))
    for cmd in (["tune", str(bad), "--check"], ["validate", str(bad)]):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert "did you mean 'tsbd'" in r.output and "unknown sampler 'cmaes'" in r.output
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({k: v for k, v in grid_with({}).items() if k != "tune"}))
    r = CliRunner().invoke(app, ["tune", str(plain)])
    assert r.exit_code == 2 and "no tune: block" in " ".join(r.output.split())


def test_old_tune_format_is_refused_with_the_equivalent_new_spec(tmp_path):
    """The pre-engine format prints a new spec that itself validates and names the same cells."""
    old = dict(study="s", defense="tsbd", params={"un_threshold": 0.2},
               space={"n": {"type": "float", "low": 0.01, "high": 0.5, "log": True}},
               base={"dataset": "synthetic", "dataset_params": {"n_train": 1000, "n_test": 300}, "arch": "tiny_cnn",
                     "recipe": "fast", "epochs": 2, "pratio": 0.1, "seed": 0},
               tune_on=[{"attack": "badnets"}], report_on=[{"attack": "blended"}],
               resources={"num_cpus": 1, "num_gpus": 0})
    [msg] = problems(tmp_path, old)
    assert "old tune format" in msg
    new_text = msg.split("in the new format:\n\n", 1)[1]
    new = yaml.safe_load(new_text)
    assert new["tune"]["tune_on"] == [{"attack": "badnets"}] and new["tune"]["report_on"] == [{"attack": "blended"}]
    assert new["epochs"] == 2 and new["recipe"] == "fast" and new["tune"]["params"] == {"un_threshold": 0.2}
    assert problems(tmp_path, new) == []


def test_recover_fails_only_trials_of_dead_drivers(tmp_path):
    """A dead driver's RUNNING trials are failed and re-enqueued; a live one's, or a fresh
    heartbeat from another host, are left alone; COMPLETE trials are never touched."""
    import optuna

    from grid.tune import study as tune_study

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
    assert tune_study.recover(study) == []  # idempotent


def test_wilson_interval_and_sample_size():
    from grid.tune.choose import n_to_separate, wilson

    lo, hi = wilson(0.5, 100, 0.95)  # the textbook value: 0.404 .. 0.596
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson(0.0, 72, 0.95)  # zero successes still gets an upper bound (Wald would give 0)
    assert lo == 0.0 and 0.04 < hi < 0.06
    assert wilson(0.9, 1000)[1] - wilson(0.9, 1000)[0] < wilson(0.9, 100)[1] - wilson(0.9, 100)[0]
    # intervals that do not overlap: z^2 (sqrt(p1 q1) + sqrt(p2 q2))^2 / d^2 = 3.84 * 0.573 / 0.0025 = 880
    assert n_to_separate(0.80, 0.85) == 881


def _study_with(tmp_path, trials: list[tuple[float, float]], bd_acc: float, n: int):
    """A real journal study whose trials carry the stats the driver writes."""
    import optuna

    from grid.tune import study as tune_study
    from grid.tune.choose import trial_stats

    study = optuna.create_study(storage=tune_study.open_storage(str(tmp_path / f"j{n}.journal")), study_name="s",
                                directions=["maximize", "minimize"])
    for acc, asr in trials:
        t = study.ask({"n": optuna.distributions.FloatDistribution(0, 1)})
        row = {"acc": acc, "asr": asr, "ra": 1 - asr, "bd_acc": bd_acc, "bd_asr": 0.95,
               "der": (max(0, 0.95 - asr) - max(0, bd_acc - acc) + 1) / 2, "n_clean": n, "n_bd": n}
        st = trial_stats([row], 0.95)
        t.set_user_attr("stats", st)
        study.tell(t, [st["acc"], st["asr"]])
    return study


def test_max_acc_drop_uses_the_upper_bound_and_a_budget_nobody_meets_is_said(tmp_path):
    from grid.tune.choose import pick_best
    from grid.tune.space import TuneBlock

    block = lambda **kw: TuneBlock(**tune_block(**kw))  # noqa: E731
    # (val acc, val asr); the backdoored model had val acc 0.90; 2,000 validation images
    trials = [(0.90, 0.60), (0.89, 0.30), (0.80, 0.02), (0.70, 0.00)]
    study = _study_with(tmp_path, trials, 0.90, 2000)
    assert pick_best(block(), study)[0].number == 2  # highest pessimistic DER on the front
    # a 2-point budget: trial 1 loses 1 point, but its upper bound (~2.4 points at n = 2000) breaks it;
    # trial 0 (no loss, upper bound ~1.3) is the only one that fits
    best, _, warn = pick_best(block(max_acc_drop=0.02), study)
    assert best.number == 0 and warn == []
    best, _, warn = pick_best(block(max_acc_drop=0.03), study)
    assert best.number == 1 and warn == []
    # a budget no trial meets: the choice is still made, and the warning gives the numbers
    best, _, warn = pick_best(block(max_acc_drop=0.001), study)
    assert best.number == 2 and len(warn) == 1 and "no trial keeps validation ACC within 0.1 points" in warn[0]
    assert "ACC drop 10.0 points" in warn[0]


def test_a_small_split_that_cannot_tell_the_top_trials_apart_is_said(tmp_path):
    from grid.tune.choose import pick_best
    from grid.tune.space import TuneBlock

    trials = [(0.86, 0.05), (0.84, 0.03)]  # two close trials on the front
    small = _study_with(tmp_path, trials, 0.90, 72)  # 20% of a 360-image test set
    _, _, warn = pick_best(TuneBlock(**tune_block()), small)
    assert any("cannot tell the chosen trial" in w and "72 images" in w and "validation images would" in w
               for w in warn), warn
    big = _study_with(tmp_path, [(0.86, 0.05), (0.60, 0.03)], 0.90, 5000)
    _, _, warn = pick_best(TuneBlock(**tune_block()), big)
    assert not any("cannot tell" in w for w in warn), warn


def test_trial_0_of_a_tsbd_study_over_n_is_the_fixed_n_baseline():
    """TSBD's default n is "auto", no point of a float range: a study that tunes n starts from
    the registered baseline (the reference-faithful fixed n 0.1); where a default and no
    baseline lies outside a range, there is no trial 0."""
    from defense.methods import DEFENSES
    from grid.tune.driver import _default_trial
    from grid.tune.space import Dist, TuneBlock

    def block(**space):
        return TuneBlock(defense="tsbd", params={"un_threshold": 0.2}, tune_on=[{}],
                         space={k: Dist(**v) for k, v in space.items()})

    tsbd = DEFENSES.get("tsbd")
    assert tsbd.defaults()["n"] == "auto"
    assert _default_trial(block(n=dict(low=0.01, high=0.5, log=True), m=dict(low=0.3, high=0.95)), tsbd) == \
        {"n": 0.1, "m": 0.7}
    assert _default_trial(block(n=dict(type="categorical", choices=["auto", 0.2])), tsbd) == {"n": "auto"}
    assert _default_trial(block(n=dict(low=0.2, high=0.5)), tsbd) is None  # 0.1 is outside: no baseline
    assert _default_trial(block(alpha=dict(low=0.0, high=0.5)), tsbd) is None  # alpha 0.7 is outside
