"""Baseline defenses (ft, fp, nad, anp, clp, ibau, rnp, ftsam, nwc_fp): the common contract on a
backdoored tiny_cnn, and each method's own mechanics on small hand-built models."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.data import Data, dataset_info
from defense.data.splits import defender_subset
from defense.methods import DEFENSES, DefenseContext, run_defense
from defense.metrics import accuracy

BASELINES = ["ft", "fp", "nad", "anp", "clp", "ibau", "rnp", "ftsam", "nwc_fp"]

# Small settings for tests only; the registered defaults stay BackdoorBench-sized.
TINY = {
    "ft": dict(epochs=2, batch_size=64),
    "fp": dict(epochs=2, batch_size=64),
    "nad": dict(te_epochs=2, batch_size=64),
    "ftsam": dict(epochs=2, batch_size=64),
    "clp": {},
    "anp": dict(nb_iter=20, batch_size=64),
    "rnp": dict(unlearning_epochs=3, recovering_epochs=3, batch_size=64),
    "ibau": dict(n_rounds=1, batch_size=64),
    "nwc_fp": dict(lr_un=0.01, max_un_epochs=5, batch_size=64, ft_batch_size=64, epochs=2),
}


# What each method says it pruned (the rest prune nothing): compared with neurons_pruned,
# which run_defense measures on the weights.
OWN_COUNT = {"clp": lambda d: d["n_pruned"], "anp": lambda d: d["n_pruned"], "rnp": lambda d: d["n_pruned"],
             "fp": lambda d: d["pruned"], "nwc_fp": lambda d: d["pruned"]}

# Clean-ACC drop allowed per method in the contract test: the largest drop measured on the
# contract fixture's setting (badnets tiny_cnn, 4,000 synthetic images, 12 fast epochs, TINY
# params, defender 5%) over the backdoored models of seeds 0-3 trained with 1 torch thread and
# seeds 0-1 with 2 threads (other models: seed 0 gives ACC 0.905 at 2 threads, 0.912 at 1),
# rounded up, plus 5 points of margin. Measured drops (points), 1 thread seeds 0-3 / 2 threads 0-1:
#   ft    -0.5 0.0 1.6 -1.6 / -2.1 -1.7    fp     1.5 2.7 3.6 2.4 / 0.2 1.3
#   nad    7.0 3.7 7.0 7.0 / 6.3 4.9       anp    5.3 6.4 7.5 12.0 / 7.9 9.5
#   ibau  -0.5 -1.7 0.4 -1.6 / -2.0 -2.1   rnp    0 0 0 0 / 0 0
#   ftsam  9.2 8.8 5.8 6.0 / 8.4 8.5       nwc_fp 0.1 -0.4 3.0 2.8 / -0.6 -1.0
#   clp   17.7 20.7 2.5 -0.7 / 14.7 -0.5 (the old common bound of 15 points sat on this edge;
#   CLP has its own check in the test)
ACC_DROP = {"ft": 0.07, "fp": 0.09, "nad": 0.12, "anp": 0.17, "ibau": 0.06, "rnp": 0.05, "ftsam": 0.15,
            "nwc_fp": 0.08}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the contract

def test_every_baseline_is_registered_with_documented_defaults():
    for name in BASELINES:
        entry = DEFENSES.get(name)
        assert entry.params is not None and entry.defaults(), name
        mod = __import__(entry.fn.__module__, fromlist=["_"])
        assert mod.__doc__ and ("BackdoorBench" in mod.__doc__ or "TSBD" in mod.__doc__), name
    # paper-sized defaults, not the test sizes
    assert DEFENSES.get("ft").defaults()["epochs"] == 100
    assert DEFENSES.get("anp").defaults()["nb_iter"] == 2000
    assert DEFENSES.get("clp").defaults()["u"] == 3.0


@pytest.fixture(scope="module")
def defended(badnets_model):
    """Each baseline run twice (same seed) on the BadNets tiny_cnn with the defender's 5%."""
    bd = badnets_model
    clean, _ = defender_subset(bd["train"], 0.05, seed=0)
    model = bd["model"]
    before = _state(model)
    runs = {}
    for name in BASELINES:
        outs = [run_defense(name, model, clean, TINY[name], DefenseContext(device="cpu", seed=0, target=None))
                for _ in range(2)]
        runs[name] = outs
    return bd, model, before, runs


