"""``--method`` with ``--r``/``--budget``/``--keep`` and ``-O`` options, checked before any work by the registry's
validators."""
from __future__ import annotations

import argparse
from typing import Any

import yaml

from ..errors import ConfigError
from ..reduce import METHODS, check_options
from ..reduce.registry import AMOUNTS, check_amount, get_method


def reduction_amount(args: argparse.Namespace, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"r": ...}``, ``{"budget": ...}`` or ``{"keep": ...}`` from the flags (and ``-O r=``/``budget=``/``keep=``
    in ``opts``): the command line's one count of how much to reduce; at most one may be given."""
    flags = [(f"--{k}", k, getattr(args, k)) for k in AMOUNTS if getattr(args, k, None) is not None]
    flags += [(f"-O {k}", k, (opts or {})[k]) for k in AMOUNTS if k in (opts or {})]
    if len(flags) > 1:
        raise ConfigError(f"give one of --r, --budget or --keep, not {' and '.join(f for f, _, _ in flags)}")
    return {k: v for _, k, v in flags}


def check_method_args(args: argparse.Namespace) -> dict[str, Any]:
    """Validate ``--method`` with its schedule and ``-O`` options before any work; returns the parsed options.

    ``dense`` with a schedule or options is refused (it would silently evaluate the unreduced model)."""
    opts = parse_options(args.option)
    amount = reduction_amount(args, opts)
    if args.method == "dense":
        if amount or opts:
            flags = [f"--{k}" for k in amount] + (["-O"] if opts else [])
            raise ConfigError(f"{', '.join(flags)} set{'s' if len(flags) == 1 else ''} a token reduction; pick a "
                              f"--method ({', '.join(METHODS)}) or drop {' and '.join(flags)}")
        return opts
    if args.method not in METHODS:
        raise ConfigError(f"unknown method '{args.method}'; choose one of dense, {', '.join(METHODS)}")
    if not amount:
        raise ConfigError(f"--method {args.method} needs --r, --budget or --keep")
    check_amount(get_method(args.method), **amount)  # type, range, and whether the method takes it
    check_options(args.method, {**opts, **amount})
    return opts


def parse_options(items: list[str], per_method: bool = False) -> dict[str, Any]:
    """``OPT=VALUE`` items (values parsed as YAML: numbers, booleans, null) into a dict.

    With ``per_method`` the items are ``METHOD.OPT=VALUE`` and the result is ``{method: {opt: value}}``.
    Types are checked against the method's declared options by :func:`leanvit.reduce.check_options`.
    """
    out: dict[str, Any] = {}
    form = "METHOD.OPTION=VALUE (e.g. gtp.alpha=0.2)" if per_method else "OPTION=VALUE (e.g. alpha=0.2)"
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        method, dot, opt = key.partition(".")
        if not sep or not key or (per_method and not (dot and method and opt)):
            raise ConfigError(f"option must look like {form}, got '{item}'")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"cannot read the value of option '{item}'") from None
        if per_method:
            out.setdefault(method.strip(), {})[opt.strip()] = parsed
        else:
            out[key] = parsed
    return out
