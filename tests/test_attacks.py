"""All eight attacks on small data, no classifier training: determinism per seed, poisoned count
per each attack's rate definition, triggers only where they belong, backdoor test sets without
target-class images, and the per-batch hooks of the training-controlled attacks."""
from __future__ import annotations

import re

import pytest
import torch

from attack_setup import attack_ctx as ctx_for
from defense.attacks import ATTACKS, run_attack
from defense.resources import ResourceCache

# Resource sizes shrunk for speed (the defaults stay paper-sized).
TINY = {
    "badnets": {}, "blended": {}, "sig": {}, "wanet": {},
    "inputaware": {"mask_epochs": 1, "width": 4},
    "lf": {"steps": 3, "ref_epochs": 1},
    "trojannn": {"iters": 5, "ref_epochs": 1},
    "ssba": {"epochs": 1, "width": 8, "bits": 8},
}
DIRTY = ["badnets", "blended", "lf", "ssba", "trojannn"]
HOOKED = ["wanet", "inputaware"]


def test_all_eight_registered():
    assert set(TINY) <= set(ATTACKS.names())
    for name in TINY:
        e = ATTACKS.get(name)
        assert e.meta.get("kind") and e.meta.get("rate_of")


@pytest.fixture(scope="module")
def data(small_data):
    train, test = small_data
    return train.subset(torch.arange(800)), test.subset(torch.arange(300))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ResourceCache(tmp_path_factory.mktemp("resources"))


_RUNS: dict = {}


def run(name, data, cache, seed=0, pratio=0.1):
    key = (name, seed, pratio)
    if key not in _RUNS:
        _RUNS[key] = run_attack(name, *data, TINY[name], ctx_for(cache, seed, pratio))
    return _RUNS[key]


@pytest.mark.parametrize("name", list(TINY))
def test_deterministic_per_seed(name, data, cache):
    a = run(name, data, cache)
    b = run_attack(name, *data, TINY[name], ctx_for(cache))  # a second, uncached-in-memory run
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.poison_idx, b.poison_idx)
    ba, bb = a.backdoor_test(None)[0], b.backdoor_test(None)[0]
    assert torch.equal(ba.x, bb.x)
    if name not in HOOKED:  # another seed poisons other images
        c = run(name, data, cache, seed=1)
        assert not torch.equal(a.poison_idx, c.poison_idx)


@pytest.mark.parametrize("name", DIRTY)
def test_dirty_label_poisons_rate_of_training_set_only_there(name, data, cache):
    train, _ = data
    p = run(name, data, cache)
    idx = p.poison_idx
    assert len(idx) == round(0.1 * len(train))  # pratio is a fraction of the whole training set
    assert len(torch.unique(idx)) == len(idx)
    assert (train.y[idx] != 0).all()  # drawn from non-target images
    assert (p.train.y[idx] == 0).all()  # relabelled to the target
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(p.train.x[rest], train.x[rest]) and torch.equal(p.train.y[rest], train.y[rest])
    changed = (p.train.x[idx].int() - train.x[idx].int()).abs().flatten(1).amax(1) > 0
    assert changed.float().mean() > 0.95  # every poisoned image carries the trigger (clipping may hide it rarely)


def test_sig_is_clean_label(data, cache):
    train, _ = data
    p = run("sig", data, cache)
    assert len(p.poison_idx) == min(round(0.1 * len(train)), int((train.y == 0).sum()))
    assert (train.y[p.poison_idx] == 0).all()
    assert torch.equal(p.train.y, train.y)  # labels kept


@pytest.mark.parametrize("name", list(TINY))
def test_backdoor_test_has_no_target_images(name, data, cache):
    _, test = data
    p = run(name, data, cache)
    bd, bd_idx, bd_true = p.backdoor_test(None)
    assert len(bd) == int((test.y != 0).sum()) == len(bd_idx)
    assert (bd_true != 0).all() and (bd.y == 0).all()
    assert torch.equal(bd_true, test.y[bd_idx])
    assert bd.x.dtype == torch.uint8 and bd.x.shape[1:] == test.x.shape[1:]
    assert (bd.x != test.x[bd_idx]).flatten(1).any(1).float().mean() > 0.95  # the trigger is on them


def test_badnets_trigger_only_in_its_patch(data, cache):
    train, _ = data
    p = run("badnets", data, cache)
    diff = (p.train.x[p.poison_idx].int() - train.x[p.poison_idx].int()).abs().sum((0, 1))
    assert diff[-3:, -3:].gt(0).all() and diff[:-3].sum() == 0 and diff[:, :-3].sum() == 0
    assert (p.train.x[p.poison_idx][..., -3:, -3:] == 255).all()


