"""The cost line of ``validate`` / ``run --dry-run``: measured stage times, and like stages'
medians for what was never run (grid/estimate.py)."""
from __future__ import annotations

from grid.estimate import describe, estimate, measured_seconds
from grid.plan import build_plan
from grid.spec import parse_spec

SPEC = """\
name: cost
datasets: [{name: synthetic, params: {n_train: 300, n_test: 100}}]
archs: [tiny_cnn]
attacks: [badnets]
seeds: [0]
defenses: [none, ft]
epochs: 1
"""


def _plan(text, tmp_path):
    ls, probs = parse_spec(text, "spec.yaml", tmp_path)
    assert not probs
    return build_plan(ls)


def test_measured_stages_cost_their_own_time_and_new_ones_a_like_stage_median(tmp_path):
    first = _plan(SPEC, tmp_path)
    own = {"data": 2.0, "attack": 30.0, "defense": 8.0, "eval": 1.0}
    log = "".join(f"{s.kind} {k} 123 {own[s.kind]:.3f} node\n" for k, s in first.stages.items())
    (tmp_path / "executed.log").write_text(log + "eval cut-by-a-crash 1")  # a torn last line is skipped
    seconds = measured_seconds(tmp_path)
    assert len(seconds) == len(first.stages)

    est = estimate(first, first.stages, seconds)
    assert est.seconds == sum(own[s.kind] for s in first.stages.values()) and not est.unknown

    # a second seed (like stages measured) and a new defense (only the kind is known) on top
    bigger = _plan(SPEC.replace("seeds: [0]", "seeds: [0, 1]").replace("[none, ft]", "[none, ft, nad]"), tmp_path)
    new = [k for k in bigger.stages if k not in seconds]
    est = estimate(bigger, new, seconds)
    by_kind = {k: sum(1 for x in new if bigger.stages[x].kind == k) for k in ("attack", "defense", "eval")}
    assert est.seconds == sum(own[bigger.stages[k].kind] for k in new)  # every new stage costed from its kind's
    assert est.by_kind["attack"] == by_kind["attack"] == 1 and est.by_kind["defense"] == by_kind["defense"] == 3
    line = describe(est, tmp_path)
    assert f"from {len(first.stages)} stages measured" in line and "not costed" not in line


def test_without_a_previous_run_the_size_is_said_and_no_time_invented(tmp_path):
    plan = _plan(SPEC, tmp_path)
    est = estimate(plan, plan.stages, measured_seconds(tmp_path / "nothing"))
    assert est.seconds == 0 and est.stages == len(plan.stages)
    assert "no measured stage times yet" in describe(est, tmp_path)


def test_a_kind_never_measured_is_named_not_guessed(tmp_path):
    plan = _plan(SPEC.replace("[none, ft]", "[none, tsbd]"), tmp_path)
    seconds = {k: 5.0 for k, s in plan.stages.items() if s.kind != "prepare"}
    est = estimate(plan, plan.stages, seconds)
    assert est.unknown == {"prepare": 1}
    assert "not costed (nothing like them measured): 1 prepare" in describe(est, tmp_path)