@pytest.mark.parametrize("name", BASELINES)
def test_contract_same_arch_input_untouched_deterministic_sane_accuracy(defended, name):
    bd, model, before, runs = defended
    out1, out2 = runs[name]
    # the input model is never modified
    assert _same(_state(model), before)
    # same architecture: same class, same state-dict keys and shapes (pruning masks baked in)
    assert type(out1.model) is type(model)
    s1, s2 = _state(out1.model), _state(out2.model)
    assert s1.keys() == before.keys()
    assert all(s1[k].shape == before[k].shape for k in s1)
    assert not any("_orig" in k or "_mask" in k for k in s1)
    # a fresh model of the architecture loads the purified weights
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(s1)
    # deterministic per seed
    assert _same(s1, s2)
    # the change is recorded, measured on the weights: weights_changed counts the parameter
    # elements that differ, neurons_pruned matches the method's own count of what it pruned
    d = out1.diagnostics
    params = dict(model.named_parameters())
    assert d["weights_changed"] == sum(int((s1[k] != before[k]).sum()) for k in params)
    assert d["neurons_pruned"] == OWN_COUNT.get(name, lambda d: 0)(d), d
    # the defense changed something: every method but RNP, which prunes nothing on tiny_cnn at
    # these settings (measured: 0 neurons on seeds 0-3, 1 and 2 threads; it warns, see
    # test_pruning_that_no_threshold_allows...); CLP pruned 2-4 channels, ANP 13-25
    if name != "rnp":
        assert d["weights_changed"] > 0 and not _same(s1, before)
    # clean accuracy stays sane. Bounds from the spread measured on this fixture's setting
    # (badnets tiny_cnn, seeds 0-3 x torch threads 1 and 2, after the defender-subset change of
    # 00364cd): the largest drop seen per method plus a margin of 5 points (ACC_DROP)
    acc_b, acc_a = accuracy(model, bd["test"]), accuracy(out1.model, bd["test"])
    if name == "clp":
        # CLP is data-free with no clean-accuracy guard. On tiny_cnn (16-128 channels a layer) the
        # channel with the largest Lipschitz bound is often one the clean task needs: pruning 2-4
        # of them cost -0.7 to 20.7 points here and 32.7 on another machine (0.901 -> 0.574).
        # What must hold: exactly the channels above mean + u*std are zeroed (recomputed here
        # independently), and the model is far above chance (10%): the lowest seen, 0.574, less
        # a margin of 0.27.
        _check_clp_pruned_exactly(model, out1.model, 3.0)
        assert acc_a >= 0.30, (name, acc_b, acc_a)
    else:
        assert acc_a >= acc_b - ACC_DROP[name], (name, acc_b, acc_a)
    # diagnostics are JSON-able
    import json

    json.dumps(out1.diagnostics)
    json.dumps(out1.curves)


# ----------------------------------------------------------------------------- hand-built data

def _bright_channel_data(n_per_class: int = 10) -> Data:
    """3-channel images whose class k in {0, 1, 2} is the one bright channel."""
    xs, ys = [], []
    for k in range(3):
        x = torch.full((n_per_class, 3, 32, 32), 20, dtype=torch.uint8)
        x[:, k] = 230
        xs.append(x)
        ys.append(torch.full((n_per_class,), k))
    return Data(torch.cat(xs), torch.cat(ys), dataset_info("synthetic"))


