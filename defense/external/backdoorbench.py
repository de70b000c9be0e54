"""BackdoorBench attack records in and out of bdgrid.

The format, read from BackdoorBench's code (SCLBD/BackdoorBench, commit f02e353):

- ``utils/save_load_attack.py`` ``save_attack_result`` writes ``<record>/attack_result.pt``, a
  ``torch.save`` of the dict ``model_name``, ``num_classes``, ``model`` (a state_dict, maybe with
  ``module.`` prefixes), ``data_path``, ``img_size`` (H, W, C), ``clean_data`` (dataset name),
  ``bd_train`` and ``bd_test`` (dataset states or None) and any extra keyword arguments;
  ``save_defense_result`` writes ``defense_result.pt`` with ``model_name``, ``num_classes``, ``model``.
- ``utils/bd_dataset_v2.py``: a dataset state (``prepro_cls_DatasetBD_v2.retrieve_state``) is
  ``bd_data_container`` (``poisonedCLSDataContainer.retrieve_state``: ``save_folder_path``,
  ``data_dict``, ``save_file_format``), ``getitem_all``, ``getitem_all_switch``,
  ``original_index_array`` (numpy int array), ``poison_indicator`` (numpy array, 1 = poisoned) and
  ``save_folder_path``. Each poisoned image is a PNG at ``<save_folder_path>/<true label>/<index>.png``;
  ``data_dict[index] = {"path": ..., "other_info": [backdoor label, true label]}`` with the index a
  numpy integer (BadNets-style attacks iterate ``np.arange``) or a Python int (WaNet, Input-aware).
- ``attack/prototype.py`` ``prepare`` saves the run's arguments as ``<record>/info.pickle``
  (``torch.save(args.__dict__)``: ``attack``, ``pratio``, ``attack_target``, ``attack_label_trans``...).
- ``attack/badnet.py`` keeps only the poisoned test images (``bd_test_dataset.subset``); WaNet and
  Input-aware keep the whole test index with the non-target images poisoned. bdgrid's backdoor
  test set is in both cases the images with ``poison_indicator == 1`` among ``original_index_array``
  (BackdoorBench's own loader would also count WaNet's unpoisoned target-class images).

Reading never runs code from the record (``safe_load``), never opens a path stored in the record
(images are looked up inside the record folder by label and index) and measures nothing itself:
``evaluate_record`` uses ``defense.trial.evaluate``, the function bdgrid's own trials use.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from defense.attacks import Poisoned
from defense.data import Data
from defense.external import names
from defense.external.checkpoints import build_model, file_sha256
from defense.external.safe_load import RecordProblem, safe_torch_load

RECORD_FILE = "attack_result.pt"
DEFENSE_FILE = "defense_result.pt"
INFO_FILE = "info.pickle"
REQUIRED = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")


@dataclass
class Imported:
    """A backdoored model from a record, with everything bdgrid evaluates and defends it on."""

    model: torch.nn.Module
    arch: str  # bdgrid architecture
    dataset: str  # bdgrid dataset name
    train: Data  # clean training set (the defender's 5% is cut from it as for bdgrid's own models)
    test: Data  # clean test set
    poisoned: Poisoned  # bd_test / bd_idx / bd_true from the record's own images; train = clean
    target: int | None  # the backdoor label when all backdoor labels agree (all-to-one), else None
    key: str  # content key: sha256 over the record files the import reads
    provenance: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- reading


def record_dir_of(path: str | Path) -> Path:
    p = Path(path)
    return p.parent if p.name == RECORD_FILE else p


def record_key(record_dir: str | Path, bd_folder: str = "bd_test_dataset") -> str:
    """sha256 over the files an import reads: attack_result.pt, info.pickle (when present) and every
    file under the backdoor test folder, each with its path relative to the record."""
    d = record_dir_of(record_dir)
    files = [d / RECORD_FILE] + ([d / INFO_FILE] if (d / INFO_FILE).is_file() else [])
    if (d / bd_folder).is_dir():
        files += sorted(p for p in (d / bd_folder).rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(d)).encode() + b"\0")
        file_sha256(f, h)
    return h.hexdigest()


def read_record_dict(record_dir: str | Path) -> dict:
    """The dict in ``attack_result.pt``, loaded safely and checked for BackdoorBench's keys."""
    d = record_dir_of(record_dir)
    rec = safe_torch_load(d / RECORD_FILE, "BackdoorBench record")
    if not isinstance(rec, dict):
        raise RecordProblem(f"BackdoorBench record {d / RECORD_FILE}: expected a dict, got {type(rec).__name__}")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise RecordProblem(f"BackdoorBench record {d / RECORD_FILE}: missing keys {missing} "
                            "(not written by BackdoorBench's save_attack_result?)")
    return rec


