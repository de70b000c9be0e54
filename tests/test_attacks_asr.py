"""Each of the eight attacks implants a backdoor in tiny_cnn on small synthetic data.

Shrunk for CPU: 4000/1000 images, 8 epochs of a batch-64 one-cycle recipe (the ``fast``
recipe's batch 512 takes too few steps on 4000 images to learn), resources trained briefly
(see TRAIN). Some triggers are made stronger than their defaults, whose strength is tuned for
a ResNet trained 100 epochs; the defaults stay as BackdoorBench has them:
- WaNet s 2 and no noise mode (cross_ratio 0): measured on this setup, s 0.5 moves pixels by
  about half a pixel, and with the noise mode on tiny_cnn reaches only ASR 0.24-0.58 in 8-16
  epochs (s 2 / 4); without it ASR 1.0.
- LF eps 0.15 (default 0.1: ASR 0.66 here).
- SSBA residual budget PSNR 20 dB (default 27 dB: ASR 0.13 here, the briefly trained encoder
  does not yet hide the secret, so its residual is weak noise).
- Input-aware is held to a lower bar (ASR >= 0.4, measured 0.58): its pattern generator learns
  together with the classifier and 8 epochs of a width-8 generator are not enough for 0.85.
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
    "wanet": {"s": 2.0, "cross_ratio": 0.0},
    "inputaware": {"mask_epochs": 2, "width": 8},
    "lf": {"steps": 100, "ref_epochs": 4, "eps": 0.15},
    "trojannn": {"iters": 100, "ref_epochs": 4},
    "ssba": {"epochs": 3, "width": 16, "batch_size": 32, "psnr": 20.0, "lr": 3e-3},
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
    asr_bar = 0.4 if name == "inputaware" else 0.85  # see the module docstring
    assert m["acc"] >= 0.75 and m["asr"] >= asr_bar, m
