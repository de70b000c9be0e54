"""One driver per run folder: a second is refused naming the first; a dead driver's lock is taken over."""
from __future__ import annotations

import signal
from pathlib import Path
import subprocess
import sys
import time

import pytest

SPEC = """\
name: locked
datasets: [{name: synthetic, params: {n_train: 300, n_test: 100}}]
archs: [tiny_cnn]
attacks: [badnets]
epochs: 1
"""


def test_second_driver_is_refused_with_the_first_ones_pid_and_host(tmp_path):
    import os
    import socket

    from grid import lock
    from grid.run import execute_plan
    from grid.spec import parse_spec

    out = tmp_path / "out"
    out.mkdir()
    fd = lock.acquire(out)
    try:
        ls, problems = parse_spec(SPEC, "spec.yaml", tmp_path)
        assert not problems
        with pytest.raises(lock.RunLocked) as e:
            execute_plan(ls, out, show_progress=False)  # refused before any stage is submitted
        msg = str(e.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and str(out) in msg
        assert not (out / "executed.log").exists() and not (out / "state.json").exists()
    finally:
        lock.release(fd)
    lock.release(lock.acquire(out))  # free again once the first driver let go


def test_lock_of_a_killed_driver_is_taken_over(tmp_path):
    from grid import lock

    code = ("import sys, time; sys.path.insert(0, '.'); from grid import lock; lock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(lock.RunLocked, match=f"pid {p.pid}"):
            lock.acquire(tmp_path)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's flock; no clean-up needed
        try:
            lock.release(lock.acquire(tmp_path))
            break
        except lock.RunLocked:
            assert time.time() < deadline
            time.sleep(0.1)


def test_a_read_only_out_is_one_message_before_any_compute(tmp_path):
    """`bdgrid run` into a read-only folder (a read-only bind mount in a private mount namespace):
    exit 1, the folder named, no traceback, and Ray never started."""
    import shutil

    if not shutil.which("unshare"):
        pytest.skip("no unshare here")
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    ro = tmp_path / "ro"
    ro.mkdir()
    bdgrid = str(Path(sys.executable).parent / "bdgrid")
    script = (f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} {ro} && "
              f"{bdgrid} run {spec} --out {ro}/out -q")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if "mount" in r.stderr and "permission denied" in r.stderr.lower():
        pytest.skip(f"mount namespaces not permitted here: {r.stderr.strip()[:200]}")
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    text = " ".join((r.stdout + r.stderr).split())
    assert f"cannot write {ro}/out" in text and "read-only" in text and "Traceback" not in text
    assert "Token authentication" not in text and "ray" not in text.lower()  # refused before Ray started


def _hammer(root: str, seed: int, n: int) -> None:
    import torch

    from grid.store import ArtifactStore

    store = ArtifactStore(root)
    for i in range(n):
        # the same key always carries the same content (keys are content hashes of their inputs)
        store.put("attack", f"k{i % 3:063d}", {"w": torch.arange(20000, dtype=torch.float32) + i % 3})


def test_two_runs_sharing_an_artifact_root_write_one_key_at_once_safely(tmp_path):
    """No lock on a shared artifact root (README, design notes): two drivers (separate --out) that
    need the same model may both compute it; each write is a private temporary file renamed over
    the content-keyed name, so the racing writes leave one intact artifact and no temporary file."""
    import multiprocessing as mp

    import torch

    from grid.store import ArtifactStore

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), s, 60)) for s in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = ArtifactStore(tmp_path)
    for i in range(3):
        assert torch.equal(store.get("attack", f"k{i:063d}")["w"], torch.arange(20000, dtype=torch.float32) + i)
    assert not list(Path(tmp_path).rglob("*.tmp"))
