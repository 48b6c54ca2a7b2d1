"""Typed configs: a component's settings as a dataclass, built from the composed (Hydra) mapping.

Each component owns its config (``DataConfig`` in ``amint_dist.data.config``, ``ModelConfig`` and
``MintConfig`` in ``amint_dist.models.config``, ...): fields with types, defaults and a one-line help
(``option(..., help=...)``), cross-field checks in ``__post_init__``. :meth:`Config.from_dict` refuses
unknown keys and values of the wrong type or range with one :class:`ConfigError` line naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config value is of the wrong type, out of range, or impossible for the dataset."""


def option(default: Any = dataclasses.MISSING, *, help: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> Any:
    """A config field: its default, a one-line ``help`` and an optional range [lo, hi] (open ends on request)."""
    meta = {"help": help, "range": (lo, hi, lo_open, hi_open)}
    if isinstance(default, (dict, list, Config)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Config:
    """Base of the typed configs: ``section`` is the dotted key its values live under (``data``, ``mint.head``)."""

    section: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Check ``values`` (the composed group) against the fields and build the config."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"{cls.section}={values!r}: expected a mapping")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - set(fields), key=str)
        if unknown:
            raise ConfigError(f"{cls.section}: unknown key(s) {', '.join(map(str, unknown))}; "
                              f"valid keys: {', '.join(sorted(fields))}")
        hints = typing.get_type_hints(cls)
        kwargs = {name: _checked(cls._dotted(name), values[name], hints[name], fields[name].metadata)
                  for name in fields if name in values}
        return cls(**kwargs)

    @classmethod
    def _dotted(cls, name: str) -> str:
        return f"{cls.section}.{name}" if cls.section else name

    def key(self, name: str) -> str:
        """``section.name=value`` (how errors name a field)."""
        return f"{self._dotted(name)}={getattr(self, name)!r}"

    def error(self, name: str, problem: str) -> ConfigError:
        """One line naming field ``name`` and its value."""
        return ConfigError(f"{self.key(name)}: {problem}")


def help_lines(cls: type[Config]) -> list[str]:
    """``section.field: help`` per field, nested configs' fields in place of theirs (for a --help)."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        nested = [h for h in (hints[f.name], *typing.get_args(hints[f.name])) if isinstance(h, type) and issubclass(h, Config)]
        lines += help_lines(nested[0]) if nested else [f"{cls._dotted(f.name)}: {f.metadata.get('help', '')}"]
    return lines


def _checked(key: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    converted, problem = _convert(value, hint, meta.get("range", (None, None, False, False)))
    if problem:
        raise ConfigError(f"{key}={value!r}: {problem}")
    return converted


def _convert(value: Any, hint: Any, bounds: tuple) -> tuple[Any, str | None]:
    """(value as ``hint``, None), or (None, 'expected ...'); a nested config raises its own ConfigError."""
    if isinstance(hint, type) and issubclass(hint, Config):
        return (hint.from_dict(value), None) if isinstance(value, Mapping) else (None, "expected a mapping")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        problems = []
        for option_hint in typing.get_args(hint):
            converted, problem = _convert(value, option_hint, bounds)
            if problem is None:
                return converted, None
            problems.append(problem)
        return None, " or ".join(p.removeprefix("expected ") if i else p for i, p in enumerate(problems))
    if hint is type(None):
        return (None, None) if value is None else (None, "expected null")
    if origin is Literal:
        options = list(typing.get_args(hint))
        return (value, None) if value in options and not isinstance(value, bool) else (None, f"expected one of {options}")
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, "expected true or false")
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and _within(value, bounds)
        return (value, None) if ok else (None, _expected("integer", bounds))
    if hint is float:
        x = as_number(value)
        ok = x is not None and math.isfinite(x) and _within(x, bounds)
        return (x, None) if ok else (None, _expected("number", bounds))
    if hint is str:
        return (value, None) if isinstance(value, str) else (None, "expected a string")
    if origin is tuple:  # tuple[float, float]: a pair, each within the range
        items = typing.get_args(hint)
        converted = [_convert(v, items[0], bounds) for v in value] if isinstance(value, Sequence) else []
        if isinstance(value, str) or len(converted) != len(items) or any(p for _, p in converted):
            return None, f"expected {len(items)} values, each " + _expected("number", bounds).removeprefix("expected ")
        return tuple(v for v, _ in converted), None
    if origin is dict or hint is dict:
        return (dict(value), None) if isinstance(value, Mapping) else (None, "expected a mapping")
    if origin is list or hint is list:
        ok = isinstance(value, Sequence) and not isinstance(value, str)
        return (list(value), None) if ok else (None, "expected a list")
    raise TypeError(f"no config check for type {hint!r}")


def as_number(value: Any) -> float | None:
    """ints, floats and numeric strings (YAML 1.1 reads ``1e-3`` as a string); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _within(x: float, bounds: tuple) -> bool:
    lo, hi, lo_open, hi_open = bounds
    return not ((lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and (x >= hi if hi_open else x > hi)))


def _expected(kind: str, bounds: tuple) -> str:
    """'expected a positive integer', 'expected a number >= 0 and < 1', ..."""
    lo, hi, lo_open, hi_open = bounds
    if lo is None and hi is None:
        return f"expected {'an' if kind == 'integer' else 'a'} {kind}"
    if hi is None and lo == 0:
        return f"expected a {'positive' if lo_open else 'non-negative'} {kind}"
    if hi is None and lo == 1 and kind == "integer":
        return "expected a positive integer"
    parts = [f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "",
             f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else ""]
    return f"expected {'an' if kind == 'integer' else 'a'} {kind} {' and '.join(p for p in parts if p)}"


def leaves(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping (lists and None are leaves)."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
