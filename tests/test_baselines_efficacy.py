"""Does each baseline work here? Each defense on one backdoored model where it has neurons to
prune: BadNets 10% on a wider tiny_cnn (width 32: 32/64/128/256 channels, 480 BN neurons, four
times tiny_cnn's), 4,000 synthetic images, 12 `fast` epochs, seed 0; the defender holds 10% of
the clean training set (400 images) and every defense runs at the CPU-sized settings in
``SETTINGS`` (BackdoorBench's defaults otherwise).

For a method that works here the test asserts ASR falls by at least ``min_asr_drop`` at a clean
ACC cost of at most ``max_acc_cost``; for one that does not, it asserts the method still changed
the model the way it says (``neurons_pruned`` / ``weights_changed``, measured on the weights by
``run_defense``). Next to them, a control: the unchanged model keeps its ASR.

Every bound comes from the measurement in the comment above ``WORKS`` (``bench/defense_efficacy.py
--seed 0/1 --threads 1``; README table "Does each defense work here?"), with the margin stated there.
One model is trained per module (about 1 CPU-minute) and every defense runs once on it.
"""
from __future__ import annotations

import pytest
import torch

from defense.data.splits import defender_subset
from defense.methods import DefenseContext, run_defense
from defense.metrics import attack_metrics

pytestmark = pytest.mark.slow

WIDTH = 32
SETTINGS = {
    "ft": dict(epochs=20, batch_size=64), "fp": dict(epochs=20, batch_size=64),
    "nad": dict(te_epochs=10, batch_size=64), "ftsam": dict(epochs=20, batch_size=64), "clp": {},
    "anp": dict(nb_iter=300, batch_size=64), "ibau": dict(n_rounds=5, batch_size=64),
    "rnp": dict(unlearning_epochs=20, recovering_epochs=20, batch_size=64),
    "nwc_fp": dict(lr_un=0.01, max_un_epochs=20, batch_size=64, ft_batch_size=64, epochs=20),
}

# Measured (python script of the README table, 1 torch thread), backdoored model of seed 0 /
# seed 1: ASR drop and ACC cost in points (negative cost: ACC rose), and the change evidence.
#   before: ACC 92.9 / 93.5, ASR 89.3 / 97.1
#   ft      drop 38.7 / 21.1   cost -0.4 / -1.3
#   fp      drop 44.8 / 25.0   cost -0.6 / -1.1   48 / 45 classifier channels pruned
#   nwc_fp  drop 67.5 / 46.9   cost  0.0 / -0.8   10 / 10 conv channels pruned
#   anp     drop 65.1 / 88.9   cost 10.0 / 10.6   139 / 139 BN neurons pruned (acc_ratio 0.1); on the
#           test's own model (seed 0, 2 threads: before ACC 94.1, ASR 93.6) it pruned 69 and cut
#           ASR by only 19.6 points (ACC 84.7): its bound is set from that third measurement
#   nad     drop 52.8 / 28.5   cost  2.6 /  1.9
#   ftsam   drop 72.2 / 56.1   cost -0.6 /  0.8
#   ibau    drop 15.2 / 5.9    cost -0.4 / -0.9   weak at 5 rounds: not counted as working
#   clp     drop -0.5 / 8.0    cost  2.9 / 12.6   3 / 6 BN channels pruned: no cut worth the name
#   rnp     drop  0   / 0      cost  0   / 0      nothing pruned: no threshold within acc_ratio 0.1
# Bounds: min ASR drop = half the smallest measured drop, rounded down to 5 points; max ACC cost =
# the largest measured cost (0 if it rose) + 5 points, rounded up. The test's model is trained
# with the suite's 2 torch threads, another model than either measured one: the bounds are set
# from the spread between the two seeds for that reason.
WORKS = {
    "ft": (0.10, 0.05), "fp": (0.10, 0.05), "nwc_fp": (0.20, 0.05), "anp": (0.05, 0.16),
    "nad": (0.10, 0.08), "ftsam": (0.25, 0.06),
}


def _clp_says(d: dict) -> bool:
    """CLP zeroes BN weight and bias of each pruned channel: two changed elements per channel."""
    return d["n_pruned"] >= 1 and d["neurons_pruned"] == d["n_pruned"] and d["weights_changed"] == 2 * d["n_pruned"]


def _rnp_says(d: dict) -> bool:
    """RNP either pruned what it reports, or reports no threshold and returned the model unchanged."""
    if d["threshold"] is None:
        return d["weights_changed"] == 0 and d["neurons_pruned"] == 0 and d["n_pruned"] == 0
    return d["neurons_pruned"] == d["n_pruned"] == d["weights_changed"] > 0


def _ibau_says(d: dict) -> bool:
    """I-BAU unlearns a universal perturbation by updating every weight; it prunes nothing."""
    return d["neurons_pruned"] == 0 and d["weights_changed"] > 0


DOES_NOT_WORK = {"clp": _clp_says, "rnp": _rnp_says, "ibau": _ibau_says}


@pytest.fixture(scope="module")
def wide():
    from defense.data import load_dataset
    from defense.models.tiny_cnn import TinyCNN
    from defense.train import get_recipe, train
    from defense.trial import TrialConfig, make_poisoned

    small = dict(n_train=4000, n_test=1000)
    tr, te = load_dataset("synthetic", **small)
    cfg = TrialConfig(attack="badnets", seed=0, epochs=12, dataset_params=small, device="cpu")
    pois = make_poisoned(cfg, tr, te)
    torch.manual_seed(0)
    model = TinyCNN(10, 3, WIDTH)
    train(model, pois.train, get_recipe("fast"), seed=0, device="cpu", hook=pois.hook, epochs=12)
    model.eval()
    bd, _, bd_true = pois.backdoor_test()
    clean, _ = defender_subset(tr, 0.1, seed=0)
    metrics = lambda m: attack_metrics(m, te, bd, bd_true, 0)  # noqa: E731
    return {"model": model, "clean": clean, "metrics": metrics, "before": metrics(model), "runs": {}}


def _run(wide, name):
    if name not in wide["runs"]:
        out = run_defense(name, wide["model"], wide["clean"], SETTINGS[name], DefenseContext(device="cpu", seed=0))
        wide["runs"][name] = (out, wide["metrics"](out.model))
    return wide["runs"][name]


def test_control_the_unchanged_model_keeps_its_asr(wide):
    out = run_defense("none", wide["model"], wide["clean"], {}, DefenseContext())
    m = wide["metrics"](out.model)
    assert m == wide["before"]
    assert out.diagnostics["weights_changed"] == 0 and out.diagnostics["neurons_pruned"] == 0
    # the backdoor is there to remove: measured ASR 0.893 (seed 0), ACC 0.929
    assert wide["before"]["asr"] >= 0.8 and wide["before"]["acc"] >= 0.85, wide["before"]


@pytest.mark.parametrize("name", sorted(WORKS))
def test_defense_cuts_the_backdoor(wide, name):
    out, m = _run(wide, name)
    b = wide["before"]
    drop, cost = WORKS[name]
    assert b["asr"] - m["asr"] >= drop, (name, b, m, out.diagnostics)
    assert b["acc"] - m["acc"] <= cost, (name, b, m)
    assert out.diagnostics["weights_changed"] > 0


@pytest.mark.parametrize("name", sorted(DOES_NOT_WORK))
def test_defense_that_does_not_cut_the_backdoor_still_changes_the_model(wide, name):
    out, m = _run(wide, name)
    assert DOES_NOT_WORK[name](out.diagnostics), (name, out.diagnostics)
