"""TSBD unit tests on small hand-built models with known weights.

The Stage-2 tests compare our in-place step with ``reference_finetune_pass``, a literal
transcription of ``train_finetuning_reg`` in the authors' ``tsbd.py`` (GitHub
linweiii/TSBD): deep copy per batch, g1, per-tensor perturbation, g2, mix, step, one more
train-mode forward of the real model.
"""
from __future__ import annotations

import copy
import io
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.data import Data, DatasetInfo
from defense.methods import DEFENSES, DefenseContext, run_defense
from defense.methods.tsbd import (TSBDParams, activeness_finetune, activeness_step, clean_unlearn, defend,
                                  neuron_weight_change, rank_neurons, scored_layers, tsbd_prepare, tsbd_sweep,
                                  zero_reinit)
from defense.models import create_model
from defense.registry import BadParams
from defense.train import index_batches, make_batch


# ---------------------------------------------------------------------------------------
# Small models
# ---------------------------------------------------------------------------------------

class Block(nn.Module):
    """conv (scored) + a shortcut conv and a downsample conv (both excluded)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1, bias=False)  # 3 neurons, 1 weight each
        self.shortcut = nn.Conv2d(1, 3, 1, bias=False)
        self.downsample = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, (1, 2), bias=True)  # 2 neurons, 2 weights each
        self.block = Block()
        self.fc = nn.Linear(3, 2)  # not scored


def _set(t: torch.Tensor, values) -> None:
    with torch.no_grad():
        t.copy_(torch.tensor(values, dtype=t.dtype).view_as(t))


def toy_pair():
    m0 = Toy()
    for q in m0.parameters():
        nn.init.zeros_(q)
    mu = copy.deepcopy(m0)
    # conv1 changes: neuron 0 -> |0.5| + |-0.25| = 0.75, neuron 1 -> 0.1 + 0.2 = 0.3
    _set(mu.conv1.weight, [[0.5, -0.25], [0.1, -0.2]])
    # block.conv changes: 0.4, -1.0, 0.05
    _set(mu.block.conv.weight, [0.4, -1.0, 0.05])
    # excluded layers change a lot: they must not appear
    _set(mu.block.shortcut.weight, [9.0, 9.0, 9.0])
    _set(mu.block.downsample[0].weight, [8.0, 8.0, 8.0])
    _set(mu.fc.weight, torch.full((2, 3), 7.0).tolist())
    _set(mu.conv1.bias, [5.0, 5.0])
    return m0, mu


# ---------------------------------------------------------------------------------------
# Stage 1b: NWC
# ---------------------------------------------------------------------------------------

def test_nwc_values_ranking_and_exclusions():
    m0, mu = toy_pair()
    nwc = neuron_weight_change(m0, mu)
    assert list(nwc.neuron) == ["conv1", "block.conv"]  # shortcut, downsample, linear excluded
    torch.testing.assert_close(nwc.neuron["conv1"], torch.tensor([0.75, 0.3]))
    torch.testing.assert_close(nwc.neuron["block.conv"], torch.tensor([0.4, 1.0, 0.05]))
    torch.testing.assert_close(nwc.weight["conv1"], torch.tensor([[0.5, 0.25], [0.1, 0.2]]))
    assert nwc.total == 5
    assert nwc.ranking == [("block.conv", 1), ("conv1", 0), ("block.conv", 0), ("conv1", 1), ("block.conv", 2)]


def test_ranking_rounds_like_the_reference():
    # The reference ranks '{:.4f}'-formatted scores with a stable sort: near-ties keep layer order.
    neuron = {"a": torch.tensor([0.10001]), "b": torch.tensor([0.10004])}
    assert rank_neurons(neuron, 4) == [("a", 0), ("b", 0)]
    assert rank_neurons(neuron, -1) == [("b", 0), ("a", 0)]


def test_bn_layer_type_scores_batchnorm_scales():
    m0 = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    mu = copy.deepcopy(m0)
    with torch.no_grad():
        mu[1].weight += torch.tensor([0.2, -0.7])
    nwc = neuron_weight_change(m0, mu, "bn")
    assert list(nwc.neuron) == ["1"]
    torch.testing.assert_close(nwc.neuron["1"], torch.tensor([0.2, 0.7]))
    assert nwc.ranking == [("1", 1), ("1", 0)]
    model, counts = zero_reinit(m0, nwc, n=0.5, m=1.0)  # the top BN scale is zeroed, nothing else
    assert model[1].weight.tolist() == [1.0, 0.0] and counts == {"1": {"neurons": 1, "weights": 1}}


def test_preact_resnet18_has_3904_scored_neurons_in_17_convs():
    m0 = create_model("preact_resnet18", 10, 3, 32)
    layers = scored_layers(m0)
    assert len(layers) == 17 and not any("shortcut" in n for n in layers)
    mu = copy.deepcopy(m0)
    with torch.no_grad():
        for q in mu.parameters():
            q.add_(0.01)
    nwc = neuron_weight_change(m0, mu)
    assert nwc.total == 3904 and len(nwc.ranking) == 3904
    assert len(set(nwc.ranking)) == 3904


# ---------------------------------------------------------------------------------------
# Stage 1c: zero reinitialisation
# ---------------------------------------------------------------------------------------

def test_zero_reinit_counts_and_positions():
    m0, mu = toy_pair()
    nwc = neuron_weight_change(m0, mu)
    with torch.no_grad():  # give the original model non-zero weights to be zeroed
        for q in m0.parameters():
            q.fill_(3.0)
    # n = 0.6 -> int(5 * 0.6) = 3 neurons: block.conv[1] (1.0), conv1[0] (0.5, 0.25), block.conv[0] (0.4)
    # pool = [1.0, 0.5, 0.25, 0.4]; m = 0.5 -> the 2 largest -> tau = 0.5 -> zero 1.0 and 0.5
    model, counts = zero_reinit(m0, nwc, n=0.6, m=0.5)
    assert counts == {"block.conv": {"neurons": 2, "weights": 1}, "conv1": {"neurons": 1, "weights": 1}}
    w = model.block.conv.weight.flatten().tolist()
    assert w == [3.0, 0.0, 3.0]
    assert model.conv1.weight.view(2, 2).tolist() == [[0.0, 3.0], [3.0, 3.0]]
    assert model.conv1.bias.tolist() == [3.0, 3.0]  # biases untouched
    assert all(float(q.detach().min()) == 3.0 for q in m0.parameters())  # the original is not modified
    # m = 1.0 zeroes every weight of the selected neurons
    model, counts = zero_reinit(m0, nwc, n=0.6, m=1.0)
    assert sum(c["weights"] for c in counts.values()) == 4
    # int(5 * 0.1) = 0 neurons: nothing is zeroed (the reference would fail on min([]))
    model, counts = zero_reinit(m0, nwc, n=0.1, m=0.7)
    assert counts == {} and all(float(q.detach().min()) == 3.0 for q in model.parameters())


def test_zero_reinit_ties_zero_every_weight_at_tau():
    m0 = nn.Sequential(nn.Conv2d(1, 1, (1, 4), bias=False))
    nn.init.ones_(m0[0].weight)
    mu = copy.deepcopy(m0)
    _set(mu[0].weight, [1.5, 1.5, 1.5, 1.1])  # changes 0.5, 0.5, 0.5, 0.1
    nwc = neuron_weight_change(m0, mu)
    model, counts = zero_reinit(m0, nwc, n=1.0, m=0.5)  # k = 2, tau = 0.5: all three ties go
    assert counts["0"]["weights"] == 3
    assert model[0].weight.flatten().tolist() == [0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------
# Stage 2: one step vs the formula and vs the reference
# ---------------------------------------------------------------------------------------

class SmallBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def _batches(n_batches=4, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 6, 6, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n_batches)]


def reference_finetune_pass(model, optimizer, batches, r, alpha):
    """Literal transcription of the reference's ``train_finetuning_reg`` (criterion = CE)."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    for images, labels in batches:
        model_temp = copy.deepcopy(model)
        out1 = model_temp(images)
        loss1 = criterion(out1, labels)
        model_temp.zero_grad()
        loss1.backward()
        g1 = [param.grad.data.clone() for param in model_temp.parameters()]
        with torch.no_grad():
            for param, grad in zip(model_temp.parameters(), g1):
                param.data += r * (grad / grad.norm())
        out2 = model_temp(images)
        loss2 = criterion(out2, labels)
        model_temp.zero_grad()
        loss2.backward()
        g2 = [param.grad.data.clone() for param in model_temp.parameters()]
        optimizer.zero_grad()
        final_gradients = [(1 - alpha) * g1_item + alpha * g2_item for g1_item, g2_item in zip(g1, g2)]
        for param, grad in zip(model.parameters(), final_gradients):
            if grad is not None:
                param.grad = grad
        optimizer.step()
        output = model(images)
        loss = criterion(output, labels)


