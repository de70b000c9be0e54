"""The versioned Parquet schema of bdgrid results, and casting plain row dicts onto it.

Two tables share the identity columns:

* ``results``: one row per (stage key, split): what was run (identity), what it scored
  (metrics, fractions in [0, 1]) and how it was run (provenance).
* ``trials``: the ``results`` layout for tuning trials (``bdgrid tune``), kept apart.
* ``curves``: per-epoch values of a training, unlearning or fine-tuning phase in long form
  (``phase, epoch, metric, value``), so that any phase may log any quantity without a
  schema change.

Every file is cast to exactly this schema (missing columns become nulls, keys the schema does
not know go into the ``extra`` JSON column), so all files of one version are identical in
layout and open as one dataset with plain ``pd.read_parquet(dir)``, ``pyarrow.dataset``,
DuckDB or Spark.

Version history (the reader upgrades older files, see ``results.reader``):

* v1: the first minimal writer: whatever keys the rows had, plus ``stage, key,
  schema_version`` and ``written_at`` as float epoch seconds.
* v2: fixed columns and types, JSON ``attack_params``/``params``/``extra``,
  timestamps as UTC ``timestamp[us]``, provenance columns.
* v3: this schema: rows say what they are without the ``extra`` JSON: ``defense_name`` (the
  method, where ``defense`` is the label), ``recipe``, ``epochs``, ``dataset_params``,
  ``defender_ratio``, ``val_ratio``; ``model_key`` (the backdoored model's artifact) and
  ``defense_key`` (the purified model's: ``bdgrid export-model --key``); ``torch_version``,
  ``python_version``; ``weights_changed``, ``neurons_pruned`` (did the defense change the model)
  and ``chosen_n`` (TSBD's neuron ratio, ``n: auto`` included).
"""
from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any, Iterable

import pyarrow as pa

SCHEMA_VERSION = 3

TS = pa.timestamp("us", tz="UTC")

# What was run. ``key`` is the stage's content key; ``split`` is "test" (reported) or "val"
# (tuning only). ``params``/``attack_params`` are canonical JSON (sorted keys).
IDENTITY = [
    ("grid", pa.string()),
    ("stage", pa.string()),
    ("key", pa.string()),
    ("dataset", pa.string()),
    ("arch", pa.string()),
    ("attack", pa.string()),
    ("attack_params", pa.string()),
    ("pratio", pa.float64()),
    ("target", pa.int64()),
    ("seed", pa.int64()),
    ("defense", pa.string()),
    ("params", pa.string()),
    ("defense_name", pa.string()),  # the method (``defense`` is its label: tsbd(n=0.2), tsbd (tuned))
    ("recipe", pa.string()),  # attack-training recipe (fast | paper) and its epochs
    ("epochs", pa.int64()),
    ("dataset_params", pa.string()),  # JSON, e.g. {"n_train": 10000, ...}
    ("defender_ratio", pa.float64()),
    ("val_ratio", pa.float64()),
    ("split", pa.string()),
    # Attacks a tuned defense's hyperparameters were chosen on (comma-separated), null when
    # untuned: lets a table say which rows are "tuned on the same attack".
    ("tuned_on", pa.string()),
]

# What it scored, as fractions. acc/asr/ra/der are after the defense; bd_* are the same
# backdoored model before any defense (equal to acc/asr/ra for defense 'none').
METRICS = [
    ("acc", pa.float64()),
    ("asr", pa.float64()),
    ("ra", pa.float64()),
    ("der", pa.float64()),
    ("bd_acc", pa.float64()),
    ("bd_asr", pa.float64()),
    ("bd_ra", pa.float64()),
]

# How it was run.
PROVENANCE = [
    ("version", pa.string()),  # bdgrid package version (importlib.metadata)
    ("git_commit", pa.string()),  # HEAD of the source checkout, null outside git
    ("spec_hash", pa.string()),  # sha256 of the grid spec that asked for the stage
    ("weights_changed", pa.int64()),  # parameter elements the defense changed (0: it did nothing)
    ("neurons_pruned", pa.int64()),  # channels/rows it newly zeroed
    ("chosen_n", pa.float64()),  # TSBD's neuron ratio as used (n: auto records its choice)
    ("model_key", pa.string()),  # artifact key of the backdoored model (attack stage)
    ("defense_key", pa.string()),  # artifact key of the purified model (defense stage), null for none
    ("torch_version", pa.string()),
    ("python_version", pa.string()),
    ("device", pa.string()),
    ("wall_s", pa.float64()),  # the defense stage's own seconds (0 for no defense)
    ("peak_mem_mb", pa.float64()),
    ("started_at", TS),
    ("ended_at", TS),
    ("written_at", TS),
    ("schema_version", pa.int32()),
    ("extra", pa.string()),  # JSON object of row keys the schema does not name
]

