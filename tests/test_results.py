"""The results dataset: schema round trip, provenance, atomic writes, dedupe, mixed schema versions,
curves. Fixtures are Parquet files written directly (no training), so this runs in seconds."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import results
from results.schema import SCHEMA_VERSION, SCHEMAS

ROW = dict(grid="g1", dataset="synthetic", arch="tiny_cnn", attack="badnets", attack_params={"size": 3},
           pratio=0.1, target=0, seed=1, defense="tsbd", params={"n": 0.1, "alpha": 0.7}, split="test",
           acc=0.91, asr=0.02, ra=0.85, der=0.96, bd_acc=0.93, bd_asr=0.97, bd_ra=0.02,
           spec_hash="abc123", device="cpu", wall_s=12.5, peak_mem_mb=300.0,
           started_at=1_700_000_000.0, ended_at="2023-11-14T22:13:32+00:00", n_poison=400)


def test_schema_round_trip(tmp_path):
    path = results.write_stage(tmp_path, "defense", "k1", [ROW])
    assert path == tmp_path / "results" / "defense-k1.parquet"
    assert pq.read_schema(path).equals(SCHEMAS["results"])  # the file carries exactly the schema
    df = results.load(tmp_path)
    assert len(df) == 1
    r = df.iloc[0]
    for k in ("grid", "dataset", "arch", "attack", "defense", "split", "spec_hash", "device"):
        assert r[k] == ROW[k]
    for k in ("pratio", "acc", "asr", "ra", "der", "bd_acc", "bd_asr", "bd_ra", "wall_s", "peak_mem_mb"):
        assert r[k] == pytest.approx(ROW[k])
    assert (r["target"], r["seed"]) == (0, 1)
    assert (r["stage"], r["key"]) == ("defense", "k1")
    # dicts are stored as canonical (sorted-key) JSON, so equal params group together in tables
    assert r["params"] == '{"alpha":0.7,"n":0.1}'
    assert json.loads(r["attack_params"]) == {"size": 3}
    # times: epoch seconds and ISO strings both become aware UTC timestamps
    assert r["started_at"] == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")
    assert r["ended_at"] == pd.Timestamp("2023-11-14T22:13:32Z")
    assert (pd.Timestamp.now(tz="UTC") - r["written_at"]).total_seconds() < 60
    # provenance the writer fills; unknown keys kept in `extra` and expanded on load
    assert r["version"] == metadata.version("bdgrid")
    assert r["git_commit"] is None or len(r["git_commit"].split("+")[0]) == 40
    assert r["schema_version"] == SCHEMA_VERSION
    assert json.loads(r["extra"]) == {"n_poison": 400}
    assert r["n_poison"] == 400


def test_files_open_with_plain_pandas_and_pyarrow_dataset(tmp_path):
    results.write_stage(tmp_path, "eval", "a", [dict(ROW, seed=0)])
    results.write_stage(tmp_path, "eval", "b", [dict(attack="blended", defense="none", seed=1, acc=0.9)])  # sparse row
    (tmp_path / "results" / ".eval-c.parquet.123.tmp").write_bytes(b"half a file")  # a crashed write
    d = tmp_path / "results"
    pdf = pd.read_parquet(d)
    assert sorted(pdf["key"]) == ["a", "b"]
    t = ds.dataset(d, format="parquet").to_table()
    assert t.num_rows == 2 and t.schema.equals(SCHEMAS["results"])


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError)):
        results.write_stage(tmp_path, "eval", "bad", [dict(ROW, acc="not a number")])
    assert list((tmp_path / "results").glob("*")) == []  # neither the final name nor a temp file


def test_rewritten_stage_replaces_old_rows(tmp_path):
    results.write_stage(tmp_path, "eval", "k", [dict(ROW, acc=0.50)])
    results.write_stage(tmp_path, "eval", "k", [dict(ROW, acc=0.70)])
    df = results.load(tmp_path)
    assert len(df) == 1 and df["acc"].iloc[0] == pytest.approx(0.70)


def test_dedupe_latest_write_wins_across_run_dirs(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    results.write_stage(old, "eval", "k", [dict(ROW, acc=0.50)])
    results.write_stage(new, "eval", "k", [dict(ROW, acc=0.70)])
    results.write_stage(new, "eval", "other", [dict(ROW, acc=0.10)])
    # same key copied in under another file name (e.g. merging runs): the reader dedupes
    shutil.copy(old / "results" / "eval-k.parquet", new / "results" / "eval-k-copy.parquet")
    raw = results.load(new, dedup=False)
    assert len(raw) == 3
    df = results.load(new)
    assert sorted(df["acc"].round(2)) == [0.10, 0.70]
    both = results.load([old, new])
    assert sorted(both["acc"].round(2)) == [0.10, 0.70]


def test_dedupe_keeps_every_row_of_one_write_and_each_split(tmp_path):
    rows = [dict(ROW, split="test", acc=0.9), dict(ROW, split="val", acc=0.8)]
    results.write_stage(tmp_path, "eval", "k", rows)
    results.write_stage(tmp_path, "sweep", "s", [dict(ROW, params={"n": n}, acc=a) for n, a in [(0.1, 0.9), (0.2, 0.85)]])
    df = results.load(tmp_path)
    assert sorted(df[df["key"] == "k"]["split"]) == ["test", "val"]
    assert sorted(df[df["key"] == "s"]["acc"].round(2)) == [0.85, 0.9]


def _write_v1(path, rows):
    """A file as the first minimal writer made it: flat row keys, written_at in epoch seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_reads_a_dataset_mixing_schema_versions(tmp_path):
    v1 = dict(dataset="synthetic", arch="tiny_cnn", attack="blended", pratio=0.1, target=0, seed=0.0,
              defense="none", params="{}", split="test", acc=0.88, asr=0.99, ra=0.01, der=0.5, bd_acc=0.88,
              bd_asr=0.99, wall_s=3.0, device="cpu", version="0.0.9", n_poison=400,
              stage="eval", key="old", schema_version=1, written_at=1_600_000_000.5)
    _write_v1(tmp_path / "results" / "eval-old.parquet", [v1])
    # a v1 file of a stage that was later re-run under v2: the v2 rows must win
    _write_v1(tmp_path / "results" / "eval-rerun-v1.parquet", [dict(v1, key="rerun", acc=0.10)])
    results.write_stage(tmp_path, "eval", "rerun", [dict(ROW, acc=0.91)])
    results.write_stage(tmp_path, "eval", "new", [ROW])

    df = results.load(tmp_path).set_index("key")
    assert sorted(df.index) == ["new", "old", "rerun"]
    old = df.loc["old"]
    assert old["schema_version"] == 1 and df.loc["new", "schema_version"] == SCHEMA_VERSION
    assert old["written_at"] == pd.Timestamp(1_600_000_000.5, unit="s", tz="UTC")
    assert old["seed"] == 0 and old["version"] == "0.0.9" and old["acc"] == pytest.approx(0.88)
    assert pd.isna(old["grid"]) and pd.isna(old["spec_hash"])  # columns v1 did not have
    assert json.loads(old["extra"]) == {"n_poison": 400}
    assert df.loc["rerun", "acc"] == pytest.approx(0.91)