def read_info(record_dir: Path) -> dict:
    """The attack's arguments from ``info.pickle``; {} (with a warning) when absent or refused."""
    p = record_dir / INFO_FILE
    if not p.is_file():
        return {}
    try:
        info = safe_torch_load(p, "BackdoorBench run arguments")
    except RecordProblem as e:
        warnings.warn(f"{e} -- its attack name and pratio are left out of the provenance")
        return {}
    return info if isinstance(info, dict) else {}


def resolve_names(rec: dict, where: str) -> tuple[str, str]:
    """(bdgrid arch, bdgrid dataset) for a record, or a RecordProblem naming the unknown name."""
    arch = names.arch_for_model_name(rec["model_name"])
    if arch is None:
        known = ", ".join(sorted(names.BB_TO_ARCH))
        raise RecordProblem(f"{where}: model_name '{rec['model_name']}' has no bdgrid architecture "
                            f"(bdgrid reads BackdoorBench's {known})")
    dataset = names.dataset_for_clean_data(rec["clean_data"])
    if dataset is None:
        raise RecordProblem(f"{where}: clean_data '{rec['clean_data']}' is not a dataset bdgrid has "
                            f"(bdgrid reads BackdoorBench's {', '.join(names.BB_DATASETS)})")
    return arch, dataset


def _bd_folder(state: dict, where: str) -> str:
    """The record-relative folder of the backdoor images: the last part of the stored path only."""
    stored = state.get("save_folder_path") or state.get("bd_data_container", {}).get("save_folder_path")
    if not stored:
        raise RecordProblem(f"{where}: bd_test keeps its images in memory (no save_folder_path); "
                            "bdgrid reads records whose images are files")
    name = Path(str(stored).replace("\\", "/")).name
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise RecordProblem(f"{where}: unusable backdoor image folder name {stored!r}")
    return name


def read_bd_test(record_dir: Path, state: dict, info, where: str) -> tuple[Data, torch.Tensor, torch.Tensor]:
    """(backdoor images with their backdoor labels, original test indices, true labels)."""
    from PIL import Image

    if "bd_data_container" not in state and "x" in state:
        raise RecordProblem(f"{where}: a BackdoorBench 1.x record (images inside attack_result.pt, "
                            "utils/bd_dataset.py); bdgrid reads the 2.x layout (bd_test_dataset/ image files)")
    try:
        container = state["bd_data_container"]
        data_dict = container["data_dict"]
        fmt = container.get("save_file_format", ".png")
        order = np.asarray(state["original_index_array"]).astype(np.int64).ravel()
        flag = np.asarray(state["poison_indicator"]).ravel()
        entries = {int(k): (int(v["other_info"][0]), int(v["other_info"][1])) for k, v in data_dict.items()}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise RecordProblem(f"{where}: bd_test is not a BackdoorBench dataset state ({type(e).__name__}: {e})") from None
    if not re.fullmatch(r"\.\w+", str(fmt)):
        raise RecordProblem(f"{where}: unusable image file format {fmt!r}")
    folder = record_dir / _bd_folder(state, where)
    idx = [int(i) for i in order if 0 <= i < len(flag) and flag[i] == 1]
    mode = "L" if info.channels == 1 else "RGB"
    xs, bd_y, true_y = [], [], []
    for i in idx:
        if i not in entries:
            raise RecordProblem(f"{where}: test image {i} is marked poisoned but has no entry in data_dict")
        bd_label, label = entries[i]
        f = folder / str(label) / f"{i}{fmt}"
        if not f.is_file():
            raise RecordProblem(f"{where}: backdoor image missing: {f}")
        with Image.open(f) as im:
            a = np.asarray(im.convert(mode), dtype=np.uint8)
        if a.shape[:2] != (info.size, info.size):
            raise RecordProblem(f"{where}: {f} is {a.shape[1]}x{a.shape[0]}, {info.name} images are "
                                f"{info.size}x{info.size}")
        xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        bd_y.append(bd_label)
        true_y.append(label)
    x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, info.channels, info.size, info.size, dtype=torch.uint8)
    return Data(x, torch.tensor(bd_y, dtype=torch.long), info), torch.tensor(idx, dtype=torch.long), \
        torch.tensor(true_y, dtype=torch.long)


