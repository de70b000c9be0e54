"""What every command shares: the consoles, one way to fail on a user's mistake, ``-p key=value``
parsing, and loading a spec with every problem reported. A leaf: imports no other command."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def fail(msg: str, code: int = 2):
    """A user error: say what is wrong and exit, no traceback."""
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def parse_params(items: list[str] | None, flag: str = "--param") -> dict:
    """``key=value`` pairs -> dict; values parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml

    out = {}
    for it in items or []:
        if "=" not in it:
            fail(f"{flag} expects key=value, got '{it}'")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            fail(f"{flag} {it}: the value is not a YAML scalar")
    return out


def load_spec_or_exit(spec_file: str, gpus: float | None, max_stages: int | None = None, data_missing_ok: bool = False):
    """Parse + validate a grid spec (a tune spec too); on problems print every one
    (file:line: path: message) and exit 2. With ``data_missing_ok`` (a dry run), a dataset root
    that is not there yet is a note, not a problem: the plan does not need the data."""
    from grid.spec import load_spec
    from grid.validate import MAX_STAGES, every_problem

    ls, problems = load_spec(spec_file)
    problems = every_problem(ls, problems, gpus, max_stages or MAX_STAGES)
    if data_missing_ok and ls.spec is not None:
        missing = [p for p in problems if p.path[:1] in (("datasets",), ("models",)) and ("root" in p.path or "root:" in p.msg)]
        for p in missing:
            err.print(f"[yellow]missing data[/] (a real run needs it): {p.render(ls.file)}", highlight=False)
        problems = [p for p in problems if p not in missing]
    if problems:
        n = len(problems)
        fail(f"{n} problem{'s' if n > 1 else ''} in {spec_file}:\n  " + "\n  ".join(p.render(ls.file) for p in problems))
    return ls


def out_dir(ls, out: str | None, remote_ok: bool = False) -> Path:
    """--out (relative to the current folder, as any command-line path), else the spec's ``out``
    (relative to the spec file, as every path in a spec), else runs/<name> in the current folder.
    An ``s3://`` one (``remote_ok``: the commands that support it) is its pulled local mirror
    (``grid.remote_out``); elsewhere it is refused before anything runs."""
    target = out or ls.spec.out
    if target and is_remote_out(target):
        if not remote_ok:
            fail(f"--out {shown_uri(target)}: this command needs a local (or shared) folder; an s3:// --out works with "
                 f"`bdgrid run`, `status`, `table`, `plot`, `report` and `verify` (`bdgrid tune` keeps its Optuna "
                 f"journal under --out, which needs file locks)")
        return remote_folder(target, writable=True).local
    if out:
        return Path(out)
    if ls.spec.out:
        p = Path(ls.spec.out).expanduser()
        return p if p.is_absolute() else ls.base_dir / p
    return Path(f"runs/{ls.spec.name}")


def is_remote_out(out) -> bool:
    from grid.remote_out import is_remote

    return is_remote(out)


def shown_uri(uri: str) -> str:
    from grid.remote_out import shown

    return shown(uri)


def remote_folder(uri: str, writable: bool = False, existing: bool = False):
    """The ``RemoteOut`` of an s3:// --out with its mirror pulled; one message (exit 2) when the URI,
    the bucket or the credentials do not work. ``writable``: also prove an object can be written."""
    from grid.remote_out import RemoteOutError, open_out

    try:
        r = open_out(uri, existing=existing)
        if writable:
            r.prove_writable()
    except RemoteOutError as e:
        fail(str(e))
    return r


def run_folder(out: str) -> Path:
    """A finished or running run's folder for the commands that read it: a local path as given, or
    the pulled mirror of an s3:// one."""
    return remote_folder(out, existing=True).local if is_remote_out(out) else Path(out)


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def ray_session(address: str | None, num_cpus: int | None = None, quiet: bool = False):
    """Start or join Ray (a clear message, no traceback, when the cluster cannot be reached);
    returns True when this process started it (and must shut it down)."""
    from grid.run import connect

    try:
        return connect(address, num_cpus, quiet=quiet)
    except (ConnectionError, ValueError) as e:
        fail(str(e))


def param_docs(cls) -> dict[str, tuple[object, str]]:
    """{parameter: (default, meaning)} of a params dataclass. The meaning is the comment after the
    field, or the comment block just above it, in its source: where bdgrid keeps each default's
    reason and source."""
    import dataclasses
    import inspect
    import re

    if cls is None:
        return {}
    comments: dict[str, str] = {}
    try:
        block: list[str] = []
        for line in inspect.getsource(cls).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                block.append(text.lstrip("# ").strip())
                continue
            m = re.match(r"\s+(\w+)\s*:", line)
            if m:
                tail = line.split("  # ", 1)[1].strip() if "  # " in line else ""
                comments[m.group(1)] = tail or " ".join(block)
            block = []
    except (OSError, TypeError):
        pass  # no source (a compiled plugin): defaults without meanings
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = (default, comments.get(f.name, ""))
    return out
