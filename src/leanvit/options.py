"""Declared options and the one validator every registry uses (token-reduction methods, distillation methods).

An option is declared once, as an :class:`Option` (type, default, bounds); a reducer's options are read from its
constructor's signature with :func:`typing.get_type_hints`, which resolves annotations to real types whether or
not the module uses ``from __future__ import annotations`` (reading ``str(annotation)`` does not).
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import ConfigError

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


@dataclass(frozen=True)
class Option:
    """One option: the types it accepts, its default and, for numbers, its bounds."""

    types: tuple[type, ...]
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def check(self, owner: str, name: str, value: Any) -> Any:
        """``value`` checked (ints given for a float option become floats); :class:`ConfigError` naming the option,
        the expected type and the value otherwise."""
        want = " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in self.types)
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"<= {self.high:g}")
        # a bounded option is described with its range ("projectors must be an integer >= 1, got 0")
        described = f"{name} must be {want} {' and '.join(bounds)}" if bounds else \
            f"option '{name}' of '{owner}' must be {want}"
        if not any(_matches(value, t) for t in self.types):
            raise ConfigError(f"{described}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
            if not math.isfinite(value) or not low_ok or (self.high is not None and value > self.high):
                raise ConfigError(f"{described}, got {value!r}")
            if self.types == (float,):
                return float(value)
        return value


def _matches(value: Any, t: type) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is type(None):
        return value is None
    try:
        return isinstance(value, t)
    except TypeError:  # a typing construct we do not check: the owner validates it
        return True


def _types_of(hint: Any) -> tuple[type, ...]:
    """``int | None`` -> ``(int, NoneType)``; ``float`` -> ``(float,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _types_of(arg))
    if typing.get_origin(hint) is typing.Literal:
        return tuple({type(a) for a in typing.get_args(hint)})
    return (hint,) if isinstance(hint, type) else (object,)


def schema_from_signature(func: Callable, skip: tuple[str, ...] = ("self",)) -> dict[str, Option]:
    """The options a callable declares: every keyword parameter not in ``skip``, with its annotated types and
    default. A parameter without an annotation is refused here, when the method is registered, not at use."""
    hints = typing.get_type_hints(func)
    out = {}
    for name, p in inspect.signature(func).parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name not in hints:
            raise TypeError(f"{func.__qualname__}: option '{name}' has no type annotation")
        out[name] = Option(_types_of(hints[name]), None if p.default is p.empty else p.default)
    return out


def check_options(owner: str, schema: Mapping[str, Option], given: Mapping[str, Any],
                  defaults: bool = False) -> dict[str, Any]:
    """Check ``given`` against ``schema``: unknown names and wrong types or ranges raise :class:`ConfigError`.

    Returns the checked values; with ``defaults``, every declared option, the default where not given (None
    counts as not given)."""
    for name in given:
        if name not in schema:
            raise ConfigError(f"unknown option '{name}' for '{owner}'; it takes {', '.join(sorted(schema)) or 'none'}")
    if defaults:
        return {name: opt.check(owner, name, opt.default if given.get(name) is None else given[name])
                for name, opt in schema.items()}
    return {name: schema[name].check(owner, name, value) for name, value in given.items()}
