"""Atomic, checksummed Parquet writer: one file per finished stage under ``<out>/<table>/``.

``write_stage(out, stage, key, rows)`` casts the rows onto the versioned schema
(``results.schema``), fills the provenance it can (package version, git commit, time written)
and writes ``<out>/<table>/<stage>-<key>.parquet`` carrying a sha256 of all its bytes
(``results.integrity``).

Disk faults (``atomic_write``): the bytes go to a temporary file beside the target
(``.<name>.<pid>.<random>.tmp``; readers skip names starting with '.'), are fsynced and then
renamed over the target, so a crash never leaves a half-written file under the final name. On
any failure the temporary file is removed and one ``WriteError`` names the target and the
cause (disk full, read-only, no permission) instead of an ``OSError`` traceback; the target is
untouched. Temporary files left by a killed process are removed by ``clean_stale_tmp(out)``
at the next start.

Many per-stage files are later folded into large part files by ``results.compact`` (at a run's
end, or by ``bdgrid table``); the reader treats both alike and keeps, per (key, split), the
latest write, so re-writing a stage that is already in a part simply supersedes its rows.

A result file that fails its check is never deleted: ``set_aside_damaged`` moves it to
``<out>/damaged/<table>/`` (``write_stage`` does so before writing a damaged stage's
replacement), so what was there can still be looked at.
"""
from __future__ import annotations

import datetime as dt
import errno
import os
import re
import time
import uuid
from pathlib import Path

from results import provenance
from results.integrity import DAMAGED, check_file, seal
from results.schema import SCHEMA_VERSION, melt_curve_rows, to_table

DAMAGED_DIR = "damaged"
_TMP = re.compile(r"^\..+\.tmp$")
_TMP_PID = re.compile(r"\.(\d+)\.[0-9a-f]{32}\.tmp$")


class WriteError(OSError):
    """A result (or state) file could not be written: disk full, read-only, no permission.

    The message names the path and what happened to it; ``errno`` is the OS error's and
    ``path`` the file that was not written.
    """

    @classmethod
    def of(cls, path: Path, e: OSError) -> "WriteError":
        err = cls(f"cannot write {path}: {_why(e)}; nothing was written under that name "
                  f"(what was there before is kept)")
        err.errno, err.path = e.errno, path  # not filename: OSError would print it again
        return err


def _why(e: OSError) -> str:
    known = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted"}
    return known.get(e.errno, e.strerror or str(e))


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename; ``WriteError`` on failure
    (the temporary file removed, ``path`` as it was before)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # a full disk may only say so here (delayed allocation)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteError.of(path, e) from None
    return path


def stage_path(out_dir: str | Path, stage: str, key: str, table: str = "results") -> Path:
    return Path(out_dir) / table / f"{stage}-{key}.parquet"


def write_stage(out_dir: str | Path, stage: str, key: str, rows: list[dict], table: str = "results") -> Path:
    """Write ``rows`` of one finished stage; re-writing the same stage replaces its file (a
    damaged one is first set aside to ``<out>/damaged/``). ``WriteError`` when the disk refuses.

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
    blob = seal(to_table(rows, table))
    final = stage_path(out_dir, stage, key, table)
    if final.exists() and check_file(final)[0] == DAMAGED:
        set_aside(out_dir, final)
    return atomic_write(final, blob)


def set_aside(out_dir: str | Path, path: str | Path) -> Path | None:
    """Move one damaged result file to ``<out>/damaged/<table>/`` (a new name if one is there);
    None when it cannot be moved (e.g. a read-only folder): it is then left where it is."""
    path = Path(path)
    dest_dir = Path(out_dir) / DAMAGED_DIR / path.parent.name
    dest = dest_dir / path.name
    if dest.exists():
        dest = dest_dir / f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:6]}{path.suffix}"
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
    except OSError:
        return None
    return dest


def set_aside_damaged(out_dir: str | Path, tables=("results", "curves", "trials")) -> list[tuple[Path, Path | None]]:
    """Check every result file of ``out_dir`` and move the damaged ones aside.

    Returns (damaged file, where it went or None when it could not be moved). For the grid's
    real (not dry) runs and a ``verify --repair``; plain reading never moves anything."""
    moved = []
    for table in tables:
        # the reader's listing rule (temporary names start with '.'), not imported: the reader imports us
        d = Path(out_dir) / table
        listed = sorted(q for q in d.glob("*.parquet") if not q.name.startswith((".", "_"))) if d.is_dir() else []
        for p in listed:
            if check_file(p)[0] == DAMAGED:
                moved.append((p, set_aside(out_dir, p)))
    return moved


def process_start_time() -> float:
    """When this process started (epoch seconds): from /proc on Linux, else the import time of
    this module (later than the true start, so nothing this process wrote is older)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of proc(5), 'starttime', counted after the ')'
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(root: str | Path, older_than: float | None = None) -> list[Path]:
    """Remove temporary files (``.*.tmp``) under ``root`` that a process killed mid-write left.

    A file counts as stale when it is older than ``older_than`` (default: this process's start)
    and its name does not carry the pid of a live process other than this one (a second driver
    writing there now). The ``damaged/`` folder is left alone. Returns the removed paths;
    files that cannot be removed (read-only folder) are skipped."""
    root = Path(root)
    cutoff = process_start_time() if older_than is None else older_than
    removed = []
    for d, dirs, names in os.walk(root):
        if Path(d) == root:
            dirs[:] = [x for x in dirs if x != DAMAGED_DIR]
        for n in names:
            if not _TMP.match(n):
                continue
            p = Path(d) / n
            m = _TMP_PID.search(n)
            if m and int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1))):
                continue
            try:
                if p.stat().st_mtime >= cutoff:
                    continue
                p.unlink()
                removed.append(p)
            except OSError:
                continue
    return removed
