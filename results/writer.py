"""Atomic Parquet writer: one file per finished stage under ``<out>/results/``.

Minimal first version; the results issue adds the full versioned schema and provenance.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1


def _jsonable(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def write_stage(out_dir: str | Path, stage: str, key: str, rows: list[dict], table: str = "results") -> Path:
    """Write ``rows`` for one finished stage as ``<out>/<table>/<stage>-<key>.parquet``, atomically
    (temp file + rename, so a crash never leaves a half file under the final name)."""
    d = Path(out_dir) / table
    d.mkdir(parents=True, exist_ok=True)
    rows = [{**{k: _jsonable(v) for k, v in r.items()}, "stage": stage, "key": key,
             "schema_version": SCHEMA_VERSION, "written_at": time.time()} for r in rows]
    tbl = pa.Table.from_pylist(rows)
    final = d / f"{stage}-{key}.parquet"
    tmp = d / f".{final.name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(tbl, tmp)
    os.replace(tmp, final)
    return final
