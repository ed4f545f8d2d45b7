"""``patch`` and ``unpatch``: find the model's adapter, check the method and its amount, and apply."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from .adapters import find_adapter, get_reducer, is_patched
from .registry import check_amount, check_options, get_method


def patch(model: nn.Module, method: str | None = None, *, r: Any = None, budget: float | None = None,
          keep: float | None = None, measure: bool = True, restore: bool | None = None, recipe: Any = None,
          **options: Any) -> nn.Module:
    """Patch a ViT in place so that it removes tokens with ``method``; returns the model.

    A model that is already patched has its patch replaced (the earlier one stays if the new one fails).

    Args:
        model: a model an adapter knows (:mod:`leanvit.reduce.adapters`): a timm ``VisionTransformer`` (cls or no
            cls token, dist token, registers, LayerScale, q/k norm, channel-shuffle blocks); for ``idle`` also a
            PVT v2 pyramid.
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
        restore: give the whole token grid back (:func:`restore_tokens`): the last block's output, and timm's
            ``forward_intermediates``, have a token for every patch of the input grid again, each removed patch
            taking the features of the token that absorbed it, so dense heads (segmentation, DINOv2 linear probes,
            ``features_only`` models) run unchanged. Average pooling then averages over the grid (each patch once).
            None (default): off, except on timm's ``features_only`` wrappers with spatial (NCHW) outputs.
        recipe: instead of ``method``, an amount and options: a recipe (a file ``leanvit tune`` wrote, a
            :class:`~leanvit.reduce.recipe.Recipe` or its mapping), applied exactly (its method, per-block schedule
            and options; :mod:`leanvit.reduce.recipe`); a recipe made for a model of another depth, grid or number
            of prefix tokens is refused.
        options: method options, checked against the reducer's declared options (GTP: ``graph``, ``k``,
            ``score``, ``alpha``, ``prop_attn``, ``theta``, ``orphans``, ``stats``; ToMe: ``prop_attn``; EViT:
            ``fuse``; all: ``trace``).

    Raises:
        ConfigError: unknown method or option, impossible schedule or budget, a recipe that is not one or does
            not fit the model.
        UnsupportedModelError: a model whose blocks leanvit does not know.
    """
    if recipe is not None:
        return _patch_recipe(model, recipe, method, r, budget, keep, restore, options)
    if method is None:
        raise ConfigError("patch needs a method (e.g. patch(model, 'tome', r=8)) or recipe='recipe.yaml'")
    cls = get_method(method)
    check_amount(cls, r, budget, keep)
    options = check_options(method, options)
    adapter = find_adapter(model)
    previous = get_reducer(model)
    if previous is not None:
        adapter.remove(model)
    if restore is not None and not isinstance(restore, bool):
        raise ConfigError(f"restore must be True or False, got {restore!r}")
    try:
        restore = adapter.default_restore(model) if restore is None else restore
        return adapter.patch(model, cls, r, budget, keep, measure, options, restore=restore)
    except BaseException:
        if previous is not None and not is_patched(model):
            adapter.apply(model, previous)  # a failed re-patch leaves the earlier patch in place
        raise


def _patch_recipe(model: nn.Module, recipe: Any, method: str | None, r: Any, budget: Any, keep: Any,
                  restore: bool | None, options: dict[str, Any]) -> nn.Module:
    """``patch(model, recipe=...)``: the recipe's method, schedule (block by block) and options, nothing else."""
    from .recipe import as_recipe, check_applied, check_recipe, recipe_amount

    given = [name for name, v in (("method", method), ("r", r), ("budget", budget), ("keep", keep)) if v is not None]
    given += sorted(k for k in options if k not in ("trace", "stats"))  # diagnostics may come along
    if given:
        raise ConfigError(f"a recipe sets the method, its schedule and its options; give recipe= alone, not "
                          f"{', '.join(given)}")
    rec = as_recipe(recipe)
    amount = recipe_amount(rec, check_recipe(rec, model))
    patch(model, rec.method, **amount, restore=restore, **rec.options, **options)
    red = get_reducer(model)
    try:
        check_applied(rec, red)
    except ConfigError:
        unpatch(model)
        raise
    red.report.update(recipe=rec.source or "(in memory)")
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model exactly (classes and forward); returns it. An unpatched model is returned as is."""
    if is_patched(model):
        find_adapter(model).remove(model)
    return model


def restore_tokens(model: nn.Module, x, block: int | None = None):
    """The whole token grid of a patched model's tokens ``x`` ``(B, P + n, C)`` from its last forward in this
    thread: ``(B, P + H*W, C)`` in the input grid's order (see ``patch(..., restore=True)``, which this needs).

    ``x`` is the output of the last block (or, with ``block``, of that block); tokens with nothing removed are
    returned as they are. A patched model made with ``restore=True`` already restores its last block's output, so
    this is for the intermediate outputs a caller collects itself.
    """
    red = get_reducer(model)
    if red is None:
        raise ConfigError(f"{type(model).__name__} is not patched: there are no removed tokens to restore")
    return red.restore_grid(x, block)


def inspect_vit(model: nn.Module):
    """The :class:`~leanvit.reduce.types.ViTInfo` of ``model`` from its adapter (UnsupportedModelError if none)."""
    return find_adapter(model).inspect(model)


def tokens_per_block(model: nn.Module) -> list[int]:
    """Tokens (prefix included) each block's MLP computes under the current patch (dense: all tokens)."""
    info = inspect_vit(model)
    red = get_reducer(model)
    if red is None:
        return [info.num_image + info.num_prefix] * info.depth
    return [t.mlp for t in red.block_tokens()]
