"""The registry of token-reduction methods: :func:`register_method` adds a :class:`TokenReducer` subclass to
:data:`METHODS`, which every command reads its method choices, help texts and plot styles from; a method's options
are its constructor's keyword arguments (:func:`leanvit.options.schema_from_signature`), checked by one validator.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..options import Option, check_options as _check, schema_from_signature
from .base import TokenReducer

METHODS: dict[str, type[TokenReducer]] = {}
AMOUNTS = ("r", "budget", "keep")
_SCHEMAS: dict[str, dict[str, Option]] = {}


def register_method(cls: type[TokenReducer]) -> type[TokenReducer]:
    """Class decorator: register a reducer under ``cls.name``; its options are read from its ``__init__``."""
    if cls.name in METHODS:
        raise ValueError(f"token-reduction method '{cls.name}' is already registered")
    _SCHEMAS[cls.name] = schema_from_signature(cls.__init__, skip=("self", "info", "schedule"))
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return list(METHODS)


def method_help() -> str:
    """One line per method for CLI help texts: ``name (Display): summary``."""
    return "; ".join(f"{name} ({cls.display}): {cls.summary}" for name, cls in METHODS.items())


def get_method(method: str) -> type[TokenReducer]:
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(METHODS)} (or 'dense' for none)")
    return METHODS[method]


def method_options(method: str) -> dict[str, Option]:
    """A method's declared options: ``{name: Option}``."""
    get_method(method)
    return dict(_SCHEMAS[method])


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a method's options (and at most one of ``r``/``budget``/``keep``) before any work.

    Returns the options with ints given for float options turned into floats. Raises :class:`ConfigError` naming
    the option, the expected type and the value (``-O k=2.5``, ``-O prop_attn=maybe``, ``budget="0.7"``).
    """
    cls = get_method(method)
    amounts = {k: options[k] for k in AMOUNTS if options.get(k) is not None}
    check_amount(cls, **{k: options.get(k) for k in AMOUNTS}, required=False)
    rest = {k: v for k, v in options.items() if k not in AMOUNTS and k != "measure"}
    out = _check(method, _SCHEMAS[method], rest)
    if "measure" in options:
        out["measure"] = options["measure"]
    return {**amounts, **out}


def check_amount(cls: type[TokenReducer], r: Any = None, budget: Any = None, keep: Any = None,
                 required: bool = True) -> str | None:
    """The one check of how much a method reduces: at most (``required``: exactly) one of ``r=``, ``budget=``,
    ``keep=``, one the method takes, of the right type and range. Returns the name given (or None)."""
    given = [name for name, v in (("r", r), ("budget", budget), ("keep", keep)) if v is not None]
    if len(given) > 1 or (required and not given):
        raise ConfigError(f"give exactly one of r=, budget= or keep= (got {', '.join(given) or 'none'})")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0.0 < float(budget) <= 1.0):
        raise ConfigError(f"budget must be a number in (0, 1], got {budget!r}")
    if keep is not None:
        values = list(keep) if isinstance(keep, (list, tuple)) else [keep]
        if not values or not all(not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 < float(v) <= 1.0
                                 for v in values):
            raise ConfigError(f"keep must be a number in (0, 1] (or, for idle, a per-block list of them), "
                              f"got {keep!r}")
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, list, tuple))):
        raise ConfigError(f"r must be an int, a per-block list or an (r, inflection) tuple, got {r!r}")
    if given and given[0] not in cls.amounts:
        raise ConfigError(f"'{cls.name}' does not take {given[0]}=; give {' or '.join(a + '=' for a in cls.amounts)}")
    return given[0] if given else None


def resolve_method(name: str, method_options: dict[str, dict[str, Any]] | None = None) -> tuple[str, dict]:
    """``(method, options)`` of a row name: a method, or a label whose options name its method, e.g.
    ``{"gtp-cls": {"method": "gtp", "score": "cls"}}`` (several variants of one method side by side)."""
    opts = dict((method_options or {}).get(name, {}))
    method = opts.pop("method", name)
    if method not in METHODS:
        hint = f" (label '{name}' names method '{method}')" if method != name else ""
        raise ConfigError(f"unknown method '{method}'{hint}; choose from dense, {', '.join(METHODS)}, or a label "
                          f"with a 'method' option (e.g. -O gtp-cls.method=gtp -O gtp-cls.score=cls)")
    if "budget" in opts:
        raise ConfigError(f"'{name}': budgets come from --budgets, not from an option")
    return method, check_options(method, opts)


def own_schedule(opts: dict[str, Any]) -> bool:
    """A variant with its own schedule (``keep`` or ``r``) runs once, not at every budget."""
    return "keep" in opts or "r" in opts
