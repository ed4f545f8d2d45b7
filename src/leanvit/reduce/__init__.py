"""Token reduction for timm ViTs: ``leanvit.patch(model, method, r=... | budget=... | keep=...)`` and
``leanvit.unpatch``.

Methods (:data:`METHODS`, the one registry every command reads its choices, help and plot styles from):
``gtp`` (graph-based token propagation), ``tome`` (token merging), ``evit`` (keep attentive tokens, fuse the
rest), ``idle`` (IdleViT, token idling) and ``truncate`` (the zero-overhead ideal, for speed benchmarks only).
A method is one :class:`TokenReducer` subclass (the contract is in :mod:`leanvit.reduce.base`).

Example:
    >>> model = timm.create_model("deit_small_patch16_224", pretrained=True)
    >>> leanvit.patch(model, "gtp", budget=0.74)   # keep 74% of the dense MACs
    >>> leanvit.get_reducer(model).report           # schedule and the MACs it reached
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..ops.schedule import block_macs, tokens_macs
from .base import TOKEN_STATES, AttnRequest, TokenReducer
from .compat import apply_patch, inspect_vit, remove_patch
from .evit import EViTReducer
from .gtp import GTPReducer
from .idle import IdleReducer
from .pyramid import is_pyramid, patch_pyramid, unpatch_pyramid
from .tome import ToMeReducer
from .truncate import TruncateReducer

METHODS: dict[str, type[TokenReducer]] = {cls.name: cls for cls in (
    GTPReducer, ToMeReducer, EViTReducer, IdleReducer, TruncateReducer)}

__all__ = ["METHODS", "TOKEN_STATES", "AttnRequest", "TokenReducer", "get_reducer", "inspect_vit", "is_patched",
           "list_methods", "patch", "unpatch"]


def list_methods() -> list[str]:
    return list(METHODS)


def method_help() -> str:
    """One line per method for CLI help texts: ``name (Display): summary``."""
    return "; ".join(f"{name} ({cls.display}): {cls.summary}" for name, cls in METHODS.items())


_TYPE_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string", "None": "null"}


def _matches(value: Any, type_name: str) -> bool:
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name == "str":
        return isinstance(value, str)
    if type_name == "None":
        return value is None
    return True  # a type we do not check (the reducer validates it)


def method_options(method: str) -> dict[str, tuple[str, Any]]:
    """A method's options: ``{name: (annotation, default)}`` read from its reducer's constructor."""
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(METHODS)} (or 'dense' for none)")
    params = inspect.signature(METHODS[method].__init__).parameters
    return {name: (str(p.annotation), p.default) for name, p in params.items()
            if name not in ("self", "info", "schedule")}


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a method's options (and ``r``/``budget``/``keep``) against their declared types before any work.

    Returns the options with ints given for float options turned into floats. Raises :class:`ConfigError` naming
    the option, the expected type and the value (``-O k=2.5``, ``-O prop_attn=maybe``, ``budget="0.7"``).
    """
    declared = method_options(method)
    amounts = METHODS[method].amounts
    out = {}
    for name, value in options.items():
        if name in ("r", "budget", "keep") and value is not None and name not in amounts:
            raise ConfigError(f"{name}= is not an option of '{method}'; give "
                              f"{' or '.join(a + '=' for a in amounts)}")
        if name in ("r", "budget", "keep", "measure"):
            out[name] = value
            continue
        if name not in declared:
            raise ConfigError(f"unknown option '{name}' for '{method}'; it takes {', '.join(sorted(declared))}")
        types = [t.strip() for t in declared[name][0].split("|")]
        if not any(_matches(value, t) for t in types):
            want = " or ".join(_TYPE_NAMES.get(t, t) for t in types)
            raise ConfigError(f"option '{name}' of '{method}' must be {want}, got {value!r}")
        out[name] = float(value) if types == ["float"] else value
    _check_amount(options.get("r"), options.get("budget"), options.get("keep"))
    return out


def _check_amount(r: Any, budget: Any, keep: Any) -> None:
    if budget is not None and (not _matches(budget, "float") or not 0.0 < float(budget) <= 1.0):
        raise ConfigError(f"budget must be a number in (0, 1], got {budget!r}")
    if keep is not None:
        values = list(keep) if isinstance(keep, (list, tuple)) else [keep]
        if not values or not all(_matches(v, "float") and 0.0 < float(v) <= 1.0 for v in values):
            raise ConfigError(f"keep must be a number in (0, 1] (or, for idle, a per-block list of them), "
                              f"got {keep!r}")
    if r is not None and not (_matches(r, "int") or isinstance(r, (list, tuple))):
        raise ConfigError(f"r must be an int, a per-block list or an (r, inflection) tuple, got {r!r}")


def _dense_macs(model: nn.Module) -> int:
    from ..analysis import count_macs

    return int(count_macs(model).macs)