def load_record(record_dir: str | Path, data_root: str | Path | None = None,
                dataset_params: dict | None = None) -> Imported:
    """A BackdoorBench record (folder or its ``attack_result.pt``) as an ``Imported`` model.

    The clean data are bdgrid's loader for the record's ``clean_data`` under ``data_root``
    (``dataset_params`` go to the loader, e.g. ``{"download": False}``; a record written by bdgrid
    carries its own). Raises ``RecordProblem`` for anything unusable, naming the record."""
    from defense.data import load_dataset
    from defense.data.files import DatasetMissing

    d = record_dir_of(record_dir)
    where = f"BackdoorBench record {d}"
    rec = read_record_dict(d)
    arch, dataset = resolve_names(rec, where)
    extra = rec.get("bdgrid") if isinstance(rec.get("bdgrid"), dict) else {}
    _check_shape(rec, dataset, where)
    params = {**extra.get("dataset_params", {}), **(dataset_params or {})}
    try:
        train, test = load_dataset(dataset, data_root, **params)
    except DatasetMissing as e:
        raise RecordProblem(f"{where} needs its clean data ({rec['clean_data']}): {e}") from None
    return record_from_data(d, train, test, rec, where=f"{where} (clean data under {data_root})")


def _check_shape(rec: dict, dataset: str, where: str) -> None:
    from defense.data import dataset_info

    info = dataset_info(dataset)
    size = tuple(int(v) for v in rec["img_size"])[:2] if rec["img_size"] is not None else (info.size, info.size)
    if size != (info.size, info.size) or int(rec["num_classes"]) != info.num_classes:
        raise RecordProblem(f"{where}: img_size {rec['img_size']} / num_classes {rec['num_classes']} do not match "
                            f"bdgrid's {dataset} ({info.size}x{info.size}, {info.num_classes} classes)")


def record_from_data(record_dir: str | Path, train: Data, test: Data, rec: dict | None = None,
                     where: str | None = None) -> Imported:
    """A record's model and backdoor test set over clean data already loaded (``train``/``test``:
    the record's dataset, as a grid's data stage loads it). ``where`` names the data in messages."""
    from defense.data import dataset_info

    d = record_dir_of(record_dir)
    name = f"BackdoorBench record {d}"
    rec = read_record_dict(d) if rec is None else rec
    arch, dataset = resolve_names(rec, name)
    _check_shape(rec, dataset, name)
    info = dataset_info(dataset)
    model = build_model(arch, dataset, rec["model"], name, num_classes=int(rec["num_classes"]))
    state = rec["bd_test"]
    if not isinstance(state, dict):
        raise RecordProblem(f"{name}: bd_test is {type(state).__name__}, expected a dataset state")
    bd, bd_idx, bd_true = read_bd_test(d, state, info, name)
    if len(bd_idx) and int(bd_idx.max()) >= len(test):
        raise RecordProblem(f"{where or name}: backdoor image index {int(bd_idx.max())} is outside the clean test set "
                            f"({len(test)} images of {dataset}): not the record's dataset?")
    targets = set(bd.y.tolist())
    target = targets.pop() if len(targets) == 1 else None
    poisoned = Poisoned(train=train, poison_idx=torch.zeros(0, dtype=torch.long), bd_test=bd, bd_idx=bd_idx,
                        bd_true=bd_true, info={"source": "backdoorbench"})
    return Imported(model, arch, dataset, train, test, poisoned, target, record_key(d, _bd_folder(state, name)),
                    provenance(d, rec, read_info(d), target))


def provenance(record_dir: Path, rec: dict, info: dict, target: int | None) -> dict:
    """Where an imported model came from, for result rows (JSON-able)."""
    bb_attack = info.get("attack", (rec.get("bdgrid") or {}).get("attack_bb"))
    out = {"source": "backdoorbench", "record": str(record_dir.resolve()), "model_name": rec["model_name"],
           "clean_data": rec["clean_data"], "attack_bb": bb_attack,
           "attack": names.BB_ATTACKS.get(bb_attack, bb_attack), "pratio": info.get("pratio"),
           "target": target, "label_trans": info.get("attack_label_trans"), "seed": info.get("random_seed")}
    return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in out.items()}