def _grads_at(model, params, buffers, x, y):
    """CE gradient at the given parameter values (train mode), not touching ``model``."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.clone() for k, v in buffers.items()}
    out = torch.func.functional_call(model, {**params, **buffers}, (x,))
    g = torch.autograd.grad(F.cross_entropy(out, y), list(params.values()))
    return dict(zip(params, g))


def test_one_step_equals_the_formula_and_updates_bn_once():
    torch.manual_seed(0)
    model = SmallBN().train()
    (x, y), = _batches(1)
    r, alpha, lr = 0.05, 0.7, 0.01
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    g1 = _grads_at(model, theta, bufs, x, y)
    pert = {k: theta[k] + r * g1[k] / g1[k].norm() for k in theta}
    g2 = _grads_at(model, pert, bufs, x, y)
    # first SGD step with momentum: the buffer is the gradient itself
    expect = {k: theta[k] - lr * ((1 - alpha) * g1[k] + alpha * g2[k]) for k in theta}

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    activeness_step(model, x, y, opt, r, alpha)
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, expect[k], atol=1e-6, rtol=1e-5)
    # running stats: exactly one train-mode forward at the new weights, from the old stats
    probe = SmallBN()
    probe.load_state_dict({**expect, **bufs})
    probe.train()
    with torch.no_grad():
        probe(x)
    for (k, v), (_, w) in zip(model.named_buffers(), probe.named_buffers()):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=1e-5)
    assert int(model.bn.num_batches_tracked) == 1


@pytest.mark.parametrize("alpha", [0.7, 0.0, 1.0])
def test_several_steps_equal_literal_reference(alpha):
    torch.manual_seed(1)
    ours = SmallBN()
    ref = copy.deepcopy(ours)
    batches = _batches(4)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):  # two passes over four batches: momentum and BN statistics carry over
        reference_finetune_pass(ref, opt_r, batches, 0.05, alpha)
        for x, y in batches:
            activeness_step(ours, x, y, opt_o, 0.05, alpha)
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-6, rtol=1e-5, msg=k)


def test_finetune_loop_follows_reference_data_order():
    """activeness_finetune without augmentation = the reference over Dc in stored order."""
    g = torch.Generator().manual_seed(3)
    info = DatasetInfo("toy", 3, 3, 6, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), needs_root=False)
    data = Data(torch.randint(0, 256, (20, 3, 6, 6), generator=g, dtype=torch.uint8),
                torch.randint(0, 3, (20,), generator=g), info)
    p = TSBDParams(n=0.1, batch_size=8, ft_epochs=2, augment=False)
    torch.manual_seed(2)
    ours = SmallBN()
    ref = copy.deepcopy(ours)
    curve = activeness_finetune(ours, data, p, DefenseContext(seed=0))
    assert [row["epoch"] for row in curve] == [1, 2, 3]  # ft_epochs + 1 passes
    batches = [make_batch(data, idx, None, False) for idx in index_batches(len(data), 8, False, None)]
    opt = torch.optim.SGD(ref.parameters(), lr=p.ft_lr, momentum=p.momentum)
    for _ in range(p.ft_epochs + 1):
        reference_finetune_pass(ref, opt, batches, p.r, p.alpha)
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-6, rtol=1e-5, msg=k)


def test_alpha_one_is_a_sam_step():
    torch.manual_seed(4)
    model = SmallBN()
    (x, y), = _batches(1, seed=5)
    r, lr = 0.05, 0.1
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    # SAM (Foret et al., ICLR 2021) with per-tensor ascent: gradient at the worst-case neighbour
    g = _grads_at(model, theta, bufs, x, y)
    g_sam = _grads_at(model, {k: theta[k] + r * g[k] / g[k].norm() for k in theta}, bufs, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    activeness_step(model, x, y, opt, r, 1.0)
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, theta[k] - lr * g_sam[k], atol=1e-6, rtol=1e-5)
        # and not plain SGD: the perturbation matters
    assert any(not torch.allclose(v, theta[k] - lr * g[k], atol=1e-6) for k, v in model.named_parameters())


class WithDeadParam(SmallBN):
    def __init__(self):
        super().__init__()
        self.dead = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return super().forward(x) + 0.0 * self.dead  # gradient exactly zero


def test_zero_norm_guard():
    torch.manual_seed(6)
    ours = WithDeadParam()
    ref = copy.deepcopy(ours)
    batches = _batches(2)
    opt = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    for x, y in batches:
        activeness_step(ours, x, y, opt, 0.05, 0.7)
    assert all(torch.isfinite(q).all() for q in ours.parameters())
    assert torch.equal(ours.dead.detach(), torch.ones(3))
    # the reference divides 0 by 0 and poisons the perturbed copy with NaN
    reference_finetune_pass(ref, torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9), batches, 0.05, 0.7)
    assert not all(torch.isfinite(q).all() for q in ref.parameters())


# ---------------------------------------------------------------------------------------
# Stage 1a, prepare round trip, registry, sweep (tiny_cnn on small synthetic data)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_setup(small_data):
    """An untrained tiny_cnn and 200 synthetic images labelled with its own predictions, so
    that Dc accuracy starts high without spending CPU on training."""
    from defense.data.augment import normalize
    from defense.metrics import predict

    train_set, _ = small_data
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10, 3, 32)
    clean = train_set.subset(torch.arange(200))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:  # set BatchNorm running statistics to the data's (cumulative average, one pass)
        m.momentum = None
    with torch.no_grad():
        model.train()(normalize(clean.x, clean.info))
    for m in bns:
        m.momentum = 0.1
    model.eval()
    clean = Data(clean.x, predict(model, clean).cpu(), clean.info)
    return model, clean


def test_unlearning_stops_at_the_threshold(tiny_setup):
    model, clean = tiny_setup
    p = TSBDParams(n=0.1, un_threshold=0.2, batch_size=64)  # reference lr_un 1e-4
    un, curve = clean_unlearn(model, clean, p, DefenseContext(seed=0))
    accs = [row["dc_acc"] for row in curve]
    assert accs[-1] <= 0.2 and all(a > 0.2 for a in accs[:-1])
    assert 1 < len(curve) < p.max_un_epochs
    assert [row["epoch"] for row in curve] == list(range(1, len(curve) + 1))
    # the original model is untouched; the unlearned one moved
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), un.parameters()))
    # an unreachable threshold runs to max_un_epochs
    _, curve = clean_unlearn(model, clean, TSBDParams(lr_un=1e-6, un_threshold=0.0, max_un_epochs=2), DefenseContext())
    assert len(curve) == 2
    assert TSBDParams(un_threshold="chance+margin", un_margin=0.05).threshold(10) == pytest.approx(0.15)


def test_prepare_warns_when_unlearning_never_reaches_the_threshold(tiny_setup):
    """The reference runs on silently; we say why and what to set, and record it."""
    model, clean = tiny_setup
    logged = []
    p = TSBDParams(n=0.1, lr_un=1e-6, un_threshold=0.0, max_un_epochs=2)
    with pytest.warns(UserWarning, match=r"ran all 2 epochs without reaching un_threshold 0\.000.*largest class"):
        prep = tsbd_prepare(model, clean, p, DefenseContext(seed=0, log=logged.append))
    assert prep["unlearn_reached"] is False and prep["unlearn_epochs"] == 2
    assert any("un_threshold" in m for m in logged)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run that reaches its threshold warns nothing
        ok = tsbd_prepare(model, clean, TSBDParams(n=0.1, un_threshold=1.0, max_un_epochs=2), DefenseContext(seed=0))
    assert ok["unlearn_reached"] is True and ok["unlearn_epochs"] == 1


@pytest.mark.slow  # two unlearning runs and three fine-tuning passes on 200 images
def test_prepare_round_trips_registry_and_sweep(tiny_setup):
    model, clean = tiny_setup
    before = copy.deepcopy(model.state_dict())
    entry = DEFENSES.get("tsbd")
    assert entry.meta["prepare"] is tsbd_prepare
    assert "lr_un" in entry.meta["shared"] and "n" not in entry.meta["shared"] and "m" not in entry.meta["shared"]
    with pytest.raises(BadParams):
        entry.make_params({"n": 1.5})
    with pytest.raises(BadParams):
        entry.make_params({"un_threshold": "chance"})
    assert entry.make_params({"un_threshold": "chance+margin", "n": "0.05"}).n == 0.05

    params = {"n": 0.1, "lr_un": 3e-4, "un_threshold": 0.2, "ft_epochs": 0, "batch_size": 64}  # the fixed-n path
    p = entry.make_params(params)
    prep = tsbd_prepare(model, clean, p, DefenseContext(seed=0))
    buf = io.BytesIO()
    torch.save(prep, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["unlearn_epochs"] == len(loaded["curve"]) >= 1
    sweep = tsbd_sweep(model, clean, p, [0.05, 0.2], DefenseContext(seed=0, prepared=loaded))
    # the same n through the registry, computing Stages 1a/1b itself, gives the same model
    single = run_defense("tsbd", model, clean, {**params, "n": 0.2}, DefenseContext(seed=0))
    for x, y in zip(sweep[0.2].model.state_dict().values(), single.model.state_dict().values()):
        torch.testing.assert_close(x, y)
    assert sweep[0.05].diagnostics["n_selected"] == 12
    d = sweep[0.2].diagnostics
    assert d["n_neurons"] == 240 and d["n_selected"] == 48
    assert sum(c["neurons"] for c in d["zeroed"].values()) == 48
    assert d["weights_zeroed"] == sum(c["weights"] for c in d["zeroed"].values()) > 0
    assert len(d["finetune_curve"]) == 1 and d["unlearn_epochs"] == len(d["unlearn_curve"])
    import json

    json.dumps(d)  # JSON-able
    # the backdoored model itself is never modified
    for x, y in zip(model.state_dict().values(), before.values()):
        assert torch.equal(x, y)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # building a CUDA autocast on a CPU machine
def test_fp32_by_default_bf16_only_when_asked():
    """The reference trains in fp32; bf16 autocast is an opt-in deviation (issue 16)."""
    from defense.methods.tsbd import _autocast

    assert TSBDParams().bf16 is False
    cuda = torch.device("cuda")
    assert not isinstance(_autocast(cuda, TSBDParams()), torch.autocast)
    assert isinstance(_autocast(cuda, TSBDParams(bf16=True)), torch.autocast)
    assert not isinstance(_autocast(torch.device("cpu"), TSBDParams(bf16=True)), torch.autocast)


def _collapsed(model, clean):
    """``model`` made to predict one class (the most frequent of ``clean``) for every image: the
    classifier's weights zero, its bias one-hot. A tiny lr_un keeps it there."""
    m = copy.deepcopy(model)
    fc = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    c = int(torch.bincount(clean.y).argmax())
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.zero_()
        fc.bias[c] = 10.0
    return m, float((clean.y == c).float().mean())


