"""Attack resources (clean reference models, generators, encoders, perturbations, optimised
triggers): computed by bdgrid itself, cached by content key, never downloaded.

A resource is a ``dict[str, Tensor]`` that is a pure function of ``(kind, config)`` and the
code that computes it. Its key is the sha256 of the canonical JSON of ``(kind, config,
version)``; bump an attack module's resource ``version`` when its compute code changes, so
old entries are not reused.

On disk (``ResourceCache(root)``): ``<root>/<kind>/<key>.pt`` written with ``torch.save`` to a
temporary name and moved into place with ``os.replace`` (atomic on POSIX), with the sha256 of
its bytes in ``<key>.sha256`` beside it. Reads check the checksum and load with
``torch.load(weights_only=True)``; a missing, corrupt or unreadable entry is recomputed, not
trusted. Two workers computing the same key at once both write complete files and the last
rename wins; if they disagree (non-deterministic kernels), the checksum check on the next read
catches a mismatched pair and that entry is recomputed.

The grid runner points ``root`` at its artifact store and names resource stages by
``resource_key(kind, config, version)``; ``AttackContext.resources`` carries a cache, or None to
compute every time.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

import torch

Tensors = dict[str, torch.Tensor]


def _canonical(obj: Any) -> Any:
    """JSON-able canonical form: dataclasses as dicts, tuples as lists, keys sorted by json.dumps."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return obj  # keep 1.0 as 1.0: json writes it so, distinct from 1
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def resource_key(kind: str, config: dict, version: str = "1") -> str:
    """Content key of a resource: sha256 of canonical JSON of (kind, config, code version)."""
    blob = json.dumps({"kind": kind, "config": _canonical(config), "version": str(version)},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def data_fingerprint(data) -> str:
    """Identity of a ``Data`` by content (images, labels, dataset name): resources computed from
    a dataset are keyed by what is in it, not by where it came from."""
    h = hashlib.sha256()
    h.update(data.info.name.encode())
    h.update(str(tuple(data.x.shape)).encode())
    h.update(data.x.detach().cpu().contiguous().numpy().tobytes())
    h.update(data.y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class ResourceCache:
    """Local directory of resources addressed by content key. See the module docstring."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.computed: list[str] = []  # keys computed by this instance (for logs and tests)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    def load(self, kind: str, key: str) -> Tensors | None:
        """The stored resource, or None when it is missing or fails its checksum."""
        p = self.path(kind, key)
        s = p.with_suffix(".sha256")
        try:
            blob = p.read_bytes()
            want = s.read_text().strip()
        except OSError:
            return None
        if hashlib.sha256(blob).hexdigest() != want:
            return None
        try:
            out = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception:  # truncated or foreign file with a matching checksum: recompute
            return None
        return out if isinstance(out, dict) else None

    def save(self, kind: str, key: str, tensors: Tensors) -> Path:
        buf = io.BytesIO()
        torch.save({k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in tensors.items()}, buf)
        blob = buf.getvalue()
        p = self.path(kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(p, blob)
        _atomic_write(p.with_suffix(".sha256"), hashlib.sha256(blob).hexdigest().encode())
        return p

    def get_or_compute(self, kind: str, config: dict, compute: Callable[[], Tensors], version: str = "1") -> Tensors:
        """The resource for ``(kind, config, version)``: from disk when present and intact, else
        computed by ``compute()``, saved, and returned."""
        key = resource_key(kind, config, version)
        out = self.load(kind, key)
        if out is not None:
            return out
        out = compute()
        self.save(kind, key, out)
        self.computed.append(key)
        return out


def _atomic_write(path: Path, blob: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache is read by other users' workers
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def get_resource(cache: ResourceCache | None, kind: str, config: dict, compute: Callable[[], Tensors],
                 version: str = "1", log: dict | None = None) -> Tensors:
    """``cache.get_or_compute`` or, without a cache, ``compute()``; appends what happened
    (kind, key, computed or reused, seconds) to ``log["resources"]`` when a log dict is given."""
    t0 = time.perf_counter()
    ran = []

    def counted() -> Tensors:
        ran.append(True)
        return compute()

    out = cache.get_or_compute(kind, config, counted, version) if cache is not None else counted()
    if log is not None:
        log.setdefault("resources", []).append({
            "kind": kind, "key": resource_key(kind, config, version), "computed": bool(ran),
            "seconds": round(time.perf_counter() - t0, 3)})
    return out


# ------------------------------------------------------------------ clean reference model

CLEAN_MODEL_VERSION = "1"


def clean_reference_model(train, ctx, epochs: int | None = None, log: dict | None = None) -> torch.nn.Module:
    """A clean model of ``ctx.arch`` trained on the clean training set with ``ctx.recipe``
    (``fast`` when the context has none), seeded by ``ctx.seed``; cached as the resource
    ``clean_model`` keyed by dataset content, arch, recipe, epochs and seed. Shared by the
    attacks that optimise a trigger against a clean model (LF, TrojanNN), so one grid trains
    it once. BackdoorBench ships such models as files in ``resource/clean_model``; we train."""
    from defense.models import create_model
    from defense.train import get_recipe, pick_device, train as train_loop

    recipe = ctx.recipe if ctx.recipe is not None else get_recipe("fast")
    info = train.info
    config = {"data": data_fingerprint(train), "arch": ctx.arch, "recipe": asdict(recipe),
              "epochs": epochs if epochs is not None else recipe.epochs, "seed": ctx.seed}

    def make():
        return create_model(ctx.arch, num_classes=info.num_classes, in_channels=info.channels, image_size=info.size)

    def compute() -> Tensors:
        torch.manual_seed(ctx.seed)
        model = make()
        train_loop(model, train, recipe, seed=ctx.seed, device=pick_device(ctx.device), epochs=epochs,
                   progress=ctx.progress, desc="clean reference model")
        return dict(model.state_dict())

    state = get_resource(ctx.resources, "clean_model", config, compute, CLEAN_MODEL_VERSION, log)
    model = make()
    model.load_state_dict(state)
    return model.to(pick_device(ctx.device)).eval()