def find_records(pattern: str | Path) -> list[Path]:
    """Record folders for a spec entry: a folder, or a glob (``/data/record/*_0_1``) of folders each
    holding ``attack_result.pt``, sorted; a RecordProblem when nothing matches."""
    import glob as _glob

    pattern = str(pattern)
    hits = sorted(Path(p) for p in _glob.glob(pattern)) if _glob.has_magic(pattern) else [Path(pattern)]
    found = [record_dir_of(p) for p in hits if (record_dir_of(p) / RECORD_FILE).is_file()]
    if not found:
        raise RecordProblem(f"backdoorbench: {pattern}: no record folder with {RECORD_FILE} found")
    return found


def inspect_record(record_dir: str | Path) -> dict:
    """What a spec needs before any compute: arch, dataset, content key and provenance, from the
    record's files only (no clean data, no images decoded). RecordProblem when unusable."""
    d = record_dir_of(record_dir)
    rec = read_record_dict(d)
    arch, dataset = resolve_names(rec, f"BackdoorBench record {d}")
    _check_shape(rec, dataset, f"BackdoorBench record {d}")
    state = rec["bd_test"] if isinstance(rec["bd_test"], dict) else {}
    folder = _bd_folder(state, f"BackdoorBench record {d}")
    info = read_info(d)
    targets = {int(v["other_info"][0]) for v in state.get("bd_data_container", {}).get("data_dict", {}).values()}
    target = targets.pop() if len(targets) == 1 else None
    extra = rec.get("bdgrid") if isinstance(rec.get("bdgrid"), dict) else {}
    return {"arch": arch, "dataset": dataset, "key": record_key(d, folder), "provenance": provenance(d, rec, info, target),
            "bd_folder": folder, "dataset_params": dict(extra.get("dataset_params") or {})}


def load_defense_result(path: str | Path, dataset: str) -> torch.nn.Module:
    """A purified model from BackdoorBench's ``defense_result.pt`` (folder or file) for bdgrid's
    ``dataset``."""
    p = Path(path)
    p = p / DEFENSE_FILE if p.is_dir() else p
    rec = safe_torch_load(p, "BackdoorBench defense result")
    where = f"BackdoorBench defense result {p}"
    if not isinstance(rec, dict) or not {"model_name", "num_classes", "model"} <= set(rec):
        raise RecordProblem(f"{where}: expected a dict with model_name, num_classes, model")
    arch = names.arch_for_model_name(rec["model_name"])
    if arch is None:
        raise RecordProblem(f"{where}: model_name '{rec['model_name']}' has no bdgrid architecture")
    return build_model(arch, dataset, rec["model"], where, num_classes=int(rec["num_classes"]))


def evaluate_record(imp: Imported, model: torch.nn.Module | None = None, idx: torch.Tensor | None = None,
                    device="cpu") -> dict:
    """ACC / ASR / RA of ``model`` (default: the imported one) on the record's test sets, restricted
    to the clean test indices ``idx`` (default all), with bdgrid's ``defense.trial.evaluate``."""
    from defense.trial import evaluate

    idx = torch.arange(len(imp.test)) if idx is None else idx
    return evaluate(model if model is not None else imp.model, imp.test, imp.poisoned, idx, imp.target, device)


# ---------------------------------------------------------------------------------- writing


def _to_pil(img: torch.Tensor):
    from PIL import Image

    a = img.detach().cpu().numpy()
    return Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")


def dataset_state(folder: Path, stored_folder: str, n: int, images: Data, idx: torch.Tensor,
                  true: torch.Tensor) -> dict:
    """Write ``images`` as ``folder/<true label>/<index>.png`` and return the state dict
    ``prepro_cls_DatasetBD_v2.retrieve_state`` gives for a dataset of ``n`` images of which those
    at ``idx`` are poisoned and kept (``subset``), as BadNets writes its backdoor test set."""
    idx_np = np.asarray(idx.cpu(), dtype=np.int64)
    indicator = np.zeros(n)  # float64, as np.zeros in prepro_cls_DatasetBD_v2
    indicator[idx_np] = 1
    data_dict = {}
    for j, i in enumerate(idx_np):
        label, bd_label = int(true[j]), int(images.y[j])
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        _to_pil(images.x[j]).save(folder / str(label) / f"{i}.png")
        data_dict[np.int64(i)] = {"path": f"{stored_folder}/{label}/{i}.png", "other_info": [bd_label, label]}
    container = {"save_folder_path": stored_folder, "data_dict": data_dict, "save_file_format": ".png"}
    return {"bd_data_container": container, "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": idx_np.copy(), "poison_indicator": indicator, "save_folder_path": stored_folder}


