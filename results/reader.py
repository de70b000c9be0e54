"""Read the results dataset back as pandas: older schema versions upgraded, re-runs deduplicated.

``load(out)`` reads ``<out>/results/*.parquet`` (``table="curves"`` for the curves table).
Each file is upgraded to the current schema on its own (a v1 file has other types, e.g. float
``written_at``), so one directory may mix versions. Rows are then deduplicated: for each
``(key, split)`` only the rows of the latest write survive (a stage re-run, or the same stage
copied in from another run directory, replaces the older rows; a stage that wrote several rows
at once keeps them all).

Integrity (``results.integrity``): every file's sha256 is checked first, and the rows of
results/trials files against the README's invariants. A damaged file (checksum mismatch,
truncated, not Parquet, a broken invariant) is named once on stderr and left out, so its stage
counts as not done (``done_keys``) and the grid recomputes it; reading never moves or deletes
anything (a dry run, ``status`` and ``table`` on a read-only folder change nothing).
``results.writer`` sets the damaged file aside when the stage's new rows are written.
Files from before checksums existed are read with the check skipped (said once).
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from results.integrity import DAMAGED, UNCHECKED, check_file, invariant_violations
from results.schema import SCHEMA_VERSION, schema, to_table

DAMAGED_DIR = "damaged"  # as results.writer.DAMAGED_DIR (not imported: the reader never writes)


def files(out_dir: str | Path, table: str = "results") -> list[Path]:
    """Parquet files of one table; names starting with '.' or '_' (temp files) are skipped,
    as ``pyarrow.dataset`` does."""
    d = Path(out_dir) / table
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.parquet") if not p.name.startswith((".", "_")))


class NewerSchema(ValueError):
    """A file written by a newer bdgrid: not damage, so it is raised, never left out."""


def upgrade(tbl: pa.Table, table: str = "results") -> pa.Table:
    """A table read from one file, of any known version -> the current schema."""
    target = schema(table)
    version = 1
    if "schema_version" in tbl.column_names and tbl.num_rows:
        version = int(tbl.column("schema_version")[0].as_py() or 1)
    if version > SCHEMA_VERSION:
        raise NewerSchema(f"results file has schema_version {version}, newer than this bdgrid "
                         f"({SCHEMA_VERSION}); upgrade bdgrid to read it")
    if version == SCHEMA_VERSION and tbl.schema.equals(target):
        return tbl
    # v1 -> v2 (and any same-version file with a drifted layout): re-cast row by row. v1 rows
    # are flat dicts of the then-current keys, so conform() maps known names onto columns,
    # converts epoch-seconds times and keeps the rest in `extra`; schema_version stays 1.
    return to_table(tbl.to_pylist(), table)


def _read(path: Path, table: str) -> pa.Table:
    return upgrade(pq.read_table(path), table)


@dataclass
class Report:
    """What reading found besides the rows: damaged files (left out) and files without a
    checksum (older writers; read with the check skipped)."""

    damaged: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    unchecked: list[Path] = field(default_factory=list)

    def messages(self) -> list[str]:
        out = [f"damaged result file {p}: {why}. Left out: its rows are missing and its stage counts as not done "
               f"(the next `bdgrid run` recomputes it and moves this file to <out>/{DAMAGED_DIR}/)"
               for p, why in self.damaged]
        by_dir: dict[Path, int] = {}
        for p in self.unchecked:
            by_dir[p.parent] = by_dir.get(p.parent, 0) + 1
        out += [f"note: {n} result file(s) in {d} carry no checksum (written by an older bdgrid); "
                f"read without the integrity check" for d, n in by_dir.items()]
        return out


_SAID: set[str] = set()


def say(report: Report) -> None:
    """Print each message of ``report`` on stderr, once per process (the grid reads results
    several times per run; one message per damaged file is enough)."""
    for m in report.messages():
        if m not in _SAID:
            _SAID.add(m)
            print(m, file=sys.stderr)


def _reason(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"not readable as Parquet ({type(e).__name__}: {first[:200]})"


def _scan_fast(paths: list[Path], table: str) -> pa.Table | None:
    """One multi-threaded scan of files that all have the current schema (about 10x faster than
    file by file for thousands of stages), with ``__filename`` per row; None when some file is
    of another version or layout (then read file by file)."""
    cols = schema(table).names + ["__filename"]
    try:
        tbl = ds.dataset([str(p) for p in paths], schema=schema(table), format="parquet").to_table(columns=cols)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError):
        return None
    if set(tbl.column("schema_version").unique().to_pylist()) <= {SCHEMA_VERSION}:
        return tbl
    return None


def _scan_each(paths: list[Path], table: str, report: Report) -> pa.Table:
    def one(p: Path):
        try:
            t = _read(p, table)
        except NewerSchema as e:
            raise NewerSchema(f"{p}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any unreadable file is named, never a traceback
            return p, None, _reason(e)
        return p, t.append_column("__filename", pa.array([str(p)] * t.num_rows, pa.string())), None

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(one, paths))
    report.damaged += [(p, why) for p, t, why in got if t is None]
    tables = [t for _, t, _ in got if t is not None]
    if not tables:
        return schema(table).empty_table().append_column("__filename", pa.array([], pa.string()))
    return pa.concat_tables(tables)


def load_checked(out_dir: str | Path | Iterable[str | Path], table: str = "results",
                 check: bool = True) -> tuple[pa.Table, Report]:
    """All intact files of ``table`` under one or several run directories, as one current-schema
    Table (not deduplicated), and the ``Report`` of what was left out and why.

    A file is left out when its checksum fails, it is not readable as Parquet, or (results and
    trials) one of its rows breaks an invariant (``results.integrity``). ``check=False`` reads
    as bdgrid did before these checks (no checksums, no invariants): only for the cost
    measurement in ``bench/integrity_cost.py``."""
    dirs = [out_dir] if isinstance(out_dir, (str, Path)) else list(out_dir)
    paths = [p for d in dirs for p in files(d, table)]
    report = Report()
    if not paths:
        return schema(table).empty_table(), report
    if check:
        with ThreadPoolExecutor(max_workers=8) as pool:  # hashlib releases the GIL on large buffers
            status = list(pool.map(check_file, paths))
        report.damaged += [(p, why) for p, (st, why) in zip(paths, status) if st == DAMAGED]
        report.unchecked += [p for p, (st, _) in zip(paths, status) if st == UNCHECKED]
        paths = [p for p, (st, _) in zip(paths, status) if st != DAMAGED]
    tbl = (_scan_fast(paths, table) if paths else None)
    if tbl is None:
        tbl = _scan_each(paths, table, report)
    if check and table != "curves" and tbl.num_rows:
        names = tbl.column("__filename")
        broken: dict[str, str] = {}
        for i, why in invariant_violations(tbl):
            broken.setdefault(names[i].as_py(), f"row invariant broken: {why}")
        if broken:
            report.damaged += [(Path(f), why) for f, why in broken.items()]
            tbl = tbl.filter(pc.invert(pc.is_in(names, value_set=pa.array(list(broken), pa.string()))))
    return tbl.drop_columns(["__filename"]), report


def load_arrow(out_dir: str | Path | Iterable[str | Path], table: str = "results") -> pa.Table:
    """All intact files of ``table`` under one or several run directories, as one current-schema
    Table (not deduplicated); what was left out is said on stderr (``load_checked``)."""
    tbl, report = load_checked(out_dir, table)
    say(report)
    return tbl


def done_keys(out_dir: str | Path, set_aside: bool = False) -> set[str]:
    """Keys of the stages whose rows are in ``<out>/results`` and intact: the grid's 'eval done'.

    With a ``split`` column a key is done when its rows cover at least two splits (an eval
    writes test and val). Damaged files are left out (their stages are not done); with
    ``set_aside`` they are also moved to ``<out>/damaged/`` (a real run, not a dry one)."""
    tbl, report = load_checked(out_dir, "results")
    say(report)
    if set_aside and report.damaged:
        from results.writer import set_aside as move

        for p, _ in report.damaged:
            if p.exists():
                move(out_dir, p)
    if not tbl.num_rows:
        return set()
    df = tbl.select(["key", "split"]).to_pandas()
    n = df.groupby("key")["split"].nunique()
    return set(n[n >= 2].index)


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
    empty frame that still has the schema's columns. Damaged files are left out and named on
    stderr (``load_report`` also returns them).
    """
    return load_report(out_dir, table, dedup, extra)[0]


def load_report(out_dir: str | Path | Iterable[str | Path], table: str = "results", dedup: bool = True,
                extra: bool = True) -> tuple[pd.DataFrame, Report]:
    """``load`` and the ``Report`` of the files it left out (for ``bdgrid table``'s note)."""
    tbl, report = load_checked(out_dir, table)
    say(report)
    # nullable Int64 keeps seed/target integers even where some rows lack them
    df = tbl.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}.get)
    if dedup:
        df = dedupe(df)
    if extra:
        df = expand_extra(df)
    return df, report


def run_failures(out: Path) -> list[dict]:
    """The failed stages of the run's last driver (``<out>/state.json``), for failed cells."""
    import json

    try:
        return list(json.loads((Path(out) / "state.json").read_text()).get("failures") or [])
    except (OSError, ValueError):
        return []
