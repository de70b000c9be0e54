"""One flag vocabulary across every command, and help a reader can use (issue 15).

The command is taken as the ``bdgrid`` console script runs it (``grid.cli.command()``), walked
recursively, so a command added later is checked without editing this file.
"""
from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from grid.cli import command

ROOT = command()


def _walk(cmd, path=()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _walk(sub, path + (name,))


COMMANDS = [(" ".join(p), c) for p, c in _walk(ROOT) if p]
TYPE_TAG = re.compile(r"<(str|int|float|bool|path|text|integer|list\[[a-z]+\])>", re.I)


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_help_has_no_type_tags_and_every_value_a_placeholder(name, cmd):
    res = CliRunner().invoke(ROOT, name.split() + ["--help"], prog_name="bdgrid")
    assert res.exit_code == 0, res.output
    assert not TYPE_TAG.search(res.output), f"bdgrid {name} --help shows a type tag:\n{res.output}"
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.is_flag:
            assert p.metavar and p.metavar.upper() == p.metavar, (name, p.name, p.metavar)


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_one_meaning_per_flag(name, cmd):
    """``--out``/``-o`` is always the run folder, ``--output``/``-O`` always a file, ``-p`` always
    ``--param KEY=VALUE``, ``-q`` always quiet: a flag learnt on one command means the same on all."""
    meaning = {"-o": ("--out", "DIR"), "-O": ("--output", "FILE"), "-p": ("--param", "KEY=VALUE"),
               "-q": ("--quiet", None), "-f": ("--format", None), "-a": ("--attack", None)}
    for p in cmd.params:
        if not isinstance(p, click.Option):
            continue
        for short in p.opts + p.secondary_opts:
            if len(short) == 2 and short.startswith("-"):
                assert short in meaning, f"bdgrid {name}: {short} is not in the shared vocabulary"
                long_, metavar = meaning[short]
                assert long_ in p.opts, f"bdgrid {name}: {short} is {p.opts}, elsewhere {long_}"
                if metavar:
                    assert p.metavar == metavar, (name, short, p.metavar)
        if "--out" in p.opts:
            assert "-o" in p.opts and p.metavar == "DIR", f"bdgrid {name}: --out without -o DIR"
        if "--output" in p.opts:
            assert "-O" in p.opts and p.metavar == "FILE", f"bdgrid {name}: --output without -O FILE"


def test_version_names_bdgrid_torch_and_python():
    res = CliRunner().invoke(ROOT, ["--version"], prog_name="bdgrid")
    assert res.exit_code == 0
    assert re.match(r"bdgrid \d+\.\d+\.\d+ \(torch \d+\.\d+", res.output), res.output


def test_usage_error_is_one_message_not_a_traceback(tmp_path):
    res = CliRunner().invoke(ROOT, ["table", "--out", str(tmp_path), "--format", "docx"], prog_name="bdgrid")
    assert res.exit_code != 0
    assert "Traceback" not in res.output
