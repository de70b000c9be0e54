"""What the writer can fill in about how a row was produced: package version and git commit."""
from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path


@functools.lru_cache(maxsize=1)
def package_version() -> str | None:
    try:
        return metadata.version("bdgrid")
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout this code runs from (with ``+dirty`` when files differ), or None
    when it is not a git checkout (an installed wheel) or git is missing."""
    src = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    """torch and python versions, read without importing torch (results stays torch-free)."""
    import platform

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    return {"torch_version": torch, "python_version": platform.python_version()}


def defaults() -> dict:
    """Provenance columns the writer fills when the caller did not."""
    return {"version": package_version(), "git_commit": git_commit(), **versions()}
