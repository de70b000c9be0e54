"""`bdgrid status`: the run state read back from disk, no Ray needed."""
from __future__ import annotations


def test_status_reads_the_state_from_disk(tmp_path):
    """`bdgrid status` from another terminal: counts per stage kind (queued apart from running),
    and a driver that died is reported as stopped, not running."""
    import subprocess as sp
    import sys

    from typer.testing import CliRunner

    from grid.cli import app
    from grid.status import write_state

    dead = sp.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    counts = {"attack": {"total": 4, "cached": 0, "done": 1, "running": 2, "queued": 1, "pending": 0,
                         "failed": 0, "skipped": 0}}
    write_state(tmp_path, {"grid": "g", "spec_hash": "abc", "pid": dead.pid, "finished": False,
                           "elapsed_s": 61.0, "eta_s": 120.0, "counts": counts})
    r = CliRunner().invoke(app, ["status", "--out", str(tmp_path)], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert "stopped (driver gone; rerun to resume)" in r.output
    header = next(ln for ln in r.output.splitlines() if ln.startswith("stage"))
    assert header.split() == ["stage", "total", "cached", "done", "running", "queued", "pending", "failed", "skipped"]
    row = next(ln for ln in r.output.splitlines() if ln.startswith("attack"))
    assert row.split() == ["attack", "4", "0", "1", "2", "1", "0", "0", "0"]
    assert "elapsed 1m01s" in r.output
    missing = CliRunner().invoke(app, ["status", "--out", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "no grid state" in missing.output


def test_status_of_a_run_that_ended_with_failures_says_so_and_exits_1(tmp_path):
    from typer.testing import CliRunner

    from grid.cli import app
    from grid.status import write_state

    counts = {"defense": {"total": 2, "cached": 0, "done": 1, "running": 0, "queued": 0, "pending": 0,
                          "failed": 1, "skipped": 0}}
    failure = {"stage": "defense[synthetic tiny_cnn badnets ft]", "error": "RuntimeError: boom",
               "file": str(tmp_path / "failures" / "defense-abc.txt")}
    write_state(tmp_path, {"grid": "g", "pid": 1, "finished": True, "elapsed_s": 5.0, "counts": counts,
                           "failures": [failure]})
    r = CliRunner().invoke(app, ["status", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 1, r.output
    assert "RuntimeError: boom" in r.output and "defense-abc.txt" in r.output and "1 failed stage" in r.output