def test_rejects_files_from_a_newer_schema(tmp_path):
    _write_v1(tmp_path / "results" / "x.parquet", [dict(key="x", schema_version=SCHEMA_VERSION + 1)])
    with pytest.raises(ValueError, match="newer"):
        results.load(tmp_path)


def test_empty_or_missing_directory_gives_empty_frame_with_columns(tmp_path):
    df = results.load(tmp_path / "nothing")
    assert df.empty and {"attack", "defense", "acc", "asr", "key"} <= set(df.columns)


def test_curves_table_melts_per_epoch_rows(tmp_path):
    hist = [{"epoch": e, "loss": 1.0 / e, "train_acc": 0.5 + e / 10, "lr": 0.01, "note": "text"} for e in (1, 2, 3)]
    ident = dict(attack="badnets", defense="tsbd", seed=0, phase="finetune")
    results.write_stage(tmp_path, "defense", "k", [dict(ident, **h) for h in hist], table="curves")
    c = results.load(tmp_path, table="curves")
    assert set(c["metric"]) == {"loss", "train_acc", "lr"}  # non-numeric values are not curves
    loss = c[c["metric"] == "loss"].sort_values("epoch")
    assert list(loss["epoch"]) == [1, 2, 3]
    assert list(loss["value"]) == pytest.approx([1.0, 0.5, 1 / 3])
    assert set(c["phase"]) == {"finetune"} and set(c["key"]) == {"k"}
    assert pq.read_schema(tmp_path / "curves" / "defense-k.parquet").equals(SCHEMAS["curves"])
    assert results.load(tmp_path).empty  # the results table is separate


def test_results_package_does_not_import_torch_ray_or_defense():
    code = ("import sys, results, results.tables, results.plots, results.results_cli; "
            "bad = [m for m in ('torch', 'ray', 'optuna', 'defense') if m in sys.modules]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_times_accept_datetimes():
    from results.schema import to_timestamp

    naive = dt.datetime(2024, 1, 2, 3, 4, 5)
    assert to_timestamp(naive) == naive.replace(tzinfo=dt.timezone.utc)
    assert to_timestamp(None) is None


def test_trials_table_is_kept_apart_from_results(tmp_path):
    row = dict(ROW, split="val", study="s1", trial=3)
    results.write_stage(tmp_path, "tune-trial", "t3", [row], table="trials")
    t = results.load(tmp_path, table="trials")
    assert len(t) == 1 and t["trial"].iloc[0] == 3 and t["split"].iloc[0] == "val"
    assert results.load(tmp_path).empty
    with pytest.raises(ValueError, match="unknown results table"):
        results.write_stage(tmp_path, "x", "k", [ROW], table="nope")