def test_collapse_stop_ends_a_run_that_cannot_reach_the_threshold(tiny_setup):
    """Issue 15: a model whose stop check predicts one class for all of Dc stops after
    collapse_epochs epochs (not max_un_epochs), warns as before, and says so in the diagnostics."""
    model, clean = tiny_setup
    m, share = _collapsed(model, clean)
    assert share > 0.1  # above the threshold: the reference would run all max_un_epochs
    logged = []
    p = TSBDParams(n=0.1, lr_un=1e-6, max_un_epochs=50, collapse_epochs=4, batch_size=64)
    with pytest.warns(UserWarning, match=r"stopped after 4 epochs: the stop check predicted one class.*largest class"):
        prep = tsbd_prepare(m, clean, p, DefenseContext(seed=0, log=logged.append))
    assert prep["unlearn_epochs"] == 4 and prep["unlearn_collapsed"] is True and prep["unlearn_reached"] is False
    assert [r["collapsed"] for r in prep["curve"]] == [True] * 4
    assert all(r["dc_acc"] == pytest.approx(share) for r in prep["curve"])
    assert prep["dc_class_share"] == pytest.approx(share)
    # progress: every epoch says k of max and the stop-check accuracy
    assert sum("tsbd unlearn epoch" in s and "/50" in s and "dc_acc" in s for s in logged) == 4
    # collapse_epochs=0 is the reference: it runs on to max_un_epochs
    with pytest.warns(UserWarning, match="ran all 6 epochs"):
        ref = tsbd_prepare(m, clean, replace(p, max_un_epochs=6, collapse_epochs=0), DefenseContext(seed=0))
    assert ref["unlearn_epochs"] == 6 and ref["unlearn_collapsed"] is False
    # the diagnostics carry it
    out = defend(m, clean, replace(p, ft_epochs=-1), DefenseContext(seed=0, prepared=prep))
    d = out.diagnostics
    assert d["unlearn_collapsed"] is True and d["unlearn_reached_threshold"] is False and d["unlearn_epochs"] == 4
    with pytest.raises(BadParams, match="collapse_epochs"):
        DEFENSES.get("tsbd").make_params({"collapse_epochs": -1})