def _fp_model() -> nn.Module:
    """Channels 0-2 read the three colour channels (informative, mean activation > 0.9);
    channels 3-5 are dormant constants 0.01/0.02/0.03 whose classifier columns add the same
    amount to every class (no effect on predictions)."""
    conv = nn.Conv2d(3, 6, 1)
    lin = nn.Linear(6, 10)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for k in range(3):
            conv.weight[k, k] = 0.5 + 0.5 * k  # channel 0 the weakest informative one
        conv.bias[3:] = torch.tensor([0.03, 0.01, 0.02])  # channel 4 lowest, then 5, then 3
        lin.weight.zero_()
        lin.bias.zero_()
        for k in range(3):
            lin.weight[k, k] = 1.0
        lin.weight[:, 3:] = 5.0
        lin.bias[3:] = -100.0  # classes 3..9 never win
        lin.bias[2] = 1e-3  # an image whose channel is pruned away goes to class 2, not to a lucky tie
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)


def test_fp_prunes_the_lowest_activation_channels_until_accuracy_drops():
    data = _bright_channel_data()
    model = _fp_model()
    assert accuracy(model, data) == 1.0
    out = run_defense("fp", model, data, dict(epochs=0, once_prune_ratio=0.1, acc_ratio=0.1), DefenseContext())
    d = out.diagnostics
    # the dormant channels go first, lowest mean activation first; pruning an informative one
    # would cost a third of the accuracy, beyond the 10% bound, so pruning stops there
    assert d["pruned_channels"] == [4, 5, 3]
    lin = out.model[4]
    assert torch.all(lin.weight[:, 3:] == 0)
    assert torch.equal(lin.weight[:, :3], model[4].weight[:, :3])
    assert accuracy(out.model, data) == 1.0
    # a looser bound lets FP prune an informative channel too
    loose = run_defense("fp", model, data, dict(epochs=0, once_prune_ratio=0.1, acc_ratio=0.5), DefenseContext())
    assert loose.diagnostics["pruned_channels"] == [4, 5, 3, 0]


def test_fp_holds_pruned_channels_at_zero_through_finetuning():
    data = _bright_channel_data()
    out = run_defense("fp", _fp_model(), data, dict(epochs=2, batch_size=8, once_prune_ratio=0.1), DefenseContext())
    lin = out.model[4]
    assert torch.all(lin.weight[:, [4, 5, 3]] == 0)
    assert not torch.equal(lin.weight[:, :3], _fp_model()[4].weight[:, :3])  # the rest did train


# ----------------------------------------------------------------------------- CLP

def _clp_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        m[0].weight.normal_(0, 0.1)
        m[3].weight.normal_(0, 0.1)
        m[0].weight[5] *= 20  # an outlier channel in the first layer
        m[1].running_var.uniform_(0.9, 1.1)
        m[1].weight.uniform_(0.9, 1.1)
        m[1].bias.uniform_(-0.5, 0.5)
        m[4].running_var.fill_(1.0)
        m[4].weight.fill_(1.0)
        m[4].weight[2] = 30.0  # an outlier through the BN scale in the second layer
        m[4].bias.uniform_(-0.5, 0.5)
    m.eval()
    return m


def _check_clp_pruned_exactly(model, pruned_model, u):
    """The BN channels zeroed in ``pruned_model`` are exactly those the independent formula picks."""
    from defense.methods.clp import conv_bn_pairs

    mods, pm = dict(model.named_modules()), dict(pruned_model.named_modules())
    for conv, bn in conv_bn_pairs(model, 3, 32):
        zero = set(torch.nonzero((pm[bn].weight == 0) & (pm[bn].bias == 0)).flatten().tolist())
        assert zero == _expected_clp(mods[conv], mods[bn], u), bn


