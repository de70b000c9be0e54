"""Result files under disk faults: a flipped bit in a value, truncation, header damage, files from
before checksums, broken row invariants, a full disk (a real small tmpfs), a read-only run folder
and temporary files left by a killed writer. Every file here is a real Parquet file written by
``results.write_stage`` (or by plain pyarrow, as older bdgrid versions wrote them)."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import results
from results import integrity
from results.reader import done_keys, load_checked
from results.schema import to_table
from results.writer import WriteError, atomic_write, clean_stale_tmp, set_aside_damaged, stage_path

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(grid="g", dataset="synthetic", arch="tiny_cnn", attack="badnets", pratio=0.1, target=0)
ACC = 0.6375  # the value the issue saw flip to 0.5125


def eval_rows(acc=ACC, seed=0, defense="ft"):
    rows = []
    for split in ("test", "val"):
        r = dict(BASE, seed=seed, defense=defense, split=split, acc=acc, asr=0.1, ra=0.8, der=0.9,
                 bd_acc=0.7, bd_asr=0.95, bd_ra=0.05)
        if defense == "none":
            r.update(asr=0.95, ra=0.05, bd_acc=acc, der=0.5)
        rows.append(r)
    return rows


@pytest.fixture()
def run_dir(tmp_path):
    out = tmp_path / "run"
    results.write_stage(out, "eval", "k1", eval_rows())
    results.write_stage(out, "eval", "k2", eval_rows(acc=0.81, seed=1))
    return out


def flip_value_bit(path: Path, value: float, bit: int = 52 - 2) -> None:
    """Flip one bit inside the stored 8 bytes of ``value`` (plain little-endian double in a data or
    dictionary page; the pages are small enough that snappy leaves them as literals)."""
    blob = bytearray(path.read_bytes())
    raw = struct.pack("<d", value)
    i = blob.find(raw)
    assert i >= 0, "the value is not stored literally; the test would not flip a value"
    blob[i + bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(blob))


def test_a_bit_flip_in_a_value_is_detected_and_the_stage_is_not_done(run_dir, capsys):
    path = stage_path(run_dir, "eval", "k1")
    assert done_keys(run_dir) == {"k1", "k2"}
    flip_value_bit(path, ACC)
    # without the check the file reads fine and says another number: the silent wrong result
    plain = pq.read_table(path).column("acc").to_pylist()
    assert plain[0] != ACC and 0 <= plain[0] <= 1
    assert integrity.check_file(path)[0] == integrity.DAMAGED
    df = results.load(run_dir)
    assert set(df["key"]) == {"k2"} and ACC not in set(df["acc"])
    assert done_keys(run_dir) == {"k2"}
    err = capsys.readouterr().err
    assert err.count(str(path)) == 1 and "checksum mismatch" in err  # named once, not per read
    # set aside, not deleted; then the stage is reported not done and nothing damaged is left
    moved = set_aside_damaged(run_dir)
    assert [(src, dst.parent) for src, dst in moved] == [(path, run_dir / "damaged" / "results")]
    assert not path.exists() and moved[0][1].read_bytes() != b""
    assert done_keys(run_dir) == {"k2"}


@pytest.mark.parametrize("damage", ["truncate", "header", "footer", "digest", "empty", "garbage"])
def test_damaged_files_are_named_and_left_out_without_a_traceback(run_dir, damage, capsys):
    path = stage_path(run_dir, "eval", "k1")
    blob = path.read_bytes()
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "header":
        blob = b"\0" * 16 + blob[16:]
    elif damage == "footer":  # inside the Thrift footer (schema / offsets), checksum entry intact
        i = blob.rfind(b"PAR1") - 200
        blob = blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:]
    elif damage == "digest":
        i = blob.rfind(integrity.KEY) + len(integrity.KEY) + 2
        blob = blob[:i] + (b"1" if blob[i:i + 1] != b"1" else b"2") + blob[i + 1:]
    elif damage == "empty":
        blob = b""
    else:
        blob = b"this is not parquet\n" * 50
    path.write_bytes(blob)
    df = results.load(run_dir)
    assert set(df["key"]) == {"k2"} and len(df) == 2
    assert done_keys(run_dir) == {"k2"}
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_a_rewrite_sets_the_damaged_file_aside_and_the_number_is_back(run_dir):
    path = stage_path(run_dir, "eval", "k1")
    flip_value_bit(path, ACC)
    damaged = path.read_bytes()
    results.write_stage(run_dir, "eval", "k1", eval_rows())  # what the grid does for a not-done stage
    (kept,) = (run_dir / "damaged" / "results").iterdir()
    assert kept.read_bytes() == damaged
    df = results.load(run_dir)
    assert sorted(df[df.key == "k1"]["acc"]) == [ACC, ACC] and done_keys(run_dir) == {"k1", "k2"}


def test_a_file_without_checksum_still_loads_and_is_said_once(run_dir, capsys):
    old = run_dir / "results" / "eval-old.parquet"
    pq.write_table(to_table([dict(r, stage="eval", key="old", schema_version=2) for r in eval_rows(0.5, seed=7)]), old)
    assert integrity.check_file(old) == (integrity.UNCHECKED, None)
    for _ in range(2):
        df = results.load(run_dir)
        assert set(df["key"]) == {"k1", "k2", "old"}
    assert done_keys(run_dir) == {"k1", "k2", "old"}
    err = capsys.readouterr().err
    assert err.count("carry no checksum") == 1 and "1 result file(s)" in err


def test_unchecked_files_are_still_held_to_the_row_invariants(run_dir, capsys):
    """An old file cannot be checksummed; a flip there that breaks an invariant is still caught."""
    rows = [dict(r, stage="eval", key=k, schema_version=2) for k, r in
            [("none-ok", eval_rows(0.9, defense="none")[0]), ("none-bad", dict(eval_rows(0.9, defense="none")[0], acc=0.6)),
             ("range", dict(eval_rows()[0], asr=1.5)), ("der", dict(eval_rows(0.9, defense="none")[0], der=0.7))]]
    for r in rows:
        pq.write_table(to_table([r]), run_dir / "results" / f"eval-{r['key']}.parquet")
    tbl, report = load_checked(run_dir)
    assert set(tbl.column("key").to_pylist()) == {"k1", "k2", "none-ok"}
    why = {p.name: w for p, w in report.damaged}
    assert "acc = 0.6 but bd_acc = 0.9" in why["eval-none-bad.parquet"]
    assert "asr = 1.5 is not a fraction" in why["eval-range.parquet"]
    assert "der = 0.7 (must be 0.5)" in why["eval-der.parquet"]


def test_a_file_of_a_newer_schema_is_an_error_naming_it_not_damage(run_dir):
    p = run_dir / "results" / "eval-new.parquet"
    pq.write_table(to_table([dict(eval_rows()[0], stage="eval", key="new")]).drop_columns(["schema_version"])
                   .append_column("schema_version", __import__("pyarrow").array([99], "int32")), p)
    with pytest.raises(ValueError, match="eval-new.parquet.*newer"):
        results.load(run_dir)


def test_stale_temporary_files_are_cleaned_fresh_and_live_ones_kept(tmp_path):
    out = tmp_path / "run"
    (out / "results").mkdir(parents=True)
    (out / "artifacts" / "attack" / "ab").mkdir(parents=True)
    (out / "damaged").mkdir()
    old = [out / "results" / ".eval-k.parquet.999999.0123456789abcdef0123456789abcdef.tmp",
           out / "artifacts" / "attack" / "ab" / ".abkey.0123456789abcdef0123456789abcdef.tmp",
           out / ".state.json.deadbeef.tmp"]
    live = out / "results" / f".eval-j.parquet.1.{'0' * 32}.tmp"  # pid 1 is alive: a second writer
    keep = [out / "damaged" / ".x.tmp", out / "results" / "eval-k.parquet", live]
    for p in old + keep:
        p.write_bytes(b"x")
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    fresh = out / "results" / ".eval-f.parquet.tmp"
    fresh.write_bytes(b"x")  # newer than this process: could be a write in progress
    removed = clean_stale_tmp(out, older_than=time.time() - 60)
    assert sorted(removed) == sorted(old)
    assert all(p.exists() for p in keep + [fresh])
    assert not clean_stale_tmp(out)  # the default cutoff (process start) keeps the rest too


def _in_mount_namespace(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a private mount namespace (needs root / CAP_SYS_ADMIN), or skip."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe_dir}"],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"cannot make a private mount here: {probe.stderr.strip() if probe else 'no unshare'}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120)


FULL_DISK = """
import os, sys
import results
from results.writer import WriteError, clean_stale_tmp
out = sys.argv[1]
rows = [dict(attack="badnets", defense="none", split=s, acc=0.5, bd_acc=0.5, extra_blob=os.urandom(20000).hex()) for s in ("test", "val")]
n = 0
try:
    while True:
        results.write_stage(out, "eval", f"k{n}", rows)
        n += 1
