"""What a tuning trial may read, and the Ray task functions that do the work of ``bdgrid tune``.

``TuneInputs`` is the whole of what a trial task receives for one cell: the backdoored model,
the defender's clean subset and the VALIDATION split (no reported-test data), which is how the
tuner keeps the test split out of every trial. ``final_cell`` is the one function that reads the
reported test split; only ``grid.tune.evaluate_on_test`` calls it, after tuning.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from grid.tune_spec import Cell

@dataclass
class TuneInputs:
    """Everything a trial task may read for one cell. Deliberately no reported-test data."""

    label: str
    key: str
    arch: str
    num_classes: int
    channels: int
    size: int
    state: dict  # backdoored model's state_dict (CPU)
    clean: Any  # defense.data.Data: the defender's clean subset of the training set
    val: Any  # Data: validation split of the clean test set
    val_bd: Any  # Data: backdoor test images whose source image is in the validation split
    val_bd_true: torch.Tensor
    val_idx: torch.Tensor  # indices into the original test set (for the leakage check)
    target: int
    seed: int
    before: dict  # the backdoored model's acc/asr/ra on the validation split

    def model(self) -> torch.nn.Module:
        from defense.models import create_model

        m = create_model(self.arch, num_classes=self.num_classes, in_channels=self.channels, image_size=self.size)
        m.load_state_dict(self.state)
        return m


def trial_config(cell: Cell, device: str = "cpu"):
    from defense.trial import TrialConfig

    return TrialConfig(**{k: v for k, v in cell.model_dump().items()}, device=device)


def build_inputs(cell: Cell, state: dict) -> TuneInputs:
    """Cut the validation inputs of a cell. The test set is loaded whole (the backdoor test
    set is built from it), but only its validation indices are copied into the result."""
    from defense.data.splits import defender_subset
    from defense.metrics import attack_metrics
    from defense.trial import load_splits, make_poisoned, split_backdoor

    cfg = trial_config(cell)
    train_set, test_set, val_idx, test_idx = load_splits(cfg)
    assert not set(val_idx.tolist()) & set(test_idx.tolist()), "validation and reported test split overlap"
    poisoned = make_poisoned(cfg, train_set, test_set)
    info = train_set.info
    inp = TuneInputs(cell.label(), cell.key(), cell.arch, info.num_classes, info.channels, info.size, state,
                     clean=defender_subset(train_set, cell.defender_ratio, cell.seed)[0],
                     val=test_set.subset(val_idx), val_bd=None, val_bd_true=None, val_idx=val_idx.clone(),
                     target=cell.target, seed=cell.seed, before={})
    model = inp.model().eval()
    inp.val_bd, inp.val_bd_true = split_backdoor(poisoned, model, val_idx)
    inp.before = attack_metrics(model, inp.val, inp.val_bd, inp.val_bd_true, cell.target)
    return inp


# ============================================================================ Ray tasks

def _setup_worker(imports: list[str], threads: float) -> None:
    """In a Ray worker: register the spec's extra modules, use as many torch threads as CPUs asked."""
    from grid.plugins import require_plugins

    require_plugins(imports)
    torch.set_num_threads(max(1, int(threads)))


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def train_cell(cell_dict: dict, imports: list[str], threads: float, device: str) -> tuple[dict, list]:
    """Train a cell's backdoored model; return its CPU state_dict and training history."""
    from defense.trial import load_splits, make_poisoned, train_backdoored

    _setup_worker(imports, threads)
    cfg = trial_config(Cell(**cell_dict), device=device)
    train_set, test_set, _, _ = load_splits(cfg)
    model, hist = train_backdoored(cfg, make_poisoned(cfg, train_set, test_set))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, hist


def prepare_cell(inp: TuneInputs, defense: str, params: dict, imports: list[str], threads: float, device: str):
    """The defense's expensive shared part (TSBD Stages 1a/1b) for one cell; CPU result."""
    from defense.methods import DEFENSES, DefenseContext
    from defense.train import pick_device

    _setup_worker(imports, threads)
    dev = pick_device(device)
    entry = DEFENSES.get(defense)
    ctx = DefenseContext(device=dev, seed=inp.seed)
    out = entry.meta["prepare"](inp.model().to(dev), inp.clean.to(dev), entry.make_params(params), ctx)
    return _to(out, "cpu")


def trial_cell(inp: TuneInputs, defense: str, params: dict, prepared, imports: list[str], threads: float,
               device: str) -> dict:
    """One trial on one cell: defend, then score on the validation split only."""
    from defense.methods import DefenseContext, run_defense
    from defense.metrics import attack_metrics, der
    from defense.train import pick_device

    _setup_worker(imports, threads)
    dev = pick_device(device)
    t0 = time.perf_counter()
    ctx = DefenseContext(device=dev, seed=inp.seed, prepared=_to(prepared, dev))
    res = run_defense(defense, inp.model().to(dev), inp.clean.to(dev), params, ctx)
    m = attack_metrics(res.model, inp.val.to(dev), inp.val_bd.to(dev), inp.val_bd_true.to(dev), inp.target)
    m["der"] = der(inp.before["acc"], inp.before["asr"], m["acc"], m["asr"])
    return {**m, "bd_acc": inp.before["acc"], "bd_asr": inp.before["asr"], "bd_ra": inp.before["ra"],
            "wall_s": time.perf_counter() - t0, "device": str(dev)}


def final_cell(cell_dict: dict, state: dict, defense: str, params: dict, prepared, imports: list[str],
               threads: float, device: str) -> dict:
    """Reporting only (after tuning): defend with ``params`` and score on the REPORTED test split."""
    from defense.data.splits import defender_subset
    from defense.methods import DefenseContext, run_defense
    from defense.metrics import der
    from defense.trial import evaluate, load_splits, make_poisoned

    _setup_worker(imports, threads)
    cell = Cell(**cell_dict)
    cfg = trial_config(cell, device=device)
    from defense.train import pick_device

    dev = pick_device(device)
    train_set, test_set, _, test_idx = load_splits(cfg)
    poisoned = make_poisoned(cfg, train_set, test_set)
    inp = TuneInputs(cell.label(), cell.key(), cell.arch, train_set.info.num_classes, train_set.info.channels,
                     train_set.info.size, state, None, None, None, None, None, cell.target, cell.seed, {})
    model = inp.model().to(dev)
    before = evaluate(model, test_set, poisoned, test_idx, cell.target, dev)
    t0 = time.perf_counter()
    clean = defender_subset(train_set, cell.defender_ratio, cell.seed)[0].to(dev)
    res = run_defense(defense, copy.deepcopy(model), clean, params,
                      DefenseContext(device=dev, seed=cell.seed, prepared=_to(prepared, dev)))
    after = evaluate(res.model, test_set, poisoned, test_idx, cell.target, dev)
    return {**after, "der": der(before["acc"], before["asr"], after["acc"], after["asr"]),
            "bd_acc": before["acc"], "bd_asr": before["asr"], "bd_ra": before["ra"],
            "wall_s": time.perf_counter() - t0, "device": str(dev)}


_REMOTE: dict[str, Any] = {}


def remote(fn: Callable, resources) -> Any:
    """``fn`` as a Ray task with the spec's resources (created once per function)."""
    import ray

    if fn.__name__ not in _REMOTE:
        _REMOTE[fn.__name__] = ray.remote(fn)
    # max_retries: re-run a task whose worker process died; exceptions are not retried (a
    # parameter that crashes the defense is a failed trial, not a flaky one).
    return _REMOTE[fn.__name__].options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=2)
