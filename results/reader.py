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

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from results.integrity import DAMAGED, METRIC_COLUMNS, OK, UNCHECKED, check_bytes, invariant_violations
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


def _parse(blob: bytes, table: str, cols: list[str]) -> pa.Table:
    """``cols`` of one file's bytes, on the current schema. A file of the current version is read
    column by column (the others are never decoded); an older one is read whole and upgraded."""
    pf = pq.ParquetFile(pa.BufferReader(blob))
    if pf.schema_arrow.equals(schema(table)):
        t = pf.read(columns=list(dict.fromkeys([*cols, "schema_version"])), use_threads=False)
        if not t.num_rows or pc.all(pc.equal(t.column("schema_version"), SCHEMA_VERSION)).as_py():
            return t.select(cols)
    return upgrade(pf.read(use_threads=False), table).select(cols)


def _one(path: Path, table: str, cols: list[str], check: bool):
    """(status, why, table) of one file: its bytes are read once, for the checksum and the rows."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        return DAMAGED, f"unreadable ({e.strerror or e})", None
    status, why = check_bytes(blob) if check else (OK, None)
    if status == DAMAGED:
        return status, why, None
    try:
        return status, None, _parse(blob, table, cols)
    except NewerSchema as e:
        raise NewerSchema(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is named, never a traceback
        return DAMAGED, _reason(e), None


_BATCH = 1000  # files read before their tables are joined into one
_THREADED = 64  # up to this many files are read on two threads
INVARIANT_COLUMNS = ("defense",) + METRIC_COLUMNS  # what results.integrity.invariant_violations reads


def scan(paths: list[Path], table: str = "results", check: bool = True, columns: Iterable[str] | None = None
         ) -> tuple[pa.Table, Report]:
    """The intact rows of the result files ``paths`` (not deduplicated), ``columns`` only (default
    all; the columns the checks need are read as well), with an int32 ``__file`` column: the
    index in ``paths`` of each row's file. See ``load_checked``.

    Each file is read into memory once, its checksum checked on those bytes and its columns
    parsed from them (``pyarrow.parquet.ParquetFile``): about 0.5 ms of CPU per small file for the
    key columns, where a ``pyarrow.dataset`` scan took 1.2 ms (2,000 per-eval files, this
    machine). A compacted store is a few large files, read whole in well under a second."""
    paths = list(paths)
    report = Report()
    sch = schema(table)
    cols = list(sch.names) if columns is None else [c for c in sch.names if c in set(columns)]
    if check and table != "curves":
        cols += [c for c in INVARIANT_COLUMNS if c not in cols]
    chunks, file_no = [], []
    for lo in range(0, len(paths), _BATCH):
        batch = paths[lo:lo + _BATCH]
        if len(paths) <= _THREADED:  # a few large files (parts): sha256 and decoding release the GIL
            with ThreadPoolExecutor(max_workers=2) as pool:
                got = list(pool.map(lambda p: _one(p, table, cols, check), batch))
        else:  # thousands of small ones are bound by Python: threads only add contention
            got = [_one(p, table, cols, check) for p in batch]
        report.damaged += [(p, why) for p, (st, why, _) in zip(batch, got) if st == DAMAGED]
        report.unchecked += [p for p, (st, _, _) in zip(batch, got) if st == UNCHECKED]
        ok = [(lo + i, t) for i, (_, _, t) in enumerate(got) if t is not None]
        if ok:
            # one table per batch: thousands of one-file tables cost ~60 KB each and make every
            # later kernel walk thousands of chunks (compacting 50k files peaked at 3.3 GB)
            chunks.append(pa.concat_tables([t for _, t in ok]).combine_chunks())
            file_no.append(np.repeat(np.array([i for i, _ in ok], np.int32), [t.num_rows for _, t in ok]))
    if not chunks:
        return sch.empty_table().select(cols).append_column("__file", pa.array([], pa.int32())), report
    tbl = pa.concat_tables(chunks)
    file_no = np.concatenate(file_no)
    tbl = tbl.append_column("__file", pa.array(file_no, pa.int32()))
    if check and table != "curves" and tbl.num_rows:
        broken: dict[int, str] = {}
        for i, why in invariant_violations(tbl):
            broken.setdefault(int(file_no[i]), f"row invariant broken: {why}")
        if broken:
            report.damaged += [(paths[f], why) for f, why in broken.items()]
            tbl = tbl.filter(pc.invert(pc.is_in(tbl.column("__file"), value_set=pa.array(list(broken), pa.int32()))))
    return tbl, report


def load_checked(out_dir: str | Path | Iterable[str | Path], table: str = "results",
                 check: bool = True, columns: Iterable[str] | None = None,
                 file_index: bool = False) -> tuple[pa.Table, Report]:
    """All intact files of ``table`` under one or several run directories (per-stage files and
    compacted parts alike, ``results.compact``), as one current-schema Table (not deduplicated),
    and the ``Report`` of what was left out and why. ``columns``: read only these (the others
    are never decoded); ``file_index``: keep the ``__file`` column (which file each row is from,
    as an index into ``files``), for ``latest``.

    A file is left out when its checksum fails, it is not readable as Parquet, or (results and
    trials) one of its rows breaks an invariant (``results.integrity``). ``check=False`` reads
    as bdgrid did before these checks (no checksums, no invariants): only for the cost
    measurement in ``bench/integrity_cost.py``."""
    dirs = [out_dir] if isinstance(out_dir, (str, Path)) else list(out_dir)
    tbl, report = scan([p for d in dirs for p in files(d, table)], table, check, columns)
    if columns is not None:
        want = [c for c in schema(table).names if c in set(columns)]
        tbl = tbl.select(want + ["__file"])
    return (tbl if file_index else tbl.drop_columns(["__file"])), report


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
    ``set_aside`` they are also moved to ``<out>/damaged/`` (a real run, not a dry one).
    Only the key and split columns are decoded (and those the row checks need)."""
    tbl, report = load_checked(out_dir, "results", columns=["key", "split"])
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


