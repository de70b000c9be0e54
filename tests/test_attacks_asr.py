"""Each of the eight attacks implants a backdoor in tiny_cnn on small synthetic data.

Shrunk for CPU: 4000/1000 images, 8 epochs of a batch-64 one-cycle recipe, resources trained
briefly (see TRAIN). Two triggers are made stronger than their defaults because their default
strength is tuned for a ResNet trained 100 epochs: WaNet s 2 (the default 0.5 moves pixels by
about half a pixel) and LF eps 0.15 (default 0.1). The defaults stay as BackdoorBench has them.
"""
from __future__ import annotations

import pytest
import torch

from defense.attacks import AttackContext, run_attack
from defense.models import create_model
from defense.resources import ResourceCache
from defense.train import get_recipe, train
from defense.trial import evaluate

RECIPE = get_recipe("fast", batch_size=64, lr=0.1, epochs=8)
TRAIN = {
    "badnets": {}, "blended": {}, "sig": {},
    "wanet": {"s": 2.0},
    "inputaware": {"mask_epochs": 2, "width": 8},
    "lf": {"steps": 100, "ref_epochs": 4, "eps": 0.15},
    "trojannn": {"iters": 100, "ref_epochs": 4},
    "ssba": {"epochs": 3, "width": 16, "batch_size": 32},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ResourceCache(tmp_path_factory.mktemp("asr_resources"))  # LF and TrojanNN share one clean model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAIN))
def test_attack_implants_backdoor(name, small_data, cache):
    tr, te = small_data
    ctx = AttackContext(target=0, pratio=0.1, seed=0, arch="tiny_cnn", device="cpu", resources=cache, recipe=RECIPE)
    p = run_attack(name, tr, te, TRAIN[name], ctx)
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    train(model, p.train, RECIPE, seed=0, device="cpu", hook=p.hook)
    m = evaluate(model, te, p, torch.arange(len(te)), 0, "cpu")
    print(name, m)
    assert m["acc"] >= 0.75 and m["asr"] >= 0.85, m