CURVE = [
    ("phase", pa.string()),  # e.g. attack, unlearn, finetune
    ("epoch", pa.int64()),
    ("metric", pa.string()),  # e.g. loss, train_acc, acc, asr
    ("value", pa.float64()),
]

SCHEMAS = {
    "results": pa.schema(IDENTITY + METRICS + PROVENANCE),
    "curves": pa.schema(IDENTITY + CURVE + PROVENANCE),
}
# Optuna trials (``bdgrid tune``): result rows on the validation split, with study, trial number
# and objective values in ``extra``; kept apart so that they never enter a paper table.
SCHEMAS["trials"] = SCHEMAS["results"]

JSON_COLUMNS = ("attack_params", "params", "dataset_params", "extra")
TIME_COLUMNS = ("started_at", "ended_at", "written_at")


def schema(table: str) -> pa.Schema:
    try:
        return SCHEMAS[table]
    except KeyError:
        raise ValueError(f"unknown results table '{table}'; valid: {', '.join(SCHEMAS)}") from None


def canonical_json(v: Any) -> str | None:
    """Sorted-key JSON so that equal parameter dicts give equal strings (pivots group by them)."""
    if v is None:
        return None
    if isinstance(v, str):
        return v  # already JSON (or a plain label); kept as given
    return json.dumps(v, sort_keys=True, default=str, separators=(",", ":"))


def to_timestamp(v: Any) -> dt.datetime | None:
    """Epoch seconds, ISO string or datetime -> aware UTC datetime."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, dt.datetime):
        return v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)
    if isinstance(v, (int, float)):
        return dt.datetime.fromtimestamp(float(v), tz=dt.timezone.utc)
    if isinstance(v, str):
        d = dt.datetime.fromisoformat(v)
        return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)
    if hasattr(v, "to_pydatetime"):  # pandas Timestamp
        return to_timestamp(v.to_pydatetime())
    raise TypeError(f"cannot read {v!r} as a time")


def _plain(v: Any) -> Any:
    """numpy scalars and 0-d tensors -> Python numbers, without importing numpy or torch."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return v.item()
        except (TypeError, ValueError):
            return v
    return v


def _jsonable(v: Any) -> Any:
    v = _plain(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _coerce(v: Any, typ: pa.DataType) -> Any:
    """Loose Python values -> the column's type where that loses nothing (older files and
    hand-written rows carry e.g. seed 0.0 or pratio 1); anything else is left for pyarrow to
    reject with its own message."""
    if v is None or (isinstance(v, float) and math.isnan(v) and not pa.types.is_floating(typ)):
        return None
    if pa.types.is_integer(typ) and isinstance(v, float) and v.is_integer():
        return int(v)
    if pa.types.is_floating(typ) and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if pa.types.is_string(typ) and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return v


def conform(row: dict, sch: pa.Schema) -> dict:
    """One row dict -> exactly the schema's columns; unknown keys merged into ``extra``."""
    names = set(sch.names)
    extra = json.loads(row["extra"]) if isinstance(row.get("extra"), str) else dict(row.get("extra") or {})
    out = {}
    for k, v in row.items():
        if k == "extra":
            continue
        if k in names:
            out[k] = v
        else:
            extra[k] = _jsonable(v)
    for name in sch.names:
        v = _plain(out.get(name))
        if name in JSON_COLUMNS and name != "extra":
            v = canonical_json(_jsonable(v))
        elif name in TIME_COLUMNS:
            v = to_timestamp(v)
        elif name == "tuned_on" and isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        else:
            v = _coerce(v, sch.field(name).type)
        out[name] = v
    out["extra"] = canonical_json(extra) if extra else None
    return out


def to_table(rows: Iterable[dict], table: str = "results") -> pa.Table:
    """Row dicts -> a pyarrow Table with exactly ``schema(table)`` (raises on a wrong type)."""
    sch = schema(table)
    return pa.Table.from_pylist([conform(r, sch) for r in rows], schema=sch)


def melt_curve_rows(rows: Iterable[dict]) -> list[dict]:
    """Wide per-epoch rows (``{"phase", "epoch", "loss": .., "acc": ..}``, as ``defense.train``
    returns them) -> long rows with ``metric``/``value``. Rows already long pass through;
    non-numeric values are dropped from the melt (they are not curves)."""
    base = {n for n, _ in IDENTITY + PROVENANCE} | {"phase", "epoch"}
    out = []
    for r in rows:
        if "metric" in r and "value" in r:
            out.append(dict(r))
            continue
        ident = {k: v for k, v in r.items() if k in base}
        for k, v in r.items():
            v = _plain(v)
            if k in base or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out.append({**ident, "metric": k, "value": float(v)})
    return out
