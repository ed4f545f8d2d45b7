"""YAML config files as argparse defaults, validated numbers, and one-line errors for a bad command line."""
from __future__ import annotations

import argparse
import difflib
import math
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import ConfigError

class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one :class:`ConfigError` line (``leanvit: error: ...``, exit 2)
    instead of printing the usage block; sub-parsers inherit the class."""

    def error(self, message: str):  # noqa: D102
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
            what: str = "") -> Callable[[Any], Any]:
    """An argparse ``type`` (also applied to YAML config values) for an int or float within bounds."""

    def parse(value: Any):
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise argparse.ArgumentTypeError(f"expected {what or ('an integer' if kind is int else 'a number')}, "
                                             f"got '{value}'")
        try:
            v = kind(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what or ('an integer' if kind is int else 'a number')}, "
                                             f"got '{value}'") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{value}'")
        if low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"must be {'above' if low_open else 'at least'} {low:g}, got {v:g}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {v:g}")
        return v

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1)


nonneg_int = _number(int, 0)


fraction = _number(float, 0.0, 1.0, low_open=True, what="a fraction in (0, 1]")


nonneg_float = _number(float, 0.0)


positive_float = _number(float, 0.0, low_open=True)


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="YAML",
                   help="YAML file whose keys set this command's defaults; flags given on the command line win")


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _check_config_value(action: argparse.Action, key: str, value: Any) -> Any:
    """A YAML value checked (and converted) the way argparse checks the same option on the command line."""
    if value is None:
        return value
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got '{value}'")
        return value
    if action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else None
        if items is None:
            raise ConfigError(f"{key} must be a list, got '{value}'")
        return [_check_config_value(_Scalar(action), key, v) for v in items]
    if action.type is not None:
        if action.type is str:
            value = str(value)
        else:
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                raise ConfigError(f"{key}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, action.choices))}, got '{value}'")
    return value


class _Scalar:
    """The per-item view of a list-valued action (its type and choices, no nargs)."""

    def __init__(self, action: argparse.Action):
        self.type, self.choices, self.nargs = action.type, action.choices, None


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse twice: first to find the verb and ``--config``, then with the YAML's keys as the verb's defaults
    (timm's train.py pattern). Unknown keys and values of the wrong type are errors, not silently ignored. A
    required option (``-o`` of the training verbs) may come from the YAML: the first pass does not require it."""
    subs = [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    required = [a for p in (parser, *subs) for a in p._actions if a.required and a.option_strings]
    for action in required:
        action.required = False
    try:
        args = parser.parse_args(argv)
    finally:
        for action in required:
            action.required = True
    if not getattr(args, "config", None):
        return parser.parse_args(argv)
    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    sub = _subparser(parser, args.command)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    adapt = getattr(sub, "adapt_config", None)  # the verb's reading of a file written for another verb (a run record)
    if adapt is not None:
        values = adapt(path, values, set(actions))
    unknown = sorted(k for k in values if k not in actions and k != "command")
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys: {', '.join(unknown)}"
                          + "".join(_key_hint(k, actions) for k in unknown))
    try:
        values = {k: _check_config_value(actions[k], k, v) for k, v in values.items() if k in actions}
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    sub.set_defaults(**values)
    for key in values:  # given by the YAML: no longer required on the command line
        actions[key].required = False
    return parser.parse_args(argv)


def _key_hint(key: str, actions: dict[str, argparse.Action]) -> str:
    """'; for X use Y' when an unknown config key is a flag's spelling rather than its key."""
    for action in actions.values():
        flags = {s.lstrip("-").replace("-", "_") for s in action.option_strings}
        if key in flags:
            if isinstance(action, argparse._StoreFalseAction):
                return f"; for {key} write '{action.dest}: false'"
            if isinstance(action, argparse._StoreTrueAction):
                return f"; for {key} write '{action.dest}: true'"
            return f"; for {key} write '{action.dest}: ...'"
    close = difflib.get_close_matches(key, list(actions), n=1)
    return f"; did you mean '{close[0]}' for {key}?" if close else ""
