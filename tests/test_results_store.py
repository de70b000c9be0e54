"""The results store at scale: compaction of per-stage files into checksummed parts (and crashes
at every point of it), deduplication across both layouts, reading only the asked columns, the
done-key read of a resume, and stage keys built without re-encoding. Every file is written by
the real ``results.write_stage`` or the real compaction; a crash is a real killed process."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import results
from results import compact as store
from results.integrity import OK, check_file
from results.reader import load_checked, load_report
from results.writer import stage_path

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(grid="g", dataset="synthetic", arch="tiny_cnn", pratio=0.1, target=0)


def eval_rows(i: int, acc: float = 0.8, **extra) -> list[dict]:
    attack, defense = ("badnets", "blended")[i % 2], ("ft", "nad")[(i // 2) % 2]
    return [dict(BASE, attack=attack, defense=defense, seed=i // 4, split=s, acc=acc, asr=0.1, ra=0.7,
                 der=0.9, bd_acc=0.85, bd_asr=0.97, bd_ra=0.02, **extra) for s in ("test", "val")]


def write_evals(out: Path, n: int, start: int = 0, **kw) -> None:
    for i in range(start, start + n):
        results.write_stage(out, "eval", f"k{i:04d}", eval_rows(i, **kw))


def rows_of(out: Path) -> pd.DataFrame:
    """The deduplicated rows, in a fixed order, without the columns that name files or times."""
    df = results.load(out)
    return df.sort_values(["key", "split"]).reset_index(drop=True)


def test_compaction_folds_small_files_into_one_checksummed_part_with_the_same_rows(tmp_path):
    out = tmp_path / "run"
    write_evals(out, 40)
    before = rows_of(out)
    done = store.compact(out)
    assert done is not None and len(done.removed) == 40 and done.rows == 80 and not done.left
    (part,) = done.parts
    assert store.small_files(out) == [] and store.is_part(part)
    assert check_file(part)[0] == OK  # the part carries a sha256 footer like a stage file
    pd.testing.assert_frame_equal(rows_of(out), before)
    assert results.done_keys(out) == {f"k{i:04d}" for i in range(40)}
    # plain pandas / pyarrow read the folder as one dataset in either layout
    assert len(pd.read_parquet(out / "results")) == 80


def test_a_crash_after_the_part_is_written_loses_nothing_and_counts_nothing_twice(tmp_path):
    """The state a kill leaves between the part's rename and the removal of the files it was made
    from: both on disk. The reader keeps one copy; the next compaction folds them again."""
    out = tmp_path / "run"
    write_evals(out, 12)
    before = rows_of(out)
    saved = tmp_path / "saved"
    shutil.copytree(out / "results", saved)
    store.compact(out)
    for p in saved.iterdir():  # the small files back beside their part
        shutil.copy2(p, out / "results" / p.name)
    assert len(pd.read_parquet(out / "results")) == 2 * len(before)  # really twice on disk
    pd.testing.assert_frame_equal(rows_of(out), before)
    assert results.done_keys(out) == set(before["key"])
    again = store.compact(out)
    assert len(again.removed) == 13 and again.rows == len(before)  # 12 files + the old part
    assert len(pd.read_parquet(out / "results")) == len(before)
    pd.testing.assert_frame_equal(rows_of(out), before)


CRASH = """
import os, sys
from pathlib import Path
import results.compact as c
n = {"k": 0}
real = Path.unlink
def unlink(self, missing_ok=False):
    n["k"] += 1
    if n["k"] > int(sys.argv[2]):
        os._exit(137)  # killed in the middle of removing the inputs
    return real(self, missing_ok=missing_ok)
