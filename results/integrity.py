"""Checksums of result Parquet files and the row invariants checked whenever results are read.

**Where the checksum lives.** A sha256 in the file's own Parquet key-value metadata (key
``bdgrid.sha256``), not in a manifest beside it. Reasons: a result file is then still one file
and one atomic rename (a manifest is a second file that a crash or a ``cp`` of one result can
leave out of step with it); files stay self-checking when copied between run folders
(``load([run1, run2])`` and copying stages across runs are documented uses); and ``results/``
keeps holding only Parquet files, so ``pd.read_parquet(dir)``, ``pyarrow.dataset`` and DuckDB
still open it (they would try to read a manifest there as Parquet).

**What is hashed: every byte of the file.** A footer cannot hold the hash of bytes that
include itself, so the writer serialises the file in memory with 64 ``0`` characters in the
digest's place, hashes those bytes and writes the hex digest over the placeholder (same
length, so the Thrift footer stays valid). The reader finds the digest after its key, puts
the zeros back and hashes again. A flipped bit anywhere (a value in a data page, the schema or
offsets in the footer, the digest itself) fails the check; a truncated file loses its
``PAR1`` tail first. The footer is Thrift compact protocol (Parquet format spec,
``parquet.thrift``, ``KeyValue {1: key, 2: value}``): a 64-byte string value is encoded as the
field header ``0x18`` and the length varint ``0x40`` before its bytes, which is what
``_slot`` expects after the key.

A file without the key was written before checksums existed: it is read with the check
skipped (``Check.UNCHECKED``), its row invariants still apply.

**Row invariants** (README, section grid "Results" and section results): metrics are
fractions in [0, 1] (NaN allowed: ASR/RA of a model without backdoor test images); a ``none``
row is the backdoored model itself, so ``acc == bd_acc``, ``asr == bd_asr``, ``ra == bd_ra``
and ``der == 0.5`` wherever both sides are present.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

KEY = b"bdgrid.sha256"
PLACEHOLDER = b"0" * 64
_ENTRY = b"\x18\x40"  # Thrift compact: field 2 (binary) header, then length 64 as a varint
MAGIC = b"PAR1"

OK, UNCHECKED, DAMAGED = "ok", "unchecked", "damaged"
METRIC_COLUMNS = ("acc", "asr", "ra", "der", "bd_acc", "bd_asr", "bd_ra")
NONE_PAIRS = (("acc", "bd_acc"), ("asr", "bd_asr"), ("ra", "bd_ra"))


def _slot(blob: bytes) -> int | None:
    """Offset of the 64 hex digits of the digest, or None when the file has no digest entry."""
    i = blob.rfind(KEY)  # the last occurrence: the footer is at the end of the file
    if i < 0:
        return None
    j = i + len(KEY)
    if blob[j:j + 2] != _ENTRY or len(blob) < j + 2 + 64:
        return -1  # the key is there but its value is not a 64-byte string: damaged
    return j + 2


def seal(tbl: pa.Table) -> bytes:
    """``tbl`` as the bytes of a Parquet file that carries the sha256 of all its bytes."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, tbl.schema) as w:
        w.write_table(tbl)
        w.add_key_value_metadata({KEY: PLACEHOLDER})
    blob = sink.getvalue().to_pybytes()
    slot = _slot(blob)
    if slot is None or slot < 0 or blob[slot:slot + 64] != PLACEHOLDER:  # a pyarrow change of layout
        raise RuntimeError("results.integrity: cannot place the checksum in the Parquet footer")
    digest = hashlib.sha256(blob).hexdigest().encode()
    return blob[:slot] + digest + blob[slot + 64:]


def check_bytes(blob: bytes) -> tuple[str, str | None]:
    """(``OK`` | ``UNCHECKED`` | ``DAMAGED``, why it is damaged) for a result file's bytes."""
    n = len(blob)
    if n < 12 or blob[:4] != MAGIC or blob[-4:] != MAGIC:
        return DAMAGED, f"not a complete Parquet file ({n} bytes; no PAR1 at {'start' if blob[:4] != MAGIC else 'end'}: truncated or overwritten)"
    slot = _slot(blob)
    if slot is None:
        return UNCHECKED, None
    if slot < 0:
        return DAMAGED, f"checksum entry unreadable ({n} bytes; footer damaged)"
    stored = blob[slot:slot + 64]
    actual = hashlib.sha256(blob[:slot] + PLACEHOLDER + blob[slot + 64:]).hexdigest().encode()
    if stored != actual:
        return DAMAGED, f"checksum mismatch ({n} bytes; the file was altered or damaged after it was written)"
    return OK, None


def check_file(path: str | Path) -> tuple[str, str | None]:
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        return DAMAGED, f"unreadable ({e.strerror or e})"
    return check_bytes(blob)


def _isclose_or_both_nan(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    both_nan = pc.and_(pc.is_nan(a), pc.is_nan(b))
    return pc.or_(pc.equal(a, b), both_nan)


def invariant_violations(tbl: pa.Table) -> list[tuple[int, str]]:
    """(row index, what is wrong) for rows of a results/trials table that break an invariant.

    Vectorised: a few compute kernels over the whole table, whatever the number of files.
    Nulls are 'not present' and break nothing (sparse rows are allowed)."""
    bad: dict[int, str] = {}
    names = set(tbl.column_names)

    def note(mask, why) -> None:
        mask = pc.fill_null(mask, False)
        for i in pc.indices_nonzero(mask).to_pylist():
            bad.setdefault(i, why(i))

    for m in METRIC_COLUMNS:
        if m not in names:
            continue
        col = tbl.column(m)
        out = pc.or_(pc.less(col, 0.0), pc.greater(col, 1.0))  # NaN compares false: allowed
        note(out, lambda i, m=m, col=col: f"{m} = {col[i].as_py()!r} is not a fraction in [0, 1]")
    if "defense" in names:
        none = pc.equal(tbl.column("defense"), "none")
        for a, b in NONE_PAIRS:
            if a in names and b in names:
                ca, cb = tbl.column(a), tbl.column(b)
                differ = pc.and_(none, pc.invert(_isclose_or_both_nan(ca, cb)))
                note(differ, lambda i, a=a, b=b, ca=ca, cb=cb:
                     f"a 'none' row has {a} = {ca[i].as_py()!r} but {b} = {cb[i].as_py()!r} (must be equal)")
        if "der" in names:
            d = tbl.column("der")
            note(pc.and_(none, pc.not_equal(d, 0.5)),
                 lambda i, d=d: f"a 'none' row has der = {d[i].as_py()!r} (must be 0.5)")
    return sorted(bad.items())
