"""Defend and evaluate models bdgrid did not train, exactly as its own: one trial per call.

``import_checkpoint`` turns a plain state_dict (``checkpoints``) into the same ``Imported`` a
BackdoorBench record gives, its backdoor test set either rebuilt by bdgrid's attack of that name
and parameters (so the user's trigger must be bdgrid's) or read from a folder of images
``<folder>/<true label>/<test index>.png`` (BackdoorBench's ``bd_test_dataset`` layout).
``run_imported`` is ``defense.trial.run_trial`` without the attack training: the defender holds
the seeded 5% of the clean training set (``defender_subset``), the reported split is the one
``val_test_indices`` gives, metrics come from ``defense.trial.evaluate``.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from defense.attacks import Poisoned
from defense.data import Data
from defense.external.backdoorbench import Imported
from defense.external.checkpoints import load_checkpoint
from defense.external.safe_load import RecordProblem


def read_image_folder(folder: str | Path, info, target: int, where: str) -> tuple[Data, torch.Tensor, torch.Tensor]:
    """Backdoor test images ``<folder>/<true label>/<test index>.<png|jpg|...>`` -> (images with
    label ``target``, test indices, true labels), sorted by index."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise RecordProblem(f"{where}: backdoor_test folder {folder} not found")
    items = []
    for f in folder.glob("*/*"):
        if f.is_file() and f.parent.name.isdigit() and f.stem.isdigit():
            items.append((int(f.stem), int(f.parent.name), f))
    if not items:
        raise RecordProblem(f"{where}: no images named <true label>/<test index>.png under {folder}")
    xs = []
    for _, _, f in sorted(items):
        with Image.open(f) as im:
            a = np.asarray(im.convert("L" if info.channels == 1 else "RGB"), dtype=np.uint8)
        if a.shape[:2] != (info.size, info.size):
            raise RecordProblem(f"{where}: {f} is {a.shape[1]}x{a.shape[0]}, expected {info.size}x{info.size}")
        xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    items.sort()
    idx = torch.tensor([i for i, _, _ in items])
    true = torch.tensor([t for _, t, _ in items])
    return Data(torch.from_numpy(np.stack(xs)), torch.full((len(xs),), int(target)), info), idx, true


def import_checkpoint(path: str | Path, arch: str, dataset: str, attack: str, attack_params: dict | None = None,
                      pratio: float = 0.1, target: int = 0, seed: int = 0, data_root: str | Path | None = None,
                      dataset_params: dict | None = None, backdoor_test: str | Path | None = None) -> Imported:
    """A plain checkpoint as an ``Imported`` backdoored model (see the module docstring)."""
    from defense.data import load_dataset

    train, test = load_dataset(dataset, data_root, **(dataset_params or {}))
    return checkpoint_from_data(path, arch, dataset, attack, train, test, attack_params, pratio, target, seed,
                                backdoor_test)


def checkpoint_from_data(path: str | Path, arch: str, dataset: str, attack: str, train: Data, test: Data,
                         attack_params: dict | None = None, pratio: float = 0.1, target: int = 0, seed: int = 0,
                         backdoor_test: str | Path | None = None, resources=None) -> Imported:
    """``import_checkpoint`` over clean data already loaded (a grid's data stage); ``resources``:
    the attack-resource cache bdgrid's attack may need to rebuild the backdoor test set."""
    from defense.data import dataset_info
    from defense.trial import TrialConfig, default_resources, make_poisoned

    where = f"checkpoint {path}"
    model, key = load_checkpoint(path, arch, dataset)
    info = dataset_info(dataset)
    if backdoor_test is not None:
        bd, bd_idx, bd_true = read_image_folder(backdoor_test, info, target, where)
        if int(bd_idx.max()) >= len(test):
            raise RecordProblem(f"{where}: backdoor_test index {int(bd_idx.max())} is outside the test set "
                                f"({len(test)} images)")
        poisoned = Poisoned(train, torch.zeros(0, dtype=torch.long), bd, bd_idx, bd_true)
    else:
        cfg = TrialConfig(dataset=dataset, arch=arch, attack=attack, pratio=pratio, target=target, seed=seed,
                          attack_params=dict(attack_params or {}), device="cpu")
        poisoned = make_poisoned(cfg, train, test, resources=resources or default_resources())
        if poisoned.bd_test is None:
            raise RecordProblem(f"{where}: bdgrid's '{attack}' makes its backdoor test images with what it "
                                "trains alongside the model, which a checkpoint from elsewhere lacks: give "
                                "backdoor_test: a folder of your triggered test images")
    prov = {"source": "checkpoint", "record": str(Path(path).resolve()), "attack": attack, "pratio": pratio,
            "target": target, "seed": seed, "backdoor_test": str(backdoor_test) if backdoor_test else None}
    return Imported(model, arch, dataset, train, test, poisoned, target, key, prov)


def run_imported(imp: Imported, defense: str = "none", defense_params: dict | None = None, seed: int = 0,
                 defender_ratio: float = 0.05, val_ratio: float = 0.2, device="cpu") -> dict:
    """Defend an imported model and measure it before and after on the reported test split, as
    ``defense.trial.run_trial`` does for a model bdgrid trained (same keys in the result)."""
    from defense.data.splits import defender_subset, val_test_indices
    from defense.methods import DefenseContext, run_defense
    from defense.metrics import der
    from defense.train import pick_device
    from defense.trial import evaluate

    t0 = time.perf_counter()
    device = pick_device(device)
    _, test_idx = val_test_indices(len(imp.test), val_ratio, seed=0)
    before = evaluate(imp.model, imp.test, imp.poisoned, test_idx, imp.target, device)
    out = {"bd_acc": before["acc"], "bd_asr": before["asr"], "bd_ra": before["ra"]}
    diag = {}
    model = imp.model
    if defense == "none":
        after = before
    else:
        clean, _ = defender_subset(imp.train, defender_ratio, seed)
        res = run_defense(defense, copy.deepcopy(imp.model), clean.to(device), defense_params,
                          DefenseContext(device=device, seed=seed))
        model, diag = res.model, res.diagnostics
        after = evaluate(model, imp.test, imp.poisoned, test_idx, imp.target, device)
    out.update(after)
    out["der"] = der(before["acc"], before["asr"], after["acc"], after["asr"])
    out.update({"arch": imp.arch, "dataset": imp.dataset, "defense": defense, "seed": seed, "key": imp.key,
                "provenance": imp.provenance, "diagnostics": diag, "model": model,
                "wall_s": time.perf_counter() - t0, "device": str(device)})
    return out