def _expected_clp(conv: nn.Conv2d, bn: nn.BatchNorm2d, u: float) -> set[int]:
    """Independent transcription: SVD of each channel's folded kernel, mean + u * std."""
    lips = []
    for k in range(conv.out_channels):
        w = conv.weight[k].reshape(conv.in_channels, -1) * (bn.weight[k] / bn.running_var[k].sqrt()).abs()
        lips.append(torch.linalg.svdvals(w.detach())[0])
    lips = torch.stack(lips)
    return set(torch.nonzero(lips > lips.mean() + u * lips.std()).flatten().tolist())


def test_clp_prunes_exactly_the_channels_above_the_bound():
    m = _clp_model()
    exp0, exp1 = _expected_clp(m[0], m[1], 2.0), _expected_clp(m[3], m[4], 2.0)
    assert exp0 == {5} and exp1 == {2}  # the construction's outliers, by the independent formula
    data = _bright_channel_data(2)
    out = run_defense("clp", m, data, {"u": 2.0}, DefenseContext())
    pm = out.model
    for bn_i, exp in ((1, exp0), (4, exp1)):
        zero = set(torch.nonzero((pm[bn_i].weight == 0) & (pm[bn_i].bias == 0)).flatten().tolist())
        assert zero == exp
        keep = [k for k in range(8) if k not in exp]
        assert torch.equal(pm[bn_i].weight[keep], m[bn_i].weight[keep])
    assert torch.equal(pm[0].weight, m[0].weight) and torch.equal(pm[3].weight, m[3].weight)
    assert out.diagnostics["n_pruned"] == 2
    # a larger u prunes nothing
    assert run_defense("clp", m, data, {"u": 100.0}, DefenseContext()).diagnostics["n_pruned"] == 0


def test_clp_pairs_preact_batchnorms_with_the_conv_that_feeds_them():
    from defense.methods.clp import conv_bn_pairs
    from defense.models import create_model

    pairs = dict((bn, conv) for conv, bn in conv_bn_pairs(create_model("preact_resnet18"), 3, 32))
    assert pairs["layer1.0.bn1"] == "conv1"
    assert pairs["layer1.0.bn2"] == "layer1.0.conv1"
    assert pairs["layer2.0.bn1"] == "layer1.1.conv2"  # not the shortcut registered just before it
    assert pairs["layer3.0.bn2"] == "layer3.0.conv1"
    assert len(pairs) == 16


# ----------------------------------------------------------------------------- ANP / RNP thresholds

@pytest.mark.parametrize("name", ["anp", "rnp"])
def test_pruning_threshold_is_the_largest_within_the_clean_bound(defended, name):
    """The chosen threshold is recomputed here from the defender's clean data alone: prune the
    original model at every grid threshold and keep the largest within the accuracy bound."""
    from defense.methods._common import bn_layers, prune_bn_neurons, within_bound

    bd, model, _, runs = defended
    out = runs[name][0]
    d = out.diagnostics
    clean, _ = defender_subset(bd["train"], 0.05, seed=0)
    rows = [r for r in out.curves if r["phase"] == "prune"]
    grid = [r["threshold"] for r in rows]
    assert grid == pytest.approx([round(0.05 * i, 10) for i in range(19)])
    acc0 = accuracy(model, clean)
    ok = []
    for r in rows:
        m = copy.deepcopy(model)
        k = prune_bn_neurons(m, bn_layers(m), _scores(out, model), r["threshold"])
        assert k == r["pruned"]
        acc = accuracy(m, clean)
        assert acc == pytest.approx(r["clean_acc"])
        ok.append(within_bound(acc, acc0, 0.1))
    passing = [t for t, good in zip(grid, ok) if good]
    assert d["threshold"] == (max(passing) if passing else None)
    # the returned model is the original with exactly those BN weights zeroed (none when no
    # threshold kept clean accuracy within the bound)
    m = copy.deepcopy(model)
    if d["threshold"] is not None:
        prune_bn_neurons(m, bn_layers(m), _scores(out, model), d["threshold"])
    assert _same(_state(m), _state(out.model))