Path.unlink = unlink
c.compact(sys.argv[1])
"""


@pytest.mark.parametrize("removed_before_kill", [0, 5])
def test_a_process_killed_while_removing_inputs_leaves_a_readable_store(tmp_path, removed_before_kill):
    out = tmp_path / "run"
    write_evals(out, 10)
    before = rows_of(out)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", CRASH, str(out), str(removed_before_kill)], env=env)
    assert r.returncode == 137
    assert len(store.small_files(out)) == 10 - removed_before_kill and len(list((out / "results").glob("part-*"))) == 1
    pd.testing.assert_frame_equal(rows_of(out), before)
    assert results.done_keys(out) == set(before["key"])


def test_a_process_killed_while_writing_the_part_leaves_only_a_skipped_temp_file(tmp_path):
    out = tmp_path / "run"
    write_evals(out, 6)
    before = rows_of(out)
    kill_in_write = CRASH.replace("c.compact(sys.argv[1])", "import results.writer as w\n"
                                  "real_replace = os.replace\n"
                                  "def replace(a, b):\n    os._exit(137)\n"
                                  "os.replace = replace\nc.compact(sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", kill_in_write, str(out), "99"], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 137
    assert [p.name for p in (out / "results").iterdir() if p.name.startswith(".part-")]  # the half-made part
    assert len(store.small_files(out)) == 6
    pd.testing.assert_frame_equal(rows_of(out), before)


def test_a_stage_rewritten_after_compaction_replaces_its_compacted_rows(tmp_path):
    out = tmp_path / "run"
    write_evals(out, 4)
    store.compact(out)
    results.write_stage(out, "eval", "k0001", eval_rows(1, acc=0.55))
    df = rows_of(out)
    assert len(df) == 8 and df[df.key == "k0001"]["acc"].tolist() == [0.55, 0.55]
    store.compact(out)  # the part under MERGE_BELOW rows and the new file: one part, newest rows
    assert len(pd.read_parquet(out / "results")) == 8
    assert rows_of(out)[lambda d: d.key == "k0001"]["acc"].tolist() == [0.55, 0.55]


def test_a_damaged_file_is_left_out_of_the_part_and_stays_for_the_grid(tmp_path):
    out = tmp_path / "run"
    write_evals(out, 5)
    victim = stage_path(out, "eval", "k0002")
    victim.write_bytes(victim.read_bytes()[:-30])  # truncated
    done = store.compact(out)
    assert done.left == [victim] and victim.exists() and len(done.removed) == 4
    assert results.done_keys(out) == {"k0000", "k0001", "k0003", "k0004"}


def test_a_damaged_part_makes_its_stages_not_done_and_a_run_sets_it_aside(tmp_path):
    from grid.run import done_evals

    out = tmp_path / "run"
    write_evals(out, 5)
    (part,) = store.compact(out).parts
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    part.write_bytes(bytes(blob))
    write_evals(out, 1, start=5)
    assert done_evals(out) == {"k0005": {"test", "val"}}  # a dry run: nothing moved
    assert part.exists()
    moved: list = []
    assert set(done_evals(out, moved)) == {"k0005"}
    assert moved and moved[0][0] == part and not part.exists()
    assert (out / "damaged" / "results" / part.name).read_bytes() == bytes(blob)


def test_table_compaction_waits_for_a_driver_and_leaves_a_read_only_folder_alone(tmp_path):
    from grid import lock

    out = tmp_path / "run"
    write_evals(out, 4)
    fd = lock.acquire(out)
    try:
        assert store.maybe_compact(out, at=2) is None and len(store.small_files(out)) == 4
    finally:
        lock.release(fd)
    os.chmod(out / "results", 0o555)
    try:
        if not os.access(out / "results", os.W_OK):  # root writes anyway; the check is then moot
            assert store.maybe_compact(out, at=2) is None and len(store.small_files(out)) == 4
    finally:
        os.chmod(out / "results", 0o755)
    assert store.maybe_compact(out, at=2).rows == 8 and store.small_files(out) == []
    assert store.maybe_compact(out, at=2) is None  # nothing small left


def test_reads_only_the_asked_columns_and_extra_keys(tmp_path):
    out = tmp_path / "run"
    for i in range(3):
        results.write_stage(out, "eval", f"k{i}", eval_rows(i, bd_digest="abc", n=0.3))
    df, _ = load_report(out, columns=["attack", "defense", "acc"], extra=["n"])
    assert set(df.columns) == {"attack", "defense", "acc", "n"}  # what was asked, nothing read for the reading
    assert df["n"].tolist() == [0.3] * 6 and "bd_digest" not in df.columns
    tbl, _ = load_checked(out, columns=("key", "split"))
    assert tbl.column_names == ["key", "split"] and tbl.num_rows == 6
    full = results.load(out)  # the default still reads everything and expands every extra key
    assert {"bd_digest", "n", "version", "git_commit"} <= set(full.columns)


def test_one_write_keeps_all_its_rows_and_copies_of_a_write_count_once(tmp_path):
    out, other = tmp_path / "a", tmp_path / "b"
    results.write_stage(out, "eval", "k", eval_rows(0) + eval_rows(0, acc=0.7))  # 2 rows per split, one write
    assert len(results.load(out)) == 4
    shutil.copytree(out, other)
    (other / "results" / "eval-k.parquet").rename(other / "results" / "copy-k.parquet")
    assert len(results.load([out, other])) == 4  # the same write in two folders: once


def test_table_cli_prints_the_same_table_from_small_files_and_from_parts(tmp_path):
    from typer.testing import CliRunner

    from grid.cli import app

    out = tmp_path / "run"
    write_evals(out, 16)
    runner = CliRunner()
    small = runner.invoke(app, ["table", "--out", str(out)])
    assert small.exit_code == 0, small.output
    store.compact(out)
    parts = runner.invoke(app, ["table", "--out", str(out)])
    assert parts.stdout == small.stdout and "BadNets" in parts.stdout


def test_duckdb_reads_the_store_where_installed(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    out = tmp_path / "run"
    write_evals(out, 4)
    store.compact(out)
    write_evals(out, 2, start=4)
    [(n,)] = duckdb.sql(f"select count(*) from '{out}/results/*.parquet' where split = 'test'").fetchall()
    assert n == 6


def test_stage_keys_are_the_sha256_of_the_canonical_json_of_the_whole_stage():
    """grid.plan.stage_key writes the outer JSON by hand; it must equal canon() of the dict, or
    every artifact of every earlier run would be recomputed."""
    from grid.plan import CODE_VERSION, build_plan
    from grid.spec import canon, parse_spec

    ls, probs = parse_spec("name: k\ndatasets: [synthetic]\narchs: [tiny_cnn]\nattacks: [badnets, wanet, lf]\n"
                           "seeds: [0, 1]\ndefenses: [none, ft, {name: tsbd, sweep: {n: [0.1, 0.3]}}]\n")
    assert not probs
    plan = build_plan(ls)
    assert len(plan.stages) > 20 and plan.of_kind("resource")  # lf: a resource stage holding the recipe
    for s in plan.stages.values():
        blob = canon({"kind": s.kind, "version": CODE_VERSION[s.kind], "config": s.config, "parents": list(s.parents)})
        assert s.key == hashlib.sha256(blob.encode()).hexdigest(), s.label
    # a resolved params dict handed to one stage is its own: changing it changes no other stage
    evals = plan.of_kind("eval")
    evals[0].config["params"]["__probe"] = 1
    assert all("__probe" not in e.config["params"] for e in evals[1:])
