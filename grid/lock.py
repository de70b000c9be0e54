"""One driver per run folder: ``<out>/.driver.lock``, held with ``fcntl.flock`` while a
``bdgrid run`` or ``bdgrid tune`` driver works there.

A second driver on the same folder would execute every stage twice and interleave the state
file; it is refused with the first one's pid and host. The kernel drops a flock when its process
dies (SIGKILL included), so a dead driver's lock is taken over by the next run without any
clean-up. (On network file systems without flock support the lock is advisory at best; there the
folder should be on a local disk or the run made from one host.)
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".driver.lock"


class RunLocked(RuntimeError):
    """Another live driver works in this folder."""


def acquire(out: str | Path) -> int:
    """Take the folder's lock (or raise ``RunLocked``); returns the file descriptor holding it."""
    from results.writer import WriteError

    path = Path(out) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only --out: say so before anything runs
        raise WriteError.of(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise RunLocked(f"another bdgrid driver is running in {out} (pid {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')}, since {time.ctime(holder.get('since', 0))}); wait for it, "
                        f"follow it with `bdgrid status --out {out}`, or use another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
    return fd


def release(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
