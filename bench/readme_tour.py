"""Run every command of the README's command-line tour as a new user would, and time it.

The commands are read from README.md (the ``bash`` block under "A tour of the command line", lines
starting with ``$B``), so the README and this measurement cannot drift apart. Each runs in order
in one folder (a fresh clone, by default a temporary one made from this checkout), under a
pseudo-terminal as in a user's shell, and the script prints per command: exit code, wall seconds,
CPU seconds of the command and its children, and the **longest silence**: the longest stretch with
no byte written to the terminal (issue 15: no command may wait silently for more than a few
seconds).

Placeholders are filled the way a user would: ``<defense_key of a row>`` from the run's results,
``[--repair]`` left out.

    .venv/bin/python bench/readme_tour.py                 # fresh clone in a temp dir, ~40 min on 2 cores
    .venv/bin/python bench/readme_tour.py --only trial,table --keep /tmp/tour
"""
from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tour_commands(readme: Path) -> list[str]:
    text = readme.read_text()
    start = text.index("### A tour of the command line")
    block = text[start:].split("```bash", 1)[1].split("```", 1)[0]
    cmds = []
    for ln in block.splitlines():
        ln = ln.split("  #", 1)[0].strip()
        if ln.startswith("$B "):
            cmds.append(ln[3:].replace("[--repair]", "").strip())
    return cmds


def fill(cmd: str, cwd: Path) -> str:
    if "<defense_key of a row>" in cmd:
        import pandas as pd

        df = pd.read_parquet(cwd / "runs" / "q" / "results", columns=["defense_key"])
        key = next(k for k in df["defense_key"] if isinstance(k, str) and k)
        cmd = cmd.replace("<defense_key of a row>", key)
    return cmd


def run_in_pty(argv: list[str], cwd: Path, timeout: float) -> tuple[int, float, float, float, str, bytes]:
    """(exit code, wall s, CPU s of the children, longest silence s, where it was, output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    master, slave = pty.openpty()
    # a terminal of 120 x 40, as a user's: a pty of size 0 x 0 makes tqdm and rich draw nothing
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    t0 = last = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    silence, where, out = 0.0, 0, bytearray()
    while True:
        r, _, _ = select.select([master], [], [], 0.5)
        now = time.monotonic()
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                chunk = b""
            if chunk:
                if now - last > silence:
                    silence, where = now - last, len(out)
                last = now
                out += chunk
                continue
            if proc.poll() is not None:  # end of output and the command has exited
                break
            time.sleep(0.1)
        elif proc.poll() is not None:
            break
        if now - t0 > timeout:
            proc.kill()
    proc.wait()
    os.close(master)
    wall = time.monotonic() - t0
    tail = time.monotonic() - last  # the quiet tail before exit counts too
    if tail > silence:
        silence, where = tail, len(out)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.returncode, wall, cpu, silence, _last_words(bytes(out[:where])), bytes(out)


def _last_words(out: bytes) -> str:
    """The text on the terminal just before a silence: its last non-empty line, colours and
    carriage-return redraws removed, so the table says which step went quiet."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    lines = [ln.split("\r")[-1].strip() or ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1][:60] if lines else "(start)").replace("|", "/")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="Clone into this folder and keep it (default: a temp dir, removed).")
    ap.add_argument("--only", help="Comma-separated words; run only commands whose first word is one of them.")
    ap.add_argument("--timeout", type=float, default=3600, help="Seconds per command before it is killed.")
    ap.add_argument("--bdgrid", default=str(ROOT / ".venv" / "bin" / "bdgrid"), help="The bdgrid executable.")
    a = ap.parse_args()

    work = a.keep or Path(tempfile.mkdtemp(prefix="bdgrid-tour-"))
    if not (work / "README.md").exists():
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    head = subprocess.run(["git", "-C", str(work), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cmds = tour_commands(work / "README.md")
    only = set(a.only.split(",")) if a.only else None
    # the clone's own code, through the environment's installed packages
    env_path = f"{work}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ["PYTHONPATH"] = env_path
    print(f"# README tour, clone of {head} in {work}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    print("| command | exit | wall s | CPU s | longest silence s | after |\n|---|---|---|---|---|---|", flush=True)
    for cmd in cmds:
        if only and cmd.split()[0] not in only:
            continue
        cmd = fill(cmd, work)
        rc, wall, cpu, silence, where, out = run_in_pty([a.bdgrid] + cmd.split(), work, a.timeout)
        logs = work / "tour-logs"
        logs.mkdir(exist_ok=True)
        (logs / f"{len(list(logs.iterdir())):02d}-{cmd.split()[0].strip('-')}.log").write_bytes(out)
        print(f"| `bdgrid {cmd[:70]}` | {rc} | {wall:.1f} | {cpu:.1f} | {silence:.1f} | {where} |", flush=True)
        if rc != 0:
            tail = out.decode(errors="replace")[-1500:]
            print(re.sub(r"^", "    ", tail, flags=re.M), file=sys.stderr, flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
