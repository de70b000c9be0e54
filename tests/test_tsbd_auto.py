"""TSBD ``n: auto`` (issue 20): the neuron ratio chosen on held-out clean data only.

Fast tests: parameter parsing and validation, the paired-drop statistics, the search order.
Slow tests (the session's backdoored tiny_cnn fixtures of conftest.py): the choice is blind to
the trigger (garbled backdoor data give a bit-identical choice), and ``auto`` removes the
BadNets and Blended backdoors within the issue's bound.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from defense.data.splits import defender_subset, val_test_indices
from defense.methods import DEFENSES, DefenseContext, run_defense
from defense.methods.tsbd import TSBDParams, split_holdout
from defense.methods.tsbd_auto import RULES, Ladder, _bisect, choose, paired_drop, within_budget
from defense.registry import BadParams, params_dict
from defense.trial import evaluate


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------

def test_n_takes_a_number_or_auto_with_clear_messages():
    entry = DEFENSES.get("tsbd")
    assert entry.make_params({"n": "0.3"}).n == 0.3
    assert entry.make_params({"n": 1}).n == 1.0
    auto = entry.make_params({"n": "auto"})
    assert auto.n == "auto" and auto.held_share() == 0.2
    # the held-out share is a shared (prepare) parameter, resolved: an auto run never reuses the
    # unlearning of a fixed-n run on all of Dc, and a fixed-n run keeps all of Dc (the reference)
    assert "holdout" in entry.meta["shared"]
    assert params_dict(auto)["holdout"] == 0.2 and entry.defaults()["holdout"] == 0.2  # n: auto is the default
    assert params_dict(entry.make_params({"n": 0.1}))["holdout"] == 0.0
    # derived, not stored: a fixed n made from an auto p (a sweep, a bench) keeps all of Dc,
    # and a holdout the user set stays set
    assert dataclasses.replace(auto, n=0.3).held_share() == 0.0
    assert dataclasses.replace(entry.make_params({"holdout": 0.3}), n=0.3).held_share() == 0.3
    for bad, msg in [("aut", r"n must be a number in \[0, 1\] or 'auto', got 'aut'"),
                     (1.5, r"n must be in \[0, 1\], got 1.5 \(or 'auto'")]:
        with pytest.raises(BadParams, match=msg):
            entry.make_params({"n": bad})
    with pytest.raises(BadParams, match="holdout must be > 0"):
        entry.make_params({"n": "auto", "holdout": 0})
    with pytest.raises(BadParams, match="auto_ladder"):
        entry.make_params({"n": "auto", "auto_ladder": "0.1,2"})
    assert entry.make_params({"n": "auto", "auto_ladder": "0.1,0.3"}).auto_ladder == (0.1, 0.3)


def test_holdout_split_is_seeded_disjoint_and_sized(small_data):
    train, _ = small_data
    clean = train.subset(torch.arange(500))
    a, h = split_holdout(clean, 0.2, seed=3)
    a2, h2 = split_holdout(clean, 0.2, seed=3)
    assert len(h) == 100 and len(a) == 400
    assert torch.equal(h.x, h2.x) and torch.equal(a.y, a2.y)
    rows = lambda d: {bytes(x.numpy()) for x in d.x}
    assert not rows(a) & rows(h)
    assert not torch.equal(split_holdout(clean, 0.2, seed=4)[1].x, h.x)
    same, none = split_holdout(clean, 0.0, seed=3)
    assert same is clean and none is None


# ---------------------------------------------------------------------------------------
# The rule's statistics and search
# ---------------------------------------------------------------------------------------

def test_paired_drop_and_budget():
    y = torch.zeros(100, dtype=torch.long)
    pred0 = y.clone()
    pred0[:10] = 1  # original: 90% right
    pred = pred0.clone()
    pred[10:16] = 1  # 6 more wrong
    pred[:2] = 0  # 2 fixed
    m = paired_drop(pred0, pred, y)
    assert m["acc0"] == pytest.approx(0.90) and m["acc"] == pytest.approx(0.86)
    assert m["drop"] == pytest.approx(0.04)
    # b = 6, c = 2, h = 100: sqrt(8 - 16/100) / 100
    assert m["se"] == pytest.approx((8 - 0.16) ** 0.5 / 100)
    assert m["agree"] == pytest.approx(0.92)
    assert within_budget(m, 0.02, 1.0)  # 0.04 - 0.028 <= 0.02
    assert not within_budget(m, 0.02, 0.0)
    assert paired_drop(pred0, pred0, y)["se"] == 0.0


def _ladder(keep_up_to: int, knee: float = 0.0, over: float = 10.0, cap: float | None = None) -> Ladder:
    """An 11-rung ladder whose held-out drops are 0 up to index ``keep_up_to`` and ``over`` times
    their budget above it."""
    p = TSBDParams(n="auto", auto_ladder=tuple(i / 10 for i in range(11)), auto_knee_cap=cap)
    def compute(n, ref_pred):
        d, pd = (over * p.auto_budget, over * p.auto_prob_budget) if n > keep_up_to / 10 + 1e-9 else (0.0, 0.0)
        return {"drop": d, "se": 0.0, "drop_ft": d, "se_ft": 0.0, "pdrop": pd, "pse": 0.0,
                "pdrop_ft": pd, "pse_ft": 0.0, "agree": 1 - d, "held_out": 100, "pred": None}
    return Ladder(p.auto_ladder, knee, p, compute)


@pytest.mark.parametrize("keep_up_to", [-1, 0, 3, 7, 10])
def test_bisect_finds_the_last_kept_rung_in_few_runs(keep_up_to):
    lad = _ladder(keep_up_to)
    i = _bisect(lad, lambda s: s["drop"] <= 0.02)
    assert i == keep_up_to and len(lad.visited) <= 4
    # every rule returns an index of the ladder; those with an ACC check stop at the last kept rung
    for name, rule in RULES.items():
        lad = _ladder(keep_up_to, knee=0.25)
        j = rule(lad)
        assert 0 <= j <= 10
        if name in ("budget", "budget_ft", "agree", "soft"):
            assert j == max(0, keep_up_to), name
        if name == "knee":
            assert j == 3 and lad.visited == [0.3]  # the smallest value at or above the knee; one run
        if name in ("knee_budget", "knee_soft"):
            assert j == max(3, keep_up_to)  # never below the knee
            assert (lad._ref is not None) == (name == "knee_budget")  # soft: against the original, no n = 0 run
            # auto_knee_cap 2: a knee rung at 10x the budget is no floor; one at 1.5x is
            assert rule(_ladder(keep_up_to, knee=0.25, cap=2.0)) == max(0, keep_up_to), name
            assert rule(_ladder(keep_up_to, knee=0.25, over=1.5, cap=2.0)) == max(3, keep_up_to), name


def test_choose_replays_a_rule_on_recorded_rungs_and_rejects_unknown_rules():
    rungs = [{"n": n, "drop": 0.1 * (n > 0.2), "se": 0.0, "drop_ft": 0.1 * (n > 0.2), "se_ft": 0.0}
             for n in TSBDParams().auto_ladder]
    n, visited = choose("budget", rungs, 0.1, TSBDParams(n="auto"))
    assert n == 0.2 and len(visited) <= 4 and 0.2 in visited
    assert choose("knee", rungs, 0.12, TSBDParams(n="auto"))[0] == 0.15
    with pytest.raises(BadParams, match="auto_rule must be one of budget"):
        DEFENSES.get("tsbd").make_params({"n": "auto", "auto_rule": "kne"})


# ---------------------------------------------------------------------------------------
# On backdoored models
# ---------------------------------------------------------------------------------------

# Small settings for the blindness test: it asserts identity, not quality.
FAST = {"n": "auto", "un_threshold": 0.2, "ft_epochs": 1, "auto_ladder": "0.1,0.3,0.5", "batch_size": 128}


def _garbled(d: dict) -> dict:
    """The same clean data and model; every backdoor image, index and the target replaced."""
    g = dict(d)
    pz = copy.copy(d["poisoned"])
    gen = torch.Generator().manual_seed(123)
    for f in dataclasses.fields(pz):
        v = getattr(pz, f.name)
        if isinstance(v, torch.Tensor):  # poison_idx, bd_idx, bd_true: other indices / labels
            v = torch.randint(0, int(v.max()) + 1, v.shape, generator=gen, dtype=v.dtype)
        elif hasattr(v, "x") and hasattr(v, "y"):  # a Data: images garbled, labels shuffled
            v = dataclasses.replace(v, x=torch.randint(0, 255, v.x.shape, generator=gen, dtype=torch.uint8),
                                    y=v.y[torch.randperm(len(v.y), generator=gen)])
        setattr(pz, f.name, v)
    g["poisoned"] = pz
    return g


def _choose(d: dict, target: int) -> tuple[float, list, dict, float]:
    """What a trial does after training: the defender's clean subset of the CLEAN training set,
    and the defense, with the poisoned data in scope and ``ctx.target`` set."""
    assert not torch.equal(d["poisoned"].train.x, d["train"].x)  # the poisoned set is not Dc's source
    clean, _ = defender_subset(d["train"], 0.05, d["cfg"].seed)
    ctx = DefenseContext(device="cpu", seed=d["cfg"].seed, target=target)
    out = run_defense("tsbd", d["model"], clean, FAST, ctx)
    state = {k: v.clone() for k, v in out.model.state_dict().items()}
    g = out.diagnostics
    return g["chosen_n"], g["auto_ladder"], state, g["nwc_knee_n"]


@pytest.mark.slow  # one backdoored model (session fixture) and two auto runs with 2-pass Stage 2
def test_auto_choice_is_blind_to_the_trigger(badnets_model):
    n1, ladder1, s1, knee1 = _choose(badnets_model, badnets_model["cfg"].target)
    n2, ladder2, s2, _ = _choose(_garbled(badnets_model), badnets_model["cfg"].target + 1)
    assert json.dumps(ladder1) == json.dumps(ladder2) and n1 == n2  # bit-identical
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert n1 in (0.1, 0.3, 0.5) and sum(r["chosen"] for r in ladder1) == 1
    # the bench (bench/tsbd_auto_table.py) replays the rule on recorded rungs: the same choice
    p = DEFENSES.get("tsbd").make_params(FAST)
    rungs = [r for r in ladder1 if r["n"] > 0]
    ref = next((r for r in ladder1 if r["n"] == 0), None)
    assert choose(p.auto_rule, rungs, knee1, p, ref)[0] == n1


# ---------------------------------------------------------------------------------------
# The recorded ladders of the suite's own fixtures
# ---------------------------------------------------------------------------------------

AUTO_MAX_ASR = 0.10  # the bound: ASR <= 10% with at most 5 ACC points lost
AUTO_MAX_DROP = 0.05

# bench/tsbd_auto_table.py --full on the fixtures of conftest.py (2 threads): every rung of the
# ladder per defender seed, with test ACC/ASR beside the held-out signals
FIXTURE_LADDERS = Path(__file__).resolve().parents[1] / "bench" / "records" / "tsbd_auto_fixtures.jsonl"


def _recorded_runs() -> dict:
    runs: dict = {}
    for line in FIXTURE_LADDERS.read_text().splitlines():
        r = json.loads(line)
        runs.setdefault((r["attack"], r["seed"]), {}).setdefault(r["kind"], []).append(r)
    return runs


def _replay(attack: str) -> list[dict]:
    """The default rule on each recorded defender seed: before, after (the chosen rung's test
    metrics) and the best any recorded rung reaches within the ACC bound (the test-set oracle)."""
    p = DEFENSES.get("tsbd").make_params({"n": "auto"})
    runs = {s: r for (a, s), r in _recorded_runs().items() if a == attack}
    assert sorted(runs) == [0, 1, 2]
    out = []
    for seed, r in sorted(runs.items()):
        before = r["before"][0]["test"]
        rungs = {x["n"]: x for x in r["rung"]}
        assert {v for v in p.auto_ladder if v >= 0.1} <= set(rungs), "recorded with --full: every rung from 0.1"
        n, _ = choose(p.auto_rule, [dict(x["sig"], n=x["n"]) for x in rungs.values() if x["n"] > 0],
                      r["prep"][0]["knee"], p, rungs.get(0.0, {}).get("sig"))
        assert n in rungs, (seed, n)
        kept = [x["test"]["asr"] for v, x in rungs.items() if v > 0 and before["acc"] - x["test"]["acc"] <= AUTO_MAX_DROP]
        out.append(dict(seed=seed, n=n, before=before, after=rungs[n]["test"], best_asr=min(kept)))
        print(f"{attack} seed {seed}: chose n {n}: {rungs[n]['test']} (best ASR within the ACC bound {min(kept):.3f})")
    return out


@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_default_rule_is_near_the_best_rung_on_every_recorded_seed(attack):
    """The default rule replayed on every recorded rung of the fixtures' three defender seeds:
    never past the ACC bound, and within 5 ASR points of the best rung that keeps it (what
    choosing n on the reported test split itself would give). The rungs below 0.1 are
    recorded only where 0.1 broke a budget (a rule reaches them only then); a rung the replay
    does not find counts as over every budget (``choose``)."""
    for r in _replay(attack):
        assert r["before"]["acc"] - r["after"]["acc"] <= AUTO_MAX_DROP, r
        assert r["after"]["asr"] <= r["best_asr"] + 0.05, r


# MEASURED (the replay above, knee_soft at 0.05): BadNets seeds 0/1/2 n 0.3/0.25/0.3, ASR 5.0/11.3/13.4%;
# on seed 2 no rung of the ladder meets the bound (the best within 5 ACC points: 13.4% at n 0.3), on
# seed 1 n 0.4 would (6.7%) but the held-out probability drop at 0.3 (0.061) ended the bisection.
BADNETS_1_OF_3 = pytest.mark.xfail(strict=True, reason="knee_soft on the BadNets fixture: ASR 5.0/11.3/13.4% on "
                                   "defender seeds 0/1/2 (1 of 3 within the bound; seed 2: no rung is)")


@pytest.mark.parametrize("attack", [pytest.param("badnets", marks=BADNETS_1_OF_3), "blended"])
def test_default_rule_meets_the_bound_on_2_of_3_recorded_seeds(attack):
    """Within the issue's bound (ASR <= 10%, <= 5 ACC points lost) on at least K = 2 of the 3
    recorded defender seeds: the K that the validation-tuned TSBD of tests/test_tsbd_e2e.py
    meets on the same fixtures."""
    met = sum(r["after"]["asr"] <= AUTO_MAX_ASR and r["before"]["acc"] - r["after"]["acc"] <= AUTO_MAX_DROP
              for r in _replay(attack))
    assert met >= 2, f"{attack}: {met} of 3 defender seeds within the bound"


# n: auto on the README's models (the e2e fixtures, trained and defended with seed 0, as `bdgrid
# trial` does): 500 defender images (12.5% of the small synthetic training set), of which 100 are
# held out; the reported test split as in tests/test_tsbd_e2e.py. The bound, not loosened.
# Defender seeds 1 and 2: the recorded ladders above (a live run costs ~1 CPU-minute a seed).


@pytest.mark.slow  # per attack: Stage 1a and about 3 Stage-2 runs on 400 images
@pytest.mark.parametrize("fixture", ["badnets_model", "blended_model"])
def test_auto_removes_the_backdoor(fixture, request):
    d = request.getfixturevalue(fixture)
    model, poisoned, test, cfg = d["model"], d["poisoned"], d["test"], d["cfg"]
    _, test_idx = val_test_indices(len(test), 0.2, seed=0)
    before = evaluate(model, test, poisoned, test_idx, cfg.target, "cpu")
    assert before["asr"] >= 0.9, before
    clean, _ = defender_subset(d["train"], 0.125, cfg.seed)
    out = run_defense("tsbd", model, clean, {"n": "auto", "un_threshold": 0.2}, DefenseContext(seed=cfg.seed))
    after = evaluate(out.model, test, poisoned, test_idx, cfg.target, "cpu")
    g = out.diagnostics
    print(f"\n{fixture}: chosen n {g['chosen_n']} ladder {g['auto_ladder']} before {before} after {after}")
    assert g["auto_held_out"] == 100 and sum(r["chosen"] for r in g["auto_ladder"]) == 1
    assert g["chosen_n"] >= min(v for v in TSBDParams().auto_ladder if v >= g["nwc_knee_n"])  # never below the knee
    assert after["asr"] <= AUTO_MAX_ASR, (g["chosen_n"], after)
    assert before["acc"] - after["acc"] <= AUTO_MAX_DROP, (g["chosen_n"], before, after)


# ---------------------------------------------------------------------------------------
# The decision's basis: every recording of bench/tsbd_auto_table.py
# ---------------------------------------------------------------------------------------

RECORDS = FIXTURE_LADDERS.parent
IN_SAMPLE = ["tsbd_auto_soft.jsonl", "tsbd_auto_fixtures.jsonl"]
OUT_OF_SAMPLE = ["tsbd_auto_seeds12.jsonl", "tsbd_auto_cifarfmt.jsonl", "tsbd_auto_optional.jsonl"]


def _bound_counts(names: list[str]) -> dict[str, int]:
    """Runs within the issue's bound for the default rule, the fixed n = 0.1 and the validation
    oracle, replayed by the bench's own summarise() on the recorded rungs."""
    import importlib
    import sys

    sys.path.insert(0, str(RECORDS.parent))  # bench/: the script and its _common
    try:
        bench = importlib.import_module("tsbd_auto_table")
    finally:
        sys.path.remove(str(RECORDS.parent))
    rows = []
    for i, name in enumerate(names):
        for line in (RECORDS / name).read_text().splitlines():
            r = json.loads(line)
            r["dataset"] += f" ({i})"
            rows.append(r)
    s = [r for r in bench.summarise(rows, TSBDParams().auto_rule) if "auto" in r]
    within = lambda r, side: r[side]["asr"] <= AUTO_MAX_ASR and r["before"]["acc"] - r[side]["acc"] <= AUTO_MAX_DROP  # noqa: E731
    return {side: sum(within(r, side) for r in s) for side in ("auto", "fixed", "oracle")} | {"runs": len(s)}


@pytest.mark.parametrize("names", [IN_SAMPLE, OUT_OF_SAMPLE], ids=["in-sample", "out-of-sample"])
def test_default_n_auto_beats_the_fixed_n_on_the_recordings(names):
    """n: auto is TSBD's default because, on the recorded runs, it meets the issue's bound more
    often than the fixed n = 0.1 and about as often as n tuned on the validation split (README,
    TSBD, "n: auto"). MEASURED: in sample 11 / 4 / 11 of 22, out of sample 4 / 1 / 4 of 16."""
    c = _bound_counts(names)
    print(c)
    assert c["auto"] >= 2 * c["fixed"] and c["auto"] > c["fixed"], c
    assert c["auto"] >= c["oracle"] - 1, c
