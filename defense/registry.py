"""Name -> function registries for datasets, models, attacks and defenses (timm-style).

Adding an entry is one decorator on one function. Parameters are a dataclass whose field
defaults are the documented defaults, so a spec can be checked against them before any
compute and ``bdgrid attacks list`` can print them.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Callable


class UnknownName(KeyError):
    """A name that is not in a registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class BadParams(ValueError):
    """Parameters that do not fit an entry's params dataclass; ``problems`` lists each one."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class Entry:
    name: str
    fn: Callable
    params: type | None = None  # a dataclass type, or None for "no parameters"
    meta: dict[str, Any] = field(default_factory=dict)
    doc: str = ""

    def defaults(self) -> dict[str, Any]:
        if self.params is None:
            return {}
        return params_dict(self.params())

    def make_params(self, overrides: dict[str, Any] | None = None):
        """Build the params dataclass from overrides, coercing simple types; report every problem."""
        overrides = dict(overrides or {})
        if self.params is None:
            if overrides:
                raise BadParams([f"{self.name} takes no parameters, got {sorted(overrides)}"])
            return None
        return build_params(self.params, overrides, where=self.name)


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"expected {tp}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [v if inner is Any else _coerce(v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise TypeError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    return value


def params_dict(p) -> dict[str, Any]:
    """A params dataclass as the plain dict that keys and rows record: ``p.canonical()`` where
    the class defines it (a value derived from others, e.g. TSBD's holdout, resolved), else
    ``dataclasses.asdict``; {} for None."""
    if p is None:
        return {}
    canonical = getattr(p, "canonical", None)
    return canonical() if canonical is not None else dataclasses.asdict(p)


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[dict, list[str]]:
    """(type hints, field names) of a params dataclass, resolved once: a planner builds params
    for every stage of a grid, and ``typing.get_type_hints`` was half of its time."""
    return typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]


def build_params(cls: type, overrides: dict[str, Any], where: str = "") -> Any:
    hints, names = _fields(cls)
    problems, kwargs = [], {}
    for key, value in overrides.items():
        if key not in names:
            problems.append(
                f"{where}: unknown parameter '{key}'{did_you_mean(key, names)}; valid: {', '.join(names)}"
            )
            continue
        try:
            kwargs[key] = _coerce(value, hints[key])
        except (TypeError, ValueError) as e:
            problems.append(f"{where}: parameter '{key}': {e}")
    # the range checks run on what was valid even when something else was not, so a typo in
    # one name does not hide an out-of-range value next to it
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        problems += [f"{where}: {m}" for m in check()]  # a params class may list range problems of its own
    if problems:
        raise BadParams(problems)
    return obj


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, params: type | None = None, **meta: Any) -> Callable:
        def deco(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = Entry(name, fn, params, meta, (fn.__doc__ or "").strip())
            return fn

        return deco

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"valid: {', '.join(sorted(self._entries))}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]