_NO_TIME = np.iinfo(np.int64).min  # a missing written_at (pandas' own NaT value)


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Keep, per (key, split), only the rows of the latest write (see ``latest_mask``)."""
    if df.empty:
        return df
    w = pd.to_datetime(df["written_at"], utc=True).array.asi8  # NaT -> _NO_TIME
    keep = latest_mask(df["key"].to_numpy(), df["split"].fillna("").to_numpy(), w,
                       df["__file"].to_numpy() if "__file" in df else None)
    return df[keep].reset_index(drop=True)


def latest_mask(key: np.ndarray, split: np.ndarray, written_at: np.ndarray, file_no: np.ndarray | None = None
                ) -> np.ndarray:
    """Which rows survive deduplication: per (key, split) the rows of the latest ``written_at``
    (int64 microseconds, ``_NO_TIME`` where missing): a re-run stage, or the same stage copied
    in from another run folder, replaces the older rows; the rows of one write all stay. When
    one write is in two files (a part and the per-stage file it was compacted from, after a
    crash between writing the part and removing the file: ``results.compact``) only the copy
    in the lowest ``file_no`` stays. Rows without a time (very old files) all stay where their
    (key, split) has no timed row."""
    k = pd.factorize(key)[0].astype(np.int64)
    s = pd.factorize(split)[0].astype(np.int64)
    g = k * (int(s.max(initial=0)) + 2) + s
    if not pd.Series(g).duplicated().any():
        return np.ones(len(g), dtype=bool)  # one row per (key, split): nothing to drop (a compacted store)
    w = np.asarray(written_at, dtype=np.int64)
    keep = w == pd.Series(w).groupby(g).transform("max").to_numpy()
    if file_no is not None:
        f = np.asarray(file_no)
        first = pd.Series(f).groupby([k, w]).transform("min").to_numpy()
        keep &= (f == first) | (w == _NO_TIME)
    return keep


def latest(tbl: pa.Table) -> pa.Table:
    """``tbl`` (from ``load_checked(..., file_index=True)``) deduplicated (``latest_mask``)."""
    if not tbl.num_rows:
        return tbl
    if "__file" in tbl.column_names and pc.min_max(tbl.column("__file")).as_py()["min"] == \
            pc.min_max(tbl.column("__file")).as_py()["max"]:
        # one file: a stage file is one write, a part is already deduplicated (results.compact),
        # so every row stays (a compacted store of 1M rows skips factorizing 1M keys)
        return tbl
    col = lambda c: tbl.column(c).to_numpy(zero_copy_only=False)  # noqa: E731
    w = pc.fill_null(tbl.column("written_at").cast(pa.int64()), _NO_TIME).to_numpy(zero_copy_only=False)
    mask = latest_mask(col("key"), pc.fill_null(tbl.column("split"), "").to_numpy(zero_copy_only=False), w,
                       col("__file") if "__file" in tbl.column_names else None)
    return tbl if mask.all() else tbl.filter(pa.array(mask))


def expand_extra(df: pd.DataFrame, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """Keys kept in the ``extra`` JSON column become columns of their own (where no column of
    that name exists), so values a newer writer added are visible to tables and plots.
    ``keys``: only these (each distinct ``extra`` string is parsed once); default every key."""
    if df.empty or "extra" not in df.columns or df["extra"].isna().all():
        return df
    want = None if keys is None else [k for k in keys if k not in df.columns]
    if want is not None and not want:
        return df
    codes, uniques = pd.factorize(df["extra"])  # equal strings parsed once
    parsed = [json.loads(s) if isinstance(s, str) else {} for s in uniques]
    names = sorted({k for d in parsed for k in d} - set(df.columns)) if want is None else \
        [k for k in want if any(k in d for d in parsed)]
    if not names:
        return df
    cols = {}
    for k in names:
        vals = np.array([d.get(k) for d in parsed] + [None], dtype=object)
        cols[k] = vals[codes]  # code -1 (no extra) -> the trailing None
    return pd.concat([df, pd.DataFrame(cols, index=df.index)], axis=1)


def load(out_dir: str | Path | Iterable[str | Path], table: str = "results", dedup: bool = True,
         extra: bool | Iterable[str] = True, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """The results (or curves) of one or several run directories as a pandas DataFrame.

    Columns are those of ``results.schema`` (metrics as fractions, times as UTC timestamps),
    plus the keys of ``extra`` when ``extra`` is true (or the keys listed in ``extra``).
    ``columns``: only these schema columns are read (a table names what it prints; the rest of
    the files is never decoded). An empty or missing directory gives an empty frame that still
    has the schema's columns. Damaged files are left out and named on stderr (``load_report``
    also returns them).
    """
    return load_report(out_dir, table, dedup, extra, columns)[0]


def load_report(out_dir: str | Path | Iterable[str | Path], table: str = "results", dedup: bool = True,
                extra: bool | Iterable[str] = True, columns: Iterable[str] | None = None,
                split: str | None = None) -> tuple[pd.DataFrame, Report]:
    """``load`` and the ``Report`` of the files it left out (for ``bdgrid table``'s note).
    ``split``: only the rows of that split, after deduplication (rows without a split count
    as 'test', as ``results.tables.select`` has it), so pandas never holds the others."""
    asked = None if columns is None else set(columns)
    want = None if asked is None else set(asked)
    extra_keys = None if isinstance(extra, bool) else list(extra)
    if want is not None:
        # deduplication needs the identity of a write (not when one file holds every row: see
        # ``latest``; the 64-character keys of 1M rows were a fifth of a table's read); extra
        # keys come from the extra column
        dirs = [out_dir] if isinstance(out_dir, (str, Path)) else list(out_dir)
        single = sum(len(files(d, table)) for d in dirs) <= 1
        want |= {"split"} | (set() if single else {"key", "written_at"}) \
            | ({"extra"} if extra_keys or extra is True else set())
    tbl, report = load_checked(out_dir, table, columns=want, file_index=True)
    say(report)
    if dedup and "key" in tbl.column_names:
        tbl = latest(tbl)
    if split is not None:
        tbl = tbl.filter(pc.equal(pc.fill_null(tbl.column("split"), "test"), split))
    if columns is not None:  # what was read only for the checks is not the caller's
        tbl = tbl.select([c for c in schema(table).names if c in want])
    else:
        tbl = tbl.drop_columns(["__file"])
    # nullable Int64 keeps seed/target integers even where some rows lack them
    df = tbl.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}.get)
    if extra is not False and not (extra_keys is not None and not extra_keys):
        df = expand_extra(df, extra_keys)
    if asked is not None:  # what was read only to deduplicate, filter or expand is not the caller's
        df = df.drop(columns=[c for c in want - asked if c in df.columns])
    return df, report


def run_failures(out: Path) -> list[dict]:
    """The failed stages of the run's last driver (``<out>/state.json``), for failed cells."""
    import json

    try:
        return list(json.loads((Path(out) / "state.json").read_text()).get("failures") or [])
    except (OSError, ValueError):
        return []
