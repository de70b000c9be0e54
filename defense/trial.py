"""One trial as plain function calls: data -> poison -> train backdoored model -> defend -> evaluate.

The grid runner calls the same functions stage by stage (and caches their outputs); a notebook
or a test calls ``run_trial`` in one go.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from defense.attacks import ATTACKS, AttackContext, Poisoned
from defense.data import Data, load_dataset
from defense.data.splits import defender_subset, val_test_indices
from defense.methods import DefenseContext, run_defense
from defense.metrics import attack_metrics, der
from defense.models import create_model
from defense.train import get_recipe, pick_device, train


@dataclass
class TrialConfig:
    dataset: str = "synthetic"
    arch: str = "tiny_cnn"
    attack: str = "badnets"
    pratio: float = 0.1
    target: int = 0
    seed: int = 0
    defense: str = "none"
    attack_params: dict = field(default_factory=dict)
    defense_params: dict = field(default_factory=dict)
    dataset_params: dict = field(default_factory=dict)
    data_root: str | None = None
    recipe: str = "fast"
    epochs: int | None = None  # override the recipe's epochs
    defender_ratio: float = 0.05  # share of the clean training set the defender holds
    val_ratio: float = 0.2  # share of the test set held out for tuning; the rest is reported
    device: str = "auto"
    progress: bool = False


@dataclass
class Splits:
    """Everything a trial evaluates on, cut once from the clean data."""

    train: Data
    test: Data  # reported test split
    val: Data  # validation split (tuning only)
    test_idx: torch.Tensor
    val_idx: torch.Tensor


def load_splits(cfg: TrialConfig) -> tuple[Data, Data, torch.Tensor, torch.Tensor]:
    train_set, test_set = load_dataset(cfg.dataset, cfg.data_root, **cfg.dataset_params)
    val_idx, test_idx = val_test_indices(len(test_set), cfg.val_ratio, seed=0)
    return train_set, test_set, val_idx, test_idx


def make_poisoned(cfg: TrialConfig, train_set: Data, test_set: Data, resources=None) -> Poisoned:
    ctx = AttackContext(target=cfg.target, pratio=cfg.pratio, seed=cfg.seed, arch=cfg.arch,
                        device=pick_device(cfg.device), resources=resources,
                        recipe=get_recipe(cfg.recipe, cfg.dataset), progress=cfg.progress)
    entry = ATTACKS.get(cfg.attack)
    return entry.fn(train_set, test_set, entry.make_params(cfg.attack_params), ctx)


def train_backdoored(cfg: TrialConfig, poisoned: Poisoned) -> tuple[torch.nn.Module, list[dict]]:
    info = poisoned.train.info
    torch.manual_seed(cfg.seed)  # before create_model: the initial weights come from the seed, not the process
    model = create_model(cfg.arch, num_classes=info.num_classes, in_channels=info.channels, image_size=info.size)
    recipe = get_recipe(cfg.recipe, cfg.dataset)  # paper: BackdoorBench's epochs for the dataset
    hist = train(model, poisoned.train, recipe, seed=cfg.seed, device=pick_device(cfg.device), hook=poisoned.hook,
                 epochs=cfg.epochs, progress=cfg.progress, desc=f"attack {cfg.attack}")
    return model, hist


def split_backdoor(poisoned: Poisoned, model, idx: torch.Tensor) -> tuple[Data, torch.Tensor]:
    """Backdoor images (and true labels) whose source test image lies in ``idx``."""
    bd, bd_idx, bd_true = poisoned.backdoor_test(model)
    keep = torch.isin(bd_idx.cpu(), idx.cpu())
    keep_i = torch.nonzero(keep).flatten()
    return bd.subset(keep_i.to(bd.device)), bd_true[keep_i.to(bd_true.device)]


def evaluate(model, test_set: Data, poisoned: Poisoned, idx: torch.Tensor, target: int, device) -> dict:
    """ACC/ASR/RA on the part of the test set given by ``idx`` (the reported split or the val split)."""
    device = pick_device(device)
    model.to(device)
    bd, bd_true = split_backdoor(poisoned, model, idx)
    return attack_metrics(model, test_set.subset(idx).to(device), bd.to(device), bd_true.to(device), target)


def default_resources():
    """The resource cache a lone trial uses, so repeated trials reuse generated attack resources
    (clean reference models, generators, encoders): ``$BDGRID_CACHE`` or ``~/.cache/bdgrid``."""
    import os
    from pathlib import Path

    from defense.resources import ResourceCache

    root = os.environ.get("BDGRID_CACHE") or Path.home() / ".cache" / "bdgrid"
    return ResourceCache(Path(root) / "resources")


def _step(cfg: TrialConfig, what: str) -> None:
    # the steps between the bars take seconds (data generation, poisoning, evaluation); a line
    # each keeps the terminal from going quiet (issue 15). stderr: --json owns stdout.
    if cfg.progress:
        print(f"trial: {what}", file=sys.stderr, flush=True)


def run_trial(cfg: TrialConfig) -> dict[str, Any]:
    """Train the backdoored model, apply the defense, return before/after metrics on the reported split."""
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    _step(cfg, f"loading {cfg.dataset}")
    train_set, test_set, val_idx, test_idx = load_splits(cfg)
    _step(cfg, f"poisoning with {cfg.attack} at {cfg.pratio:g}")
    poisoned = make_poisoned(cfg, train_set, test_set, resources=default_resources())
    model, hist = train_backdoored(cfg, poisoned)
    _step(cfg, "evaluating the backdoored model")
    before = evaluate(model, test_set, poisoned, test_idx, cfg.target, device)
    out = {"bd_acc": before["acc"], "bd_asr": before["asr"], "bd_ra": before["ra"]}
    if cfg.defense == "none":
        after, diag = before, {}
    else:
        clean, _ = defender_subset(train_set, cfg.defender_ratio, cfg.seed)
        res = run_defense(cfg.defense, copy.deepcopy(model), clean.to(device), cfg.defense_params,
                          DefenseContext(device=device, seed=cfg.seed, progress=cfg.progress))
        after, diag = evaluate(res.model, test_set, poisoned, test_idx, cfg.target, device), res.diagnostics
    out.update(after)
    out["der"] = der(before["acc"], before["asr"], after["acc"], after["asr"])
    out.update({"config": asdict(cfg), "train_history": hist, "diagnostics": diag,
                "n_poison": int(len(poisoned.poison_idx)), "wall_s": time.perf_counter() - t0, "device": str(device)})
    return out
