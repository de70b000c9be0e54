"""Run state on disk: ``<out>/state.json``, rewritten atomically by the driver while a grid runs,
read by ``bdgrid status --out DIR`` from another terminal (no Ray connection needed).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

STATE_FILE = "state.json"


def write_state(out: str | Path, state: dict) -> None:
    from results.writer import atomic_write

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    # a reader sees the old state or the new one, never half; a full disk raises WriteError
    atomic_write(d / STATE_FILE, json.dumps({**state, "updated_at": time.time()}, indent=1, default=str).encode())


def read_state(out: str | Path) -> dict | None:
    p = Path(out) / STATE_FILE
    if not p.exists():
        return None
    return json.loads(p.read_text())


def driver_alive(state: dict) -> bool:
    pid = state.get("pid")
    if not pid or state.get("finished"):
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    return True


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(state: dict, console) -> None:
    """The same counts as the live progress bar, as a rich table."""
    from rich.table import Table

    alive = driver_alive(state)
    phase = "finished" if state.get("finished") else ("running" if alive else "stopped (driver gone; rerun to resume)")
    console.print(f"grid [bold]{state.get('grid')}[/] (spec {state.get('spec_hash')}): {phase}; "
                  f"updated {fmt_s(time.time() - state.get('updated_at', time.time()))} ago")
    from rich import box

    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)  # 9 columns in 80 characters
    for c in ("stage", "total", "cached", "done", "running", "queued", "pending", "failed", "skipped"):
        # stage names never wrap or truncate: the count columns give way first
        t.add_column(c, justify="right" if c != "stage" else "left", no_wrap=True, min_width=len(c))
    for kind, c in state.get("counts", {}).items():
        t.add_row(kind, *(str(c.get(k, 0)) for k in ("total", "cached", "done", "running", "queued", "pending", "failed",
                                                      "skipped")))
    console.print(t)
    el = state.get("elapsed_s")
    console.print(f"elapsed {fmt_s(el)}, ETA {fmt_s(state.get('eta_s')) if not state.get('finished') else '-'}")
    for f in state.get("failures", [])[:20]:
        console.print(f"[red]failed[/] {f['stage']}: {f['error']}  (traceback: {f['file']})")
