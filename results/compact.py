"""Compaction: many small per-stage result files -> a few large checksummed Parquet part files.

A grid commits each finished eval as its own file, ``<out>/<table>/<stage>-<key>.parquet``
(``results.writer.write_stage``: atomic, idempotent, one stage at a time). That is the right
unit to write, but not to read: a campaign of 500k evals would be 500k files, and opening them
costs more than their rows. ``compact(out)`` folds the small files (and parts under
``MERGE_BELOW`` rows) into ``<out>/<table>/part-<utc time>-<random>.parquet`` files of at most
``PART_ROWS`` rows, with the same schema and the same sha256 footer checksum
(``results.integrity``), so ``pd.read_parquet('<out>/results')``, ``pyarrow.dataset`` and
DuckDB read both kinds alike.

Order of work, so that a crash at any point loses nothing and counts nothing twice:

1. read the inputs with the reader's checks; damaged ones (checksum, invariants) are not
   inputs: they stay where they are, for the grid to set aside and recompute;
2. deduplicate (the reader's rule: per (key, split) the latest write wins), write each part
   through ``atomic_write`` (temporary name, fsync, rename) and fsync the folder, so the
   parts are on disk under their final names;
3. only then remove the inputs.

A crash in 1 or 2 leaves the inputs as they were (and at most a ``.part-*.tmp`` file, which
readers skip and ``clean_stale_tmp`` removes). A crash in 3 leaves a part *and* some of the
files it was made from: the same rows twice, with the same ``written_at``; the reader keeps one
copy (``results.reader.latest_mask``) and the next compaction folds them again.

Who compacts: the grid's driver at the end of a run (``grid.run.Runner.close``) and at its start
(``grid.run.done_evals``) when ``COMPACT_AT`` or more small files are there, and ``bdgrid
table``/``plot`` (``maybe_compact``) under the same rule. Compaction holds the run folder's
driver lock (``<out>/.driver.lock``, as ``grid.lock`` takes it) so that no driver writes a
stage file while its older copy is being folded in; where a driver holds it, or the folder is
read-only, ``maybe_compact`` does nothing and reading goes on as before.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from results.integrity import seal
from results.reader import NewerSchema, files, latest, scan
from results.writer import atomic_write

PART_PREFIX = "part-"
PART_ROWS = 1_000_000  # rows per part at most (about 60 MB of a grid's result rows)
MERGE_BELOW = 100_000  # a part smaller than this is folded into the next compaction's part
COMPACT_AT = 256  # this many small files make a run's end, a run's start, `table` and `plot` compact
LOCK_FILE = ".driver.lock"  # grid.lock.LOCK_FILE (not imported: results never imports grid)
TABLES = ("results", "curves", "trials")


@dataclass
class Compacted:
    """What one compaction did."""

    parts: list[Path] = field(default_factory=list)  # written
    removed: list[Path] = field(default_factory=list)  # inputs folded in and removed
    rows: int = 0  # rows in the written parts
    left: list[Path] = field(default_factory=list)  # damaged inputs, left where they are


def is_part(path: Path) -> bool:
    return path.name.startswith(PART_PREFIX)


def small_files(out: str | Path, table: str = "results") -> list[Path]:
    """The per-stage files of ``table`` (everything the reader lists that is not a part)."""
    return [p for p in files(out, table) if not is_part(p)]


def _small_parts(out: str | Path, table: str) -> list[Path]:
    got = []
    for p in files(out, table):
        if is_part(p):
            try:
                if pq.read_metadata(p).num_rows < MERGE_BELOW:
                    got.append(p)
            except Exception:  # noqa: BLE001 - an unreadable part is an input; the read names it damaged
                got.append(p)
    return got


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames of the new parts are durable before any input is removed
    finally:
        os.close(fd)


def _try_lock(out: Path) -> int | None:
    """The folder's driver lock, or None when a driver holds it or it cannot be opened."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def compact(out: str | Path, table: str = "results", *, locked: bool = False, min_inputs: int = 2) -> Compacted | None:
    """Fold the small files of ``<out>/<table>`` (and the small parts) into new part files.

    ``locked``: the caller holds the folder's driver lock (the grid's driver does); otherwise
    it is taken here, and when a driver holds it nothing is done (None). Nothing is done either
    when there are fewer than ``min_inputs`` inputs. Raises ``WriteError`` when a part cannot be
    written (the inputs are then untouched)."""
    out = Path(out)
    fd = None
    if not locked:
        fd = _try_lock(out)
        if fd is None:
            return None
    try:
        inputs = small_files(out, table) + _small_parts(out, table)
        if len(inputs) < min_inputs:
            return None
        return _fold(out, table, inputs)
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _fold(out: Path, table: str, inputs: list[Path]) -> Compacted:
    tbl, report = scan(inputs, table)
    bad = {p for p, _ in report.damaged}
    done = Compacted(left=sorted(bad))
    rows = latest(tbl).drop_columns(["__file"])
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    for i in range(0, rows.num_rows, PART_ROWS):
        part = out / table / f"{PART_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}-{i // PART_ROWS:03d}.parquet"
        atomic_write(part, seal(rows.slice(i, PART_ROWS)))
        done.parts.append(part)
    done.rows = rows.num_rows
    _fsync_dir(out / table)
    for p in inputs:
        if p not in bad:
            p.unlink(missing_ok=True)
            done.removed.append(p)
    return done


def compact_run(out: str | Path, *, locked: bool = False, at: int = COMPACT_AT) -> list[Compacted]:
    """Compact every table of a run folder that has ``at`` or more small files."""
    got = []
    for table in TABLES:
        if len(small_files(out, table)) >= at:
            c = compact(out, table, locked=locked)
            if c is not None:
                got.append(c)
    return got


def maybe_compact(out: str | Path, table: str = "results", at: int = COMPACT_AT) -> Compacted | None:
    """What ``bdgrid table``/``plot`` call before reading: compact when ``at`` or more small files
    are there and the folder is writable and no driver works in it; any failure to write leaves
    everything as it was and is not an error (reading works on either layout)."""
    if len(small_files(out, table)) < at or not os.access(Path(out) / table, os.W_OK):
        return None
    from results.writer import WriteError

    try:
        return compact(out, table)
    except (WriteError, NewerSchema):  # the read that follows names a newer file itself
        return None

