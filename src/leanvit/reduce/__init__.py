"""Token reduction for timm ViTs: ``leanvit.patch(model, method, r=... | budget=...)`` and ``leanvit.unpatch``.

Methods: ``gtp`` (graph-based token propagation), ``tome`` (token merging), ``evit`` (keep attentive tokens,
fuse the rest) and ``truncate`` (the zero-overhead ideal, for speed benchmarks only).

Example:
    >>> model = timm.create_model("deit_small_patch16_224", pretrained=True)
    >>> leanvit.patch(model, "gtp", budget=0.74)   # keep 74% of the dense MACs
    >>> leanvit.get_reducer(model).report           # schedule and the MACs it reached
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.schedule import block_macs, check_schedule, parse_schedule, solve_budget
from .base import TokenReducer
from .compat import apply_patch, inspect_vit, remove_patch
from .evit import EViTReducer, keep_schedule
from .gtp import GTPReducer
from .tome import ToMeReducer
from .truncate import TruncateReducer

METHODS: dict[str, type[TokenReducer]] = {
    "gtp": GTPReducer,
    "tome": ToMeReducer,
    "evit": EViTReducer,
    "truncate": TruncateReducer,
}

__all__ = ["METHODS", "TokenReducer", "get_reducer", "inspect_vit", "is_patched", "list_methods", "patch", "unpatch"]


def list_methods() -> list[str]:
    return list(METHODS)


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
    out = {}
    for name, value in options.items():
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
    for name, value in (("budget", budget), ("keep", keep)):
        if value is None:
            continue
        if not _matches(value, "float") or not 0.0 < float(value) <= 1.0:
            raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")
    if r is not None and not (_matches(r, "int") or isinstance(r, (list, tuple))):
        raise ConfigError(f"r must be an int, a per-block list or an (r, inflection) tuple, got {r!r}")


def _dense_macs(model: nn.Module) -> int:
    from ..analysis import count_macs

    return int(count_macs(model).macs)


def patch(model: nn.Module, method: str, *, r: Any = None, budget: float | None = None, keep: float | None = None,
          measure: bool = True, **options: Any) -> nn.Module:
    """Patch a timm ViT in place so that it removes tokens with ``method``; returns the model.

    Args:
        model: a timm ``VisionTransformer`` (cls or no cls token, dist token, registers, LayerScale, q/k norm).
        method: ``gtp``, ``tome``, ``evit`` or ``truncate``.
        r: tokens removed per block: an int, a per-block list, or ToMe's ``(r, inflection)``.
        budget: fraction of the dense model's MACs to keep (e.g. 0.74); the schedule is solved for it and the
            MACs reached are measured and stored in ``get_reducer(model).report``.
        keep: EViT's own keep rate at its three reduction blocks (EViT only).
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
           keep: float | None, measure: bool, options: dict[str, Any]) -> nn.Module:
    info = inspect_vit(model)
    report: dict[str, Any] = {"method": method}
    if budget is not None:
        dense = _dense_macs(model)
        other = dense - block_macs(info.blocks, [0] * info.depth, info.num_prefix, info.num_image)
        report.update(budget=budget, dense_macs=dense)
        target = budget
        # the schedule is solved from token counts; the method's own work (graph, matching, propagation) costs
        # MACs too, so tighten the target until the measured MACs of the patched model fit the budget
        for _ in range(8):
            schedule = solve_budget(target, info.blocks, info.num_prefix, info.num_image, other, max_fraction=0.5)
            reducer = _build(cls, method, info, schedule, options)
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
            analytic = (block_macs(info.blocks, schedule, info.num_prefix, info.num_image) + other) / dense
            target = min(target - 1e-4, budget - (reached / dense - analytic))
        else:  # every try was removed again: never hand back a silently unpatched model
            raise ConfigError(f"'{method}' could not reach budget {budget}: its own work keeps the measured MACs "
                              f"above the target; use a larger budget or r=")
        return model
    if keep is not None:
        if method != "evit":
            raise ConfigError("keep= is EViT's keep rate; use r= or budget= for other methods")
        schedule = keep_schedule(keep, info.depth, info.num_image, fuse=options.get("fuse", "mean") is not None)
        report.update(keep=keep)
    else:
        schedule = parse_schedule(r, info.depth)
    reducer = _build(cls, method, info, schedule, options)
    reducer.report.update(report, schedule=schedule)
    apply_patch(model, reducer)
    return model


def _build(cls: type[TokenReducer], method: str, info, schedule: list[int], options: dict[str, Any]) -> TokenReducer:
    check_schedule(schedule, info.num_image, cls.max_fraction)
    if method == "evit" and options.get("fuse", "mean") is not None and any(schedule):
        check_schedule(schedule, info.num_image - 1, 1.0)  # room for the fused token
    return cls(info, schedule, **options)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model exactly (classes and forward); returns it."""
    remove_patch(model)
    return model


def is_patched(model: nn.Module) -> bool:
    return "_leanvit_reducer" in model.__dict__


def get_reducer(model: nn.Module) -> TokenReducer | None:
    """The reducer attached to a patched model (its ``schedule``, ``report``, ``trace_log``), or None."""
    return model.__dict__.get("_leanvit_reducer")


@torch.no_grad()
def tokens_per_block(model: nn.Module) -> list[int]:
    """Tokens (prefix included) entering each block's MLP for the current patch (dense: all tokens)."""
    info = inspect_vit(model)
    red = get_reducer(model)
    sched = red.schedule if red is not None else [0] * info.depth
    counts = check_schedule(sched, info.num_image, 1.0)
    return [c + info.num_prefix for c in counts[1:]]