def _scores(out, model):
    from defense.methods._common import bn_layers

    return [torch.tensor(out.diagnostics["mask_scores"][name]) for name, _ in bn_layers(model)]


def test_anp_and_rnp_code_reads_no_target_and_no_test_data():
    """Their signature gets only the clean subset, and their code (and the shared helpers it
    uses) names no target, no test set and no poisoned data."""
    import ast
    import inspect

    for name in ("anp", "rnp", "nwc_fp", "fp"):
        fn = DEFENSES.get(name).fn
        assert list(inspect.signature(fn).parameters) == ["model", "clean", "p", "ctx"]
    import defense.methods._common as common
    import defense.methods.anp as anp
    import defense.methods.rnp as rnp

    for mod in (anp, rnp, common):
        tree = ast.parse(inspect.getsource(mod))
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert "target" not in names, mod.__name__
        assert not [n for n in names if "test" in n.lower() or "poison" in n.lower() or "asr" in n.lower()], mod.__name__


# ----------------------------------------------------------------------------- SAM, NAD, I-BAU, NWC-FP

@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_the_formula(adaptive):
    from defense.methods.ftsam import sam_step

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    w0 = [q.detach().clone() for q in model.parameters()]
    rho, lr = 0.5, 0.1
    # by hand
    ref = copy.deepcopy(model)
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    t = [q.abs() if adaptive else torch.ones_like(q) for q in w0]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    e = [rho * ti * ti * gi / norm for ti, gi in zip(t, g)]
    with torch.no_grad():
        for q, ei in zip(ref.parameters(), e):
            q.add_(ei)
    g2 = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    expected = [w - lr * gi for w, gi in zip(w0, g2)]
    # the implementation
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sam_step(model, x, y, opt, rho, adaptive)
    for q, exp in zip(model.parameters(), expected):
        assert torch.allclose(q, exp, atol=1e-6)


def test_nad_attention_layers_are_the_last_three_stages():
    from defense.methods.nad import at_loss, attention_layers, attention_map
    from defense.models import create_model

    x = torch.randn(1, 3, 32, 32)
    assert attention_layers(create_model("preact_resnet18"), x) == ["layer2", "layer3", "layer4"]
    tiny = attention_layers(create_model("tiny_cnn"), x)
    shapes = {}
    m = create_model("tiny_cnn")
    for n in tiny:
        m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[2:])))
    m(x)
    assert [shapes[n] for n in tiny] == [(16, 16), (8, 8), (4, 4)]
    # attention maps: unit L2 norm per image; the loss is 0 for proportional feature maps
    f = torch.rand(2, 4, 5, 5)
    assert torch.allclose(attention_map(f, 2.0).flatten(1).norm(dim=1), torch.ones(2), atol=1e-4)
    assert float(at_loss(f, 3 * f, 2.0)) < 1e-8 and float(at_loss(f, torch.rand(2, 4, 5, 5), 2.0)) > 0