def patch(model: nn.Module, method: str, *, r: Any = None, budget: float | None = None, keep: float | None = None,
          measure: bool = True, **options: Any) -> nn.Module:
    """Patch a timm ViT in place so that it removes tokens with ``method``; returns the model.

    Args:
        model: a timm ``VisionTransformer`` (cls or no cls token, dist token, registers, LayerScale, q/k norm);
            for ``idle`` also a PVT v2 pyramid (:mod:`leanvit.reduce.pyramid`).
        method: a key of :data:`METHODS`: ``gtp``, ``tome``, ``evit``, ``idle`` or ``truncate``.
        r: tokens removed per block: an int or ToMe's ``(r, inflection)``, capped in every block at half the image
            tokens that reach it (ToMe's rule, the same for every method; the schedule that runs is
            ``get_reducer(model).schedule`` and ``report["schedule"]``), or a per-block list, taken as given and
            refused if a block cannot remove that many.
        budget: fraction of the dense model's MACs to keep (e.g. 0.74); the schedule is solved for it and the
            MACs reached are measured and stored in ``get_reducer(model).report``.
        keep: the method's own keep rate (EViT: at its three reduction blocks; idle: r, r^2, r^3 in its three
            stages, or a per-block list).
        measure: with ``budget``, count the patched model's MACs (one batch-1 forward) for the report.
        options: method options, type-checked against the reducer's signature (GTP: ``graph``, ``k``, ``score``,
            ``alpha``, ``prop_attn``, ``theta``, ``orphans``, ``stats``; ToMe: ``prop_attn``; EViT: ``fuse``; all:
            ``trace``).

    Raises:
        ConfigError: unknown method or option, impossible schedule or budget.
        UnsupportedModelError: a model whose blocks leanvit does not know.
    """
    options = check_options(method, options)
    cls = METHODS[method]
    _check_amount(r, budget, keep)
    given = [name for name, v in (("r", r), ("budget", budget), ("keep", keep)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one of r=, budget= or keep= (got {', '.join(given) or 'none'})")
    if is_pyramid(model):
        return patch_pyramid(model, method, r, budget, keep, options)
    previous = get_reducer(model)
    if previous is not None:
        unpatch(model)
    try:
        return _patch(model, method, cls, r, budget, keep, measure, options)
    except BaseException:
        if previous is not None and not is_patched(model):
            apply_patch(model, previous)  # a failed re-patch leaves the earlier patch in place
        raise


def _patch(model: nn.Module, method: str, cls: type[TokenReducer], r: Any, budget: float | None,
           keep: Any, measure: bool, options: dict[str, Any]) -> nn.Module:
    info = inspect_vit(model)
    report: dict[str, Any] = {"method": method}
    if budget is not None:
        if "budget" not in cls.amounts:
            raise ConfigError(f"'{method}' does not take budget=; give {' or '.join(a + '=' for a in cls.amounts)}")
        dense = _dense_macs(model)
        other = dense - block_macs(info.blocks, [0] * info.depth, info.num_prefix, info.num_image)
        report.update(budget=budget, dense_macs=dense)
        target = budget
        # the schedule is solved from token counts; the method's own work (graph, matching, propagation) costs
        # MACs too, so tighten the target until the measured MACs of the patched model fit the budget
        for _ in range(8):
            schedule = cls.schedule_for_budget(target, info, other, options)
            reducer = _build(cls, info, schedule, options)
            reducer.report.update(report, schedule=schedule)
            apply_patch(model, reducer)
            if not measure:
                break
            reached = _dense_macs(model)
            reducer.reset_stats()  # the counting forward is not an evaluation
            reducer.report.update(macs=reached, achieved=reached / dense)
            if reached <= budget * dense or target <= 0.05:
                break
            remove_patch(model)
            # the method's own MACs on top of the token-count model; aim that much lower
            analytic = (tokens_macs(info.blocks, reducer.block_tokens()) + other) / dense
            target = min(target - 1e-4, budget - (reached / dense - analytic))
        else:  # every try was removed again: never hand back a silently unpatched model
            raise ConfigError(f"'{method}' could not reach budget {budget}: its own work keeps the measured MACs "
                              f"above the target; use a larger budget or r=")
        return model
    if keep is not None:
        schedule = cls.schedule_from_keep(keep, info, options)
        report.update(keep=keep)
    else:
        schedule = cls.schedule_from_r(r, info, options)
    reducer = _build(cls, info, schedule, options)
    reducer.report.update(report, schedule=schedule)
    apply_patch(model, reducer)
    return model


def _build(cls: type[TokenReducer], info, schedule: list[int], options: dict[str, Any]) -> TokenReducer:
    cls.check_schedule(schedule, info, options)
    return cls(info, schedule, **options)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model exactly (classes and forward); returns it."""
    if is_pyramid(model) and is_patched(model):
        unpatch_pyramid(model)
    else:
        remove_patch(model)
    return model


def is_patched(model: nn.Module) -> bool:
    return "_leanvit_reducer" in model.__dict__


def get_reducer(model: nn.Module) -> TokenReducer | None:
    """The reducer attached to a patched model (its ``schedule``, ``report``, ``trace_log``), or None."""
    return model.__dict__.get("_leanvit_reducer")


def tokens_per_block(model: nn.Module) -> list[int]:
    """Tokens (prefix included) each block's MLP computes under the current patch (dense: all tokens)."""
    info = inspect_vit(model)
    red = get_reducer(model)
    if red is None:
        return [info.num_image + info.num_prefix] * info.depth
    return [t.mlp for t in red.block_tokens()]
