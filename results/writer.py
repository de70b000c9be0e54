"""Atomic Parquet writer: one file per finished stage under ``<out>/<table>/``.

``write_stage(out, stage, key, rows)`` casts the rows onto the versioned schema
(``results.schema``), fills the provenance it can (package version, git commit, time written)
and writes ``<out>/<table>/<stage>-<key>.parquet`` via a temporary file and a rename, so a
crash never leaves a half-written file under the final name and readers (which skip names
starting with '.') never see one.
"""
from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path

import pyarrow.parquet as pq

from results import provenance
from results.schema import SCHEMA_VERSION, melt_curve_rows, to_table


def stage_path(out_dir: str | Path, stage: str, key: str, table: str = "results") -> Path:
    return Path(out_dir) / table / f"{stage}-{key}.parquet"


def write_stage(out_dir: str | Path, stage: str, key: str, rows: list[dict], table: str = "results") -> Path:
    """Write ``rows`` of one finished stage; re-writing the same stage replaces its file.

    ``rows`` are plain dicts: schema columns by name (dict params are JSON-encoded, times may be
    epoch seconds, ISO strings or datetimes), anything else is kept in the ``extra`` JSON column.
    For ``table="curves"`` rows may be wide per-epoch dicts (``phase``, ``epoch`` and numeric
    values), as ``defense.train.train`` returns them; they are stored long (metric, value).
    """
    if not rows:
        raise ValueError(f"write_stage({stage!r}, {key!r}): no rows to write")
    now = dt.datetime.now(dt.timezone.utc)
    fill = provenance.defaults()
    if table == "curves":
        rows = melt_curve_rows(rows)
    rows = [{**r, **{k: v for k, v in fill.items() if r.get(k) is None}, "stage": stage, "key": key,
             "schema_version": SCHEMA_VERSION, "written_at": now} for r in rows]
    tbl = to_table(rows, table)
    final = stage_path(out_dir, stage, key, table)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(tbl, tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final