def export_record(model: torch.nn.Module, arch: str, dataset: str, bd_test: Data, bd_idx: torch.Tensor,
                  bd_true: torch.Tensor, n_test: int, dest: str | Path, *, attack: str | None = None,
                  pratio: float | None = None, target: int | None = None, seed: int | None = None,
                  dataset_params: dict | None = None, bd_train: tuple[Data, torch.Tensor, torch.Tensor] | None = None,
                  n_train: int | None = None) -> Path:
    """Write a bdgrid backdoored model as a BackdoorBench record in ``dest`` (created).

    ``bd_test``/``bd_idx``/``bd_true``: the backdoor test images (labels = backdoor labels), their
    indices in the clean test set of ``n_test`` images, their true labels (``Poisoned.backdoor_test``).
    ``bd_train`` (optional): (poisoned training images, their indices, true labels) with ``n_train``.
    Writes ``attack_result.pt`` (the dict ``save_attack_result`` writes, plus a ``bdgrid`` entry with
    bdgrid's own names), ``info.pickle`` (BackdoorBench's run arguments) and the PNG folders."""
    dest = Path(dest)
    if (dest / RECORD_FILE).exists():
        raise RecordProblem(f"{dest / RECORD_FILE} exists; not overwriting a record")
    dest.mkdir(parents=True, exist_ok=True)
    from defense.data import dataset_info

    info = dataset_info(dataset)
    model_name = names.model_name_for_arch(arch)
    if model_name.startswith(names.BDGRID_PREFIX):
        warnings.warn(f"BackdoorBench has no architecture like bdgrid's '{arch}': the record says model_name "
                      f"'{model_name}', which bdgrid reads back but BackdoorBench's scripts cannot build")
    clean = names.dataset_to_bb(dataset)
    bb_attack = {v: k for k, v in names.BB_ATTACKS.items()}.get(attack, attack)
    stored = lambda sub: f"./record/{dest.name}/{sub}"  # noqa: E731  (how BackdoorBench spells its paths)
    train_state = None
    if bd_train is not None:
        x, i, t = bd_train
        train_state = dataset_state(dest / "bd_train_dataset", stored("bd_train_dataset"), int(n_train), x, i, t)
    rec = {
        "model_name": model_name, "num_classes": info.num_classes,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "data_path": f"./data/{clean}", "img_size": (info.size, info.size, info.channels), "clean_data": clean,
        "bd_train": train_state,
        "bd_test": dataset_state(dest / "bd_test_dataset", stored("bd_test_dataset"), n_test, bd_test, bd_idx, bd_true),
        "bdgrid": {"arch": arch, "dataset": dataset, "dataset_params": dict(dataset_params or {}), "attack": attack,
                   "attack_bb": bb_attack, "pratio": pratio, "target": target, "seed": seed},
    }
    args = {"attack": bb_attack, "pratio": pratio, "attack_target": target, "attack_label_trans": "all2one",
            "dataset": clean, "model": model_name, "num_classes": info.num_classes, "random_seed": seed,
            "img_size": (info.size, info.size, info.channels), "dataset_path": f"./data/{clean}",
            "save_path": f"./record/{dest.name}"}
    torch.save(args, dest / INFO_FILE)
    torch.save(rec, dest / RECORD_FILE)
    return dest


def export_defense_result(model: torch.nn.Module, arch: str, dataset: str, dest: str | Path) -> Path:
    """A purified model as BackdoorBench's ``defense_result.pt`` in folder ``dest`` (BackdoorBench
    puts it in ``record/<attack>/defense/<defense>/``); returns the file."""
    from defense.data import dataset_info

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rec = {"model_name": names.model_name_for_arch(arch), "num_classes": dataset_info(dataset).num_classes,
           "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    torch.save(rec, dest / DEFENSE_FILE)
    return dest / DEFENSE_FILE