except WriteError as e:
    print("WRITEERROR", n, e.errno, e)
left = [f for d, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
print("TMP", len(left))
df = results.load(out)
print("ROWS", len(df), df["key"].nunique())
"""


def test_full_disk_is_one_write_error_naming_the_path_and_no_temp_file_is_left(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    r = _in_mount_namespace(f"mount -t tmpfs -o size=256k tmpfs {mnt} && {sys.executable} {script} {mnt}/run", tmp_path)
    assert r.returncode == 0, r.stderr
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines())
    n, code, msg = lines["WRITEERROR"].split(" ", 2)
    assert int(n) >= 1 and int(code) == 28  # ENOSPC, after some files fitted
    assert f"{mnt}/run/results/eval-k{n}.parquet" in msg and "the disk is full" in msg
    assert lines["TMP"] == "0"
    assert lines["ROWS"] == f"{2 * int(n)} {n}"  # every file written before the fault is intact
    assert "Traceback" not in r.stderr


READ_ONLY = """
set -e
mount --bind {run} {run} && mount -o remount,ro,bind {run}
{py} -c "import sys, results; from results.writer import WriteError
try:
    results.write_stage('{run}', 'eval', 'x', [dict(acc=0.5)])
except WriteError as e:
    print('WRITEERROR', e.errno, e)"
{py} -m grid.cli table --out {run} --metrics acc
{py} -m grid.cli plot --out {run} --kind acc-asr --dest {dest} > /dev/null
{py} -m grid.cli plot --out {run} --kind acc-asr || echo "PLOT_RC $?"
"""


def test_table_and_plot_work_on_a_read_only_run_folder_with_a_damaged_file(run_dir, tmp_path):
    flip_value_bit(stage_path(run_dir, "eval", "k1"), ACC)
    before = sorted(p.name for p in run_dir.rglob("*"))
    script = READ_ONLY.format(run=run_dir, py=sys.executable, dest=tmp_path / "fig")
    r = _in_mount_namespace(script, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "WRITEERROR 30" in r.stdout and "read-only" in r.stdout
    assert "81.0" in r.stdout and "72.4" not in r.stdout  # the damaged seed is out, not a wrong number
    assert r.stderr.count("damaged result file") >= 1 and "Traceback" not in r.stderr
    assert str(stage_path(run_dir, "eval", "k1")) in r.stderr
    assert (tmp_path / "fig").is_dir() and any((tmp_path / "fig").iterdir())
    assert "PLOT_RC 1" in r.stdout and "--dest" in r.stderr  # the default figures folder is inside the run
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # reading changed nothing


def test_atomic_write_keeps_the_old_file_when_the_new_one_cannot_be_written(tmp_path):
    p = tmp_path / "state.json"
    atomic_write(p, b"old")
    (tmp_path / "sub").write_text("a file where a folder is needed")
    with pytest.raises(WriteError, match="sub/x"):
        atomic_write(tmp_path / "sub" / "x", b"new")
    assert p.read_bytes() == b"old" and not list(tmp_path.glob(".*.tmp"))
