"""The tune format before one engine (``study:``, ``defense:``, ``base:``, ``tune_on`` cells,
``resources: {num_cpus, num_gpus}``, optionally ``grid:``) is refused with the equivalent new
spec: a grid spec whose axes hold every cell the old one named, plus a ``tune:`` block."""
from __future__ import annotations

from typing import Any

import yaml

# keys that only the old format had at the top level
OLD_KEYS = ("study", "space", "base", "grid", "grid_out", "num_cpus")


def is_legacy(data: Any) -> bool:
    return isinstance(data, dict) and "space" in data and "tune" not in data


def _uniq(items: list) -> list:
    out = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def convert(old: dict) -> dict:
    """The new-format spec that tunes the same cells as ``old`` (best effort: a `grid:` reference
    becomes a comment-free copy request, since the grid's own fields are not in ``old``)."""
    base = dict(old.get("base") or {})
    cells = [{**base, **c} for c in (old.get("tune_on") or []) + (old.get("report_on") or []) if isinstance(c, dict)]
    new: dict[str, Any] = {"name": old.get("study", "tune")}
    if old.get("grid"):
        new["#"] = (f"copy the grid fields of {old['grid']} here (datasets, archs, attacks, pratios, seeds, recipe, "
                    f"epochs), with out: {old.get('grid_out') or 'its output folder'}")
    else:
        ds = _uniq([(c.get("dataset", "synthetic"), c.get("dataset_params") or {}, c.get("data_root")) for c in cells])
        new["datasets"] = [{"name": n, **({"params": p} if p else {}), **({"root": r} if r else {})} for n, p, r in ds]
        new["archs"] = _uniq([c.get("arch", "tiny_cnn") for c in cells])
        new["attacks"] = [{"name": n, **({"params": p} if p else {})}
                          for n, p in _uniq([(c.get("attack", "badnets"), c.get("attack_params") or {}) for c in cells])]
        new["pratios"] = _uniq([c.get("pratio", 0.1) for c in cells])
        new["seeds"] = _uniq([c.get("seed", 0) for c in cells])
        for k in ("target", "recipe", "epochs", "defender_ratio", "val_ratio"):
            vals = _uniq([c[k] for c in cells if k in c])
            if vals:
                new[k] = vals[0]
    res = old.get("resources") or {}
    dev = old.get("device")
    gpus = res.get("num_gpus", 1 if isinstance(dev, str) and dev.startswith("cuda") else 0)
    if res or gpus:
        one = {"cpus": res.get("num_cpus", 1), **({"gpus": gpus} if gpus else {})}
        new["resources"] = {k: dict(one) for k in ("attack", "prepare", "defense", "eval")}
    if old.get("imports"):
        new["imports"] = old["imports"]
    if old.get("out"):
        new["out"] = old["out"]
    axes = ("dataset", "arch", "attack", "pratio", "seed")
    tune = {k: old[k] for k in ("defense", "params", "space", "objectives", "select", "max_acc_drop", "sampler",
                                "n_trials", "parallelism", "max_failures", "seed", "storage", "stale_after_s")
            if k in old}
    tune["study"] = old.get("study")
    varying = [k for k in axes if len(_uniq([c.get(k) for c in cells])) > 1]  # the axes that tell cells apart
    for which in ("tune_on", "report_on"):
        if old.get(which):
            tune[which] = [{k: {**base, **c}[k] for k in varying if k in {**base, **c}}
                           or {"attack": {**base, **c}.get("attack", "badnets")}
                           for c in old[which] if isinstance(c, dict)]
    new["tune"] = {k: v for k, v in tune.items() if v is not None}
    return new


def message(old: dict) -> str:
    text = yaml.safe_dump(convert(old), sort_keys=False, default_flow_style=None).replace("'#':", "#")
    return ("this is the old tune format (study/space/base/tune_on at the top level); a tune spec is now a "
            "grid spec plus a `tune:` block. The same tuning, in the new format:\n\n" + text)
