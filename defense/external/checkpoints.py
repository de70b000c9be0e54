"""Plain ``state_dict`` checkpoints trained anywhere, loaded into a bdgrid architecture.

The file is read with ``torch.load(weights_only=True)`` (``safe_load``). A checkpoint may be the
bare state_dict or a dict holding it under a usual key (``state_dict``, ``model_state_dict``,
``model``, ``net``). ``module.`` prefixes (``torch.nn.DataParallel``) are stripped, as
BackdoorBench's ``load_attack_result`` does (``utils/save_load_attack.py``). When the key names
still differ but the tensors line up one to one in order with the same shapes, they are renamed by
position, which is BackdoorBench's own fallback in the same function (it checks only the count;
bdgrid also requires every shape to match). Anything else is a ``RecordProblem`` listing the keys.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from defense.external.safe_load import RecordProblem, safe_torch_load

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def file_sha256(path: str | Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def strip_module_prefix(sd: dict) -> dict:
    """``module.conv1.weight`` -> ``conv1.weight`` (one or more DataParallel wrappers)."""
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def match_state_dict(model: torch.nn.Module, sd: dict, where: str) -> dict:
    """``sd`` renamed onto ``model``'s keys (exact, or by position when every shape agrees)."""
    sd = strip_module_prefix(sd)
    own = model.state_dict()
    if set(sd) == set(own):
        bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
        if not bad:
            return sd
        k = bad[0]
        raise RecordProblem(f"{where}: {len(bad)} tensors have the wrong shape for this architecture, e.g. "
                            f"'{k}' is {tuple(sd[k].shape)}, expected {tuple(own[k].shape)}")
    theirs = list(sd.items())
    if len(theirs) == len(own) and all(tuple(v.shape) == tuple(o.shape) for (_, v), o in zip(theirs, own.values())):
        return {k: v for k, (_, v) in zip(own, theirs)}
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    raise RecordProblem(f"{where}: the weights do not fit this architecture: {len(missing)} missing keys "
                        f"(e.g. {missing[:3]}), {len(extra)} unexpected keys (e.g. {extra[:3]})")


def unwrap_state_dict(obj, where: str) -> dict:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for k in WRAPPER_KEYS:
            if isinstance(obj.get(k), dict):
                return unwrap_state_dict(obj[k], where)
    raise RecordProblem(f"{where}: no state_dict found (expected a dict of tensors, or one under "
                        f"{', '.join(repr(k) for k in WRAPPER_KEYS)})")


def build_model(arch: str, dataset: str, state_dict: dict, where: str, num_classes: int | None = None):
    """bdgrid's ``arch`` for ``dataset``'s image shape, holding ``state_dict``; eval mode, CPU."""
    from defense.data import dataset_info
    from defense.models import MODELS, create_model
    from defense.registry import did_you_mean

    if arch not in MODELS:
        raise RecordProblem(f"{where}: unknown architecture '{arch}'{did_you_mean(arch, MODELS.names())}")
    info = dataset_info(dataset)
    model = create_model(arch, num_classes=num_classes or info.num_classes, in_channels=info.channels,
                         image_size=info.size)
    model.load_state_dict(match_state_dict(model, state_dict, where))
    return model.eval()


def load_checkpoint(path: str | Path, arch: str, dataset: str) -> tuple[torch.nn.Module, str]:
    """A state_dict trained anywhere as bdgrid's ``arch`` for ``dataset``; returns (model, sha256 of
    the file), the hash being the content key of the imported model."""
    from defense.data import DATASETS
    from defense.registry import did_you_mean

    if dataset not in DATASETS:
        raise RecordProblem(f"checkpoint {path}: unknown dataset '{dataset}'{did_you_mean(dataset, DATASETS.names())}")
    obj = safe_torch_load(path, "checkpoint")
    model = build_model(arch, dataset, unwrap_state_dict(obj, f"checkpoint {path}"), f"checkpoint {path}")
    return model, file_sha256(path)