def test_ibau_hypergradient_equals_the_implicit_function_formula():
    """The fixed-point hypergradient equals g_w + (dPhi/dw)^T v with v the K-term Neumann series
    sum_k (dPhi/dd)^T^k g_d (I-BAU's inner objective is not convex, so the series is truncated at K,
    not summed to (I - dPhi/dd)^-T g_d)."""
    from defense.methods.ibau import IBAUParams, hypergradient

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    params = list(net.parameters())
    x, y = torch.randn(6, 1, 2, 2), torch.randint(0, 3, (6,))
    delta = torch.randn(1, 1, 2, 2) * 0.1
    p = IBAUParams(K=5, portion=1.0, inner_lr=0.1, reg=0.001)
    grads, _ = hypergradient(net, params, delta, x, y, p, torch.Generator().manual_seed(0))

    def phi(d_flat, w_flat):
        w, b = w_flat[:12].reshape(3, 4), w_flat[12:]
        d = d_flat.reshape(1, 1, 2, 2)
        inner = lambda dd: -F.cross_entropy(F.linear((x + dd).flatten(1), w, b), y) + 0.001 * dd.pow(2).sum()
        g = torch.autograd.grad(inner(d), d, create_graph=True)[0]
        return (d - 0.1 * g).flatten()

    def outer(d_flat, w_flat):
        w, b = w_flat[:12].reshape(3, 4), w_flat[12:]
        return F.cross_entropy(F.linear((x + d_flat.reshape(1, 1, 2, 2)).flatten(1), w, b), y)

    d0 = delta.flatten().clone()
    w0 = torch.cat([q.detach().flatten() for q in params])
    J_d, J_w = torch.autograd.functional.jacobian(phi, (d0, w0))
    g_d, g_w = torch.autograd.functional.jacobian(outer, (d0, w0))
    v, term = torch.zeros(4), g_d.clone()
    for _ in range(p.K):
        v, term = v + term, J_d.T @ term
    expected = g_w + J_w.T @ v
    got = torch.cat([g.flatten() for g in grads])
    assert torch.allclose(got, expected, atol=1e-5)


def test_nwc_fp_prunes_the_top_of_the_nwc_ranking(defended):
    from defense.methods.nwc_fp import nwc_prepare
    from defense.methods.tsbd import NWC

    bd, model, _, runs = defended
    out = runs["nwc_fp"][0]
    d = out.diagnostics
    clean, _ = defender_subset(bd["train"], 0.05, seed=0)
    p = DEFENSES.get("nwc_fp").make_params(TINY["nwc_fp"])
    ranking = NWC.from_dict(nwc_prepare(model, clean, p, DefenseContext(seed=0))["nwc"]).ranking
    assert d["top_neurons"] == [f"{layer}:{j}" for layer, j in ranking[:20]]
    assert 0 < d["pruned"] < len(ranking)
    for layer, j in ranking[: d["pruned"]]:
        assert torch.all(out.model.get_submodule(layer).weight[j] == 0)
    # the neurons after the prefix were not pruned
    layer, j = ranking[d["pruned"]]
    assert torch.any(out.model.get_submodule(layer).weight[j] != 0)


def test_pruning_that_no_threshold_allows_returns_the_model_unpruned_and_says_so(badnets_model):
    """All masks at 0: every threshold prunes every BN neuron, clean accuracy collapses, no
    threshold is within the bound, so the model comes back unchanged, with a warning that names
    the cause (a table row equal to "no defense" must not be a silent mystery)."""
    from defense.methods._common import bn_layers
    from defense.methods.anp import prune_by_masks, warn_if_unpruned

    model = badnets_model["model"]
    clean, _ = defender_subset(badnets_model["train"], 0.05, seed=0)
    zeros = [torch.zeros(m.num_features) for _, m in bn_layers(model)]
    net, diag, curve = prune_by_masks(model, clean, zeros, pruning_max=0.9, pruning_step=0.05, acc_ratio=0.1)
    assert diag["threshold"] is None and diag["n_pruned"] == 0
    assert _same(_state(net), _state(model))
    assert curve[0]["pruned"] == sum(len(z) for z in zeros) and not curve[0]["within_bound"]
    logged = []
    with pytest.warns(UserWarning, match="returned unpruned"):
        warn_if_unpruned("anp", diag, curve, 0.1, "hint", logged.append)
    assert len(logged) == 1 and f"prunes {curve[0]['pruned']} neurons" in logged[0]
    # masks all 1 prune nothing at any threshold <= 0.9: the largest threshold passes, no warning
    ones = [torch.ones(m.num_features) for _, m in bn_layers(model)]
    _, diag1, curve1 = prune_by_masks(model, clean, ones, pruning_max=0.9, pruning_step=0.05, acc_ratio=0.1)
    assert diag1["threshold"] == pytest.approx(0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unpruned("anp", diag1, curve1, 0.1, "hint", logged.append)
    assert len(logged) == 1
