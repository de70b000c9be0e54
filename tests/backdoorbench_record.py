"""Write BackdoorBench attack records exactly as BackdoorBench writes them, for the import tests.

What is written follows SCLBD/BackdoorBench (commit f02e353), independent of bdgrid's own
exporter so that the reader is tested against the format, not against itself:

- ``<root>/data/cifar10/cifar-10-batches-py/``: CIFAR-10 "python version" batches (BackdoorBench's
  ``data_path`` is ``./data/cifar10`` and torchvision reads that layout under it); the images are
  bdgrid's synthetic data, so a model can learn them.
- ``<root>/record/<name>/attack_result.pt``: ``torch.save`` of the dict ``save_attack_result``
  (``utils/save_load_attack.py``) builds: model_name, num_classes, model (state_dict), data_path,
  img_size, clean_data, bd_train / bd_test = ``prepro_cls_DatasetBD_v2.retrieve_state()``
  (``utils/bd_dataset_v2.py``).
- ``<root>/record/<name>/bd_{train,test}_dataset/<true label>/<index>.png``: the poisoned images
  (``poisonedCLSDataContainer.setitem``), and ``info.pickle`` (``attack/prototype.py``: the args).

Two attacks, in the two ways BackdoorBench builds backdoor test sets:
- ``badnet`` (``attack/badnet.py``): poison indicator from ``generate_poison_index_from_label_transform``
  (float64 one-hot), ``prepro_backdoor`` iterates ``np.arange`` so the ``data_dict`` keys are numpy
  int64, then ``bd_test_dataset.subset(np.where(test_poison_index == 1)[0])``. A 3x3 white patch.
- ``wanet`` (``attack/wanet.py``): a dataset over the whole test set, ``set_one_bd_sample`` with
  Python int indices for the non-target images only, no subset. A fixed smooth warp stands in for
  WaNet's grid (the reader does not care what the trigger is). Its state_dict is saved through
  ``torch.nn.DataParallel`` (``module.`` prefixes), as multi-GPU BackdoorBench runs save it.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TARGET = 0


def write_cifar10(root: Path, xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> Path:
    """CIFAR-10 python batches (five training batches, one test batch) under ``root``."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(xtr)), 5)
    for b, (name, x, y) in enumerate([(f"data_batch_{i + 1}", xtr[p], ytr[p]) for i, p in enumerate(parts)]
                                     + [("test_batch", xte, yte)]):
        batch = {"batch_label": name, "labels": [int(v) for v in y], "data": x.reshape(len(x), 3072),
                 "filenames": [f"{name}_{i}.png" for i in range(len(x))]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


def badnet_trigger(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[:, -4:-1, -4:-1] = 255  # (C, H, W): a white 3x3 patch near the bottom-right corner
    return y


def warp_trigger(x: np.ndarray) -> np.ndarray:
    """A fixed smooth warp: every row shifted by a sine of its height (integer pixels)."""
    y = np.empty_like(x)
    for r in range(x.shape[1]):
        y[:, r] = np.roll(x[:, r], int(round(2 * np.sin(r / 32 * 2 * np.pi))), axis=-1)
    return y


def _state(save_folder: str, folder: Path, n: int, x: np.ndarray, y: np.ndarray, poison: np.ndarray, trigger,
           numpy_keys: bool, subset: bool) -> dict:
    """prepro_cls_DatasetBD_v2.retrieve_state() of a dataset of ``n`` images, ``poison`` one-hot."""
    indicator = np.zeros(n) if not numpy_keys else poison.astype(np.float64)
    data_dict = {}
    for i in (np.arange(n) if numpy_keys else range(n)):  # prepro_backdoor iterates original_index_array
        if poison[int(i)] != 1:
            continue
        label = int(y[int(i)])
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        path = f"{save_folder}/{label}/{i}.png"
        Image.fromarray(trigger(x[int(i)]).transpose(1, 2, 0)).save(folder / str(label) / f"{i}.png")
        data_dict[i] = {"path": path, "other_info": [TARGET, label]}  # (bd_label, original label)
        indicator[int(i)] = 1
    order = np.arange(n)
    if subset:
        order = order[np.where(indicator == 1)[0]]
    return {"bd_data_container": {"save_folder_path": save_folder, "data_dict": data_dict, "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": order,
            "poison_indicator": indicator, "save_folder_path": save_folder}


def write_record(root: Path, attack: str, model: torch.nn.Module, xtr, ytr, xte, yte, pratio: float = 0.1,
                 model_name: str = "preactresnet18", seed: int = 0) -> Path:
    """``<root>/record/<attack>_0_1`` as BackdoorBench's ``attack/<attack>.py`` leaves it."""
    name = f"{attack}_0_1"
    rec = root / "record" / name
    rec.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train_poison = np.zeros(len(ytr))
    train_poison[rng.choice(np.where(ytr != TARGET)[0], round(pratio * len(ytr)), replace=False)] = 1
    test_poison = (yte != TARGET).astype(np.float64)
    badnet = attack == "badnet"
    trigger = badnet_trigger if badnet else warp_trigger
    args = {"attack": attack, "attack_label_trans": "all2one", "attack_target": TARGET, "pratio": pratio,
            "dataset": "cifar10", "dataset_path": "./data/cifar10", "model": model_name, "num_classes": 10,
            "img_size": (32, 32, 3), "random_seed": seed, "save_path": f"./record/{name}",
            "terminal_info": ["./attack/" + attack + ".py", "--save_folder_name", name]}
    torch.save(args, rec / "info.pickle")
    state = model.state_dict() if badnet else torch.nn.DataParallel(model).state_dict()
    torch.save({
        "model_name": model_name, "num_classes": 10, "model": state, "data_path": "./data/cifar10",
        "img_size": (32, 32, 3), "clean_data": "cifar10",
        "bd_train": _state(f"./record/{name}/bd_train_dataset", rec / "bd_train_dataset", len(ytr), xtr, ytr,
                           train_poison, trigger, numpy_keys=badnet, subset=False),
        "bd_test": _state(f"./record/{name}/bd_test_dataset", rec / "bd_test_dataset", len(yte), xte, yte,
                          test_poison, trigger, numpy_keys=badnet, subset=badnet),
    }, rec / "attack_result.pt")
    return rec


def build(root: Path, n_train: int = 400, n_test: int = 60, models: dict | None = None) -> dict:
    """CIFAR-format clean data and a BadNet and a WaNet record under ``root``; returns their paths
    and the arrays. ``models``: attack -> nn.Module (default: seeded untrained PreAct-ResNet18s)."""
    from defense.data import load_dataset
    from defense.models import create_model

    train, test = load_dataset("synthetic", n_train=n_train, n_test=n_test)
    xtr, ytr, xte, yte = (t.numpy() for t in (train.x, train.y, test.x, test.y))
    data_root = write_cifar10(root / "data" / "cifar10", xtr, ytr, xte, yte)
    out = {"data_root": data_root, "xte": xte, "yte": yte}
    for i, attack in enumerate(("badnet", "wanet")):
        torch.manual_seed(i)
        model = (models or {}).get(attack) or create_model("preact_resnet18")
        out[attack] = write_record(root, attack, model, xtr, ytr, xte, yte)
    return out
