"""Read the results dataset back as pandas: older schema versions upgraded, re-runs deduplicated.

``load(out)`` reads ``<out>/results/*.parquet`` (``table="curves"`` for the curves table).
Each file is upgraded to the current schema on its own (a v1 file has other types, e.g. float
``written_at``), so one directory may mix versions. Rows are then deduplicated: for each
``(key, split)`` only the rows of the latest write survive (a stage re-run, or the same stage
copied in from another run directory, replaces the older rows; a stage that wrote several rows
at once keeps them all).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from results.schema import SCHEMA_VERSION, schema, to_table


def files(out_dir: str | Path, table: str = "results") -> list[Path]:
    """Parquet files of one table; names starting with '.' or '_' (temp files) are skipped,
    as ``pyarrow.dataset`` does."""
    d = Path(out_dir) / table
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.parquet") if not p.name.startswith((".", "_")))


def upgrade(tbl: pa.Table, table: str = "results") -> pa.Table:
    """A table read from one file, of any known version -> the current schema."""
    target = schema(table)
    version = 1
    if "schema_version" in tbl.column_names and tbl.num_rows:
        version = int(tbl.column("schema_version")[0].as_py() or 1)
    if version > SCHEMA_VERSION:
        raise ValueError(f"results file has schema_version {version}, newer than this bdgrid "
                         f"({SCHEMA_VERSION}); upgrade bdgrid to read it")
    if version == SCHEMA_VERSION and tbl.schema.equals(target):
        return tbl
    # v1 -> v2 (and any same-version file with a drifted layout): re-cast row by row. v1 rows
    # are flat dicts of the then-current keys, so conform() maps known names onto columns,
    # converts epoch-seconds times and keeps the rest in `extra`; schema_version stays 1.
    return to_table(tbl.to_pylist(), table)


def _read(path: Path, table: str) -> pa.Table:
    return upgrade(pq.read_table(path), table)


def load_arrow(out_dir: str | Path | Iterable[str | Path], table: str = "results") -> pa.Table:
    """All files of ``table`` under one or several run directories, as one current-schema Table
    (not deduplicated)."""
    dirs = [out_dir] if isinstance(out_dir, (str, Path)) else list(out_dir)
    paths = [p for d in dirs for p in files(d, table)]
    if not paths:
        return schema(table).empty_table()
    # Fast path: current-version files all have exactly the schema, so Arrow reads them in one
    # multi-threaded scan (about 10x faster than file by file for thousands of stages). A file of
    # another version either fails the cast or shows up in schema_version: then read file by file.
    try:
        tbl = ds.dataset([str(p) for p in paths], schema=schema(table), format="parquet").to_table()
        versions = set(tbl.column("schema_version").unique().to_pylist())
        if versions <= {SCHEMA_VERSION}:
            return tbl
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(lambda p: _read(p, table), paths))
    return pa.concat_tables(tables)


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Keep, per (key, split), only the rows of the latest write."""
    if df.empty:
        return df
    group = [df["key"], df["split"].fillna("")]
    latest = df.groupby(group, dropna=False)["written_at"].transform("max")
    keep = (df["written_at"] == latest) | latest.isna()
    return df[keep].reset_index(drop=True)


def expand_extra(df: pd.DataFrame) -> pd.DataFrame:
    """Keys kept in the ``extra`` JSON column become columns of their own (where no column of
    that name exists), so values a newer writer added are visible to tables and plots."""
    if df.empty or "extra" not in df.columns or df["extra"].isna().all():
        return df
    parsed = df["extra"].map(lambda s: json.loads(s) if isinstance(s, str) else {})
    keys = sorted({k for d in parsed for k in d} - set(df.columns))
    if not keys:
        return df
    cols = pd.DataFrame({k: parsed.map(lambda d, k=k: d.get(k)) for k in keys}, index=df.index)
    return pd.concat([df, cols], axis=1)


def load(out_dir: str | Path | Iterable[str | Path], table: str = "results", dedup: bool = True,
         extra: bool = True) -> pd.DataFrame:
    """The results (or curves) of one or several run directories as a pandas DataFrame.

    Columns are those of ``results.schema`` (metrics as fractions, times as UTC timestamps),
    plus the keys of ``extra`` when ``extra`` is true. An empty or missing directory gives an
    empty frame that still has the schema's columns.
    """
    # nullable Int64 keeps seed/target integers even where some rows lack them
    df = load_arrow(out_dir, table).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype(),
                                                             pa.int32(): pd.Int32Dtype()}.get)
    if dedup:
        df = dedupe(df)
    if extra:
        df = expand_extra(df)
    return df
