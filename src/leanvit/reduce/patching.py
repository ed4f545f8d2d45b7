"""``patch`` and ``unpatch``: find the model's adapter, check the method and its amount, and apply."""
from __future__ import annotations

from typing import Any

from torch import nn

from .adapters import find_adapter, get_reducer, is_patched
from .registry import check_amount, check_options, get_method


def patch(model: nn.Module, method: str, *, r: Any = None, budget: float | None = None, keep: float | None = None,
          measure: bool = True, **options: Any) -> nn.Module:
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
        options: method options, checked against the reducer's declared options (GTP: ``graph``, ``k``,
            ``score``, ``alpha``, ``prop_attn``, ``theta``, ``orphans``, ``stats``; ToMe: ``prop_attn``; EViT:
            ``fuse``; all: ``trace``).

    Raises:
        ConfigError: unknown method or option, impossible schedule or budget.
        UnsupportedModelError: a model whose blocks leanvit does not know.
    """
    cls = get_method(method)
    check_amount(cls, r, budget, keep)
    options = check_options(method, options)
    adapter = find_adapter(model)
    previous = get_reducer(model)
    if previous is not None:
        adapter.remove(model)
    try:
        return adapter.patch(model, cls, r, budget, keep, measure, options)
    except BaseException:
        if previous is not None and not is_patched(model):
            adapter.apply(model, previous)  # a failed re-patch leaves the earlier patch in place
        raise


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model exactly (classes and forward); returns it. An unpatched model is returned as is."""
    if is_patched(model):
        find_adapter(model).remove(model)
    return model


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