def test_trojannn_trigger_inside_its_mask_and_lf_low_frequency(data, cache):
    from defense.attacks.lf import low_pass
    from defense.attacks.trojannn import TrojanNNParams, trigger_mask

    t = run("trojannn", data, cache).info["trigger"]
    mask = trigger_mask(32, TrojanNNParams())
    assert (t * (1 - mask)).abs().sum() == 0 and t.abs().sum() > 0
    d = run("lf", data, cache).info["trigger"]
    assert d.abs().max() <= 0.1 + 1e-6 and d.abs().max() > 0
    assert torch.allclose(low_pass(d, 4), d, atol=1e-5)  # nothing above the cut-off


@pytest.mark.parametrize("name", HOOKED)
def test_hook_rates_labels_and_determinism(name, data, cache):
    from defense.data.augment import to_float

    train, _ = data
    x = to_float(train.x[:128])
    y = train.y[:128]
    p1 = run_attack(name, *data, TINY[name], ctx_for(cache))
    p2 = run_attack(name, *data, TINY[name], ctx_for(cache))
    assert len(p1.poison_idx) == 0 and p1.info["per_batch_rate"] == 0.1
    cross = p1.info["per_batch_cross_rate"]
    model = torch.nn.Identity()
    n_bd = n_cross = 0
    for _ in range(10):
        xa, ya = p1.hook(x, y, model)
        xb, yb = p2.hook(x, y, model)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same seed, same batches: same poisoning
        changed = (xa - x).abs().flatten(1).amax(1) > 1e-6
        k = int(changed.sum())
        assert changed[:k].all() and not changed[k:].any()  # poisoned + cross images come first
        assert (ya[k:] == y[k:]).all()  # the clean rest keeps its labels
        relabelled = int((ya != y).sum())  # backdoor images whose true class is not the target
        n_bd += relabelled
        n_cross += k - int((ya[:k] == 0).sum())  # changed images that are not backdoor images
    # backdoor share ~ pratio (x 0.9: target-class images among them keep label 0), cross share ~ cross rate
    assert 0.06 < n_bd / 1280 <= 0.12
    assert abs(n_cross / 1280 - cross * 0.9) < 0.04


def test_resources_reused_from_cache(data, tmp_path):
    """Second call of every resource attack: nothing is recomputed."""
    cache = ResourceCache(tmp_path)
    for name in ["inputaware", "lf", "ssba", "trojannn"]:
        first = run_attack(name, *data, TINY[name], ctx_for(cache))
        second = run_attack(name, *data, TINY[name], ctx_for(cache))
        kinds_first = {r["kind"]: r["computed"] for r in first.info["resources"]}
        assert all(kinds_first.values()) or name == "trojannn"  # trojannn reuses LF's clean model
        assert not any(r["computed"] for r in second.info["resources"])
        assert torch.equal(first.backdoor_test(None)[0].x, second.backdoor_test(None)[0].x)
    # the clean reference model was trained once, for LF, and reused by TrojanNN
    assert sum(1 for k in cache.computed) == 5  # mask, clean model, lf trigger, encoder, trojan trigger


def test_cli_list_and_preview(tmp_path):
    from typer.testing import CliRunner

    from grid.cli import app

    r = CliRunner().invoke(app, ["attacks", "list"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for name in TINY:
        assert name in r.output
    assert "cross_ratio=2.0" in r.output and "inputaware_mask" in r.output
    r = CliRunner().invoke(app, ["attacks", "preview", "--out", str(tmp_path / "pv"), "-a", "badnets", "-a", "wanet",
                                 "--data-param", "n_train=200", "--data-param", "n_test=100", "--n", "2",
                                 "--resources", str(tmp_path / "res"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    for name in ("badnets", "wanet"):
        im = Image.open(tmp_path / "pv" / f"{name}.png")
        assert im.size[0] > 100 and im.size[1] > 100
    assert "[1/2] badnets" in r.output and "PSNR" in r.output and "% of pixels changed" in r.output
    # badnets changes a 3x3 patch: 9 of 1,024 pixels (0.9%)
    assert re.search(r"badnets\s+->.*PSNR.*\s0\.9% of pixels changed", " ".join(r.output.split())), r.output
    # an attack with trained resources previews with quick settings by default (not the minutes of --full)
    r = CliRunner().invoke(app, ["attacks", "preview", "--out", str(tmp_path / "pv"), "-a", "lf", "--data-param",
                                 "n_train=600", "--data-param", "n_test=100", "--n", "2",
                                 "--resources", str(tmp_path / "res"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pv" / "lf.png").exists() and "trains its resources the first time" in r.output
    r = CliRunner().invoke(app, ["attacks", "preview", "-a", "wanet", "-p", "wanet.kk=3", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "did you mean 'k'" in r.output
