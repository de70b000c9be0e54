"""What the attack test modules share: the attack context they build and the ASR tests' run
(attack -> tiny_cnn trained with the attack's hook -> ACC/ASR/RA on the whole test set)."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from defense.attacks import AttackContext, run_attack
from defense.train import get_recipe

# small data: batch 64 (lr 0.1) keeps enough steps per epoch for tiny_cnn to learn
RECIPE = get_recipe("fast", batch_size=64, lr=0.1)


def attack_ctx(cache, seed: int = 0, pratio: float = 0.1, recipe=RECIPE) -> AttackContext:
    return AttackContext(target=0, pratio=pratio, seed=seed, arch="tiny_cnn", device="cpu", resources=cache,
                         recipe=recipe)


def implant(name: str, params: dict, data, cache, epochs: int = 8, train_epochs: int | None = None):
    """Poison with ``name`` at 10% (resources made with an ``epochs``-epoch recipe), train tiny_cnn
    for ``train_epochs`` (default ``epochs``), print and return (poisoned, metrics)."""
    from defense.models import create_model
    from defense.train import train
    from defense.trial import evaluate

    tr, te = data
    recipe = replace(RECIPE, epochs=epochs)
    t0 = time.perf_counter()
    p = run_attack(name, tr, te, params, attack_ctx(cache, recipe=recipe))
    resource_s = time.perf_counter() - t0  # resources (clean model, generators, encoder) made here, cold cache
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    train(model, p.train, replace(recipe, epochs=train_epochs or epochs), seed=0, device="cpu", hook=p.hook)
    m = evaluate(model, te, p, torch.arange(len(te)), 0, "cpu")
    print(f"{name}: acc {m['acc']:.3f} asr {m['asr']:.3f} ra {m['ra']:.3f}; attack + resources {resource_s:.1f} s")
    return p, m
