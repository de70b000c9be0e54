"""Attack registry and the common attack interface.

An attack is ``fn(train, test, params, ctx) -> Poisoned``: given clean uint8 tensors it returns
the poisoned training set (with the indices it poisoned), the backdoor test set (non-target
test images carrying the trigger, labelled with the target; their true labels kept for RA),
and, for training-controlled attacks, a per-batch hook for ``defense.train.train``.
Deterministic from ``ctx.seed``. All-to-one, target class 0 by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from defense.data import Data
from defense.registry import Registry

ATTACKS = Registry("attack")


@dataclass
class AttackContext:
    target: int = 0
    pratio: float = 0.1
    seed: int = 0
    arch: str = "preact_resnet18"  # for resources that need a clean model of the same architecture
    device: str | torch.device = "cpu"
    resources: Any = None  # a defense.resources.ResourceCache, or None for no caching
    recipe: Any = None  # defense.train.Recipe used to train clean reference models, when needed
    progress: bool = False


@dataclass
class Poisoned:
    train: Data  # poisoned training set: same length as the clean one, triggers + target labels at poison_idx
    poison_idx: torch.Tensor  # int64 indices into train that carry the trigger
    bd_test: Data | None  # non-target test images with the trigger, labels = target
    bd_idx: torch.Tensor | None  # int64 indices into the clean test set of bd_test's images
    bd_true: torch.Tensor | None  # true labels of bd_test (for RA)
    hook: Callable | None = None  # per-batch hook (training-controlled attacks)
    # training-controlled attacks whose test triggers depend on training (Input-aware) build the
    # backdoor test set after training: finish(model) -> (bd_test, bd_idx, bd_true)
    finish: Callable | None = None
    info: dict = field(default_factory=dict)  # what the rate means, resource keys, etc.

    def backdoor_test(self, model=None) -> tuple[Data, torch.Tensor, torch.Tensor]:
        if self.bd_test is None:
            if self.finish is None:
                raise RuntimeError("attack produced neither a backdoor test set nor a finish() to make one")
            self.bd_test, self.bd_idx, self.bd_true = self.finish(model)
        return self.bd_test, self.bd_idx, self.bd_true


def register_attack(name: str, params: type | None = None, **meta) -> Callable:
    """Register ``fn(train: Data, test: Data, params, ctx: AttackContext) -> Poisoned``.

    meta: ``kind`` (dirty-label / clean-label / training-controlled), ``rate_of`` (what pratio
    is a fraction of), ``resources`` (names of upstream resources it needs).
    """
    return ATTACKS.register(name, params=params, **meta)


def run_attack(name: str, train: Data, test: Data, params: dict | None = None,
               ctx: AttackContext | None = None) -> Poisoned:
    entry = ATTACKS.get(name)
    return entry.fn(train, test, entry.make_params(params), ctx or AttackContext())


# --------------------------------------------------------------------- shared helpers

def choose_poison(labels: torch.Tensor, pratio: float, target: int, seed: int, clean_label: bool = False) -> torch.Tensor:
    """Seeded indices to poison: ``round(pratio * N)`` of the non-target images (dirty label), or of
    the target-class images for clean-label attacks (capped at their number). The rate is always a
    fraction of the whole training set, as in BackdoorBench."""
    n = len(labels)
    k = int(round(pratio * n))
    pool = torch.nonzero(labels.cpu() == target if clean_label else labels.cpu() != target).flatten()
    k = min(k, len(pool))
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    return pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values


def poison_with(train: Data, test: Data, idx: torch.Tensor, apply: Callable[[torch.Tensor], torch.Tensor],
                target: int, relabel: bool = True, apply_test: Callable | None = None) -> Poisoned:
    """Build a ``Poisoned`` for a data-poisoning attack from a uint8 -> uint8 trigger function."""
    x = train.x.clone()
    y = train.y.clone()
    if len(idx):
        x[idx] = apply(train.x[idx])
        if relabel:
            y[idx] = target
    bd_idx = torch.nonzero(test.y != target).flatten()
    bx = (apply_test or apply)(test.x[bd_idx])
    bd_true = test.y[bd_idx].clone()
    bd = Data(bx, torch.full_like(bd_true, target), test.info)
    return Poisoned(Data(x, y, train.info), idx, bd, bd_idx, bd_true)


def blend(x: torch.Tensor, pattern: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """(1 - alpha) * x + alpha * pattern on uint8 images, rounded back to uint8."""
    out = (1 - alpha) * x.float() + alpha * pattern.float()
    return out.round().clamp(0, 255).to(torch.uint8)


def add(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (x.float() + delta).round().clamp(0, 255).to(torch.uint8)


def _import_attacks():
    import importlib
    import pkgutil

    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")


_import_attacks()  # every module in this package registers its attacks on import
