"""timm's ``features_only`` wrapper of a ViT (``timm.create_model(..., features_only=True)``, a
``FeatureGetterNet`` that calls the wrapped model's ``forward_intermediates``): the wrapped model is patched by its
own adapter and the reducer is attached to the wrapper too, so ``leanvit.get_reducer``, ``unpatch`` and
``budget=`` work on the wrapper. Its features are spatial maps (NCHW by default), so a patch on it gives the token
grid back by default (``restore=True``, :meth:`~leanvit.reduce.base.TokenReducer.restore_grid`): every map has
its full size, each removed patch taking the features of the token that absorbed it.
"""
from __future__ import annotations

from torch import nn

from ..base import TokenReducer
from ..types import ViTInfo
from .base import REDUCER_ATTR, ModelAdapter, find_adapter, register_adapter


def _inner(model: nn.Module) -> nn.Module:
    return model.model


@register_adapter
class TimmFeaturesAdapter(ModelAdapter):
    """``FeatureGetterNet`` around a model another adapter patches."""

    describes = "timm features_only wrappers (FeatureGetterNet) of those models"

    def claims(self, model: nn.Module) -> bool:
        return type(model).__name__ == "FeatureGetterNet" and type(model).__module__.startswith("timm.")

    def inspect(self, model: nn.Module) -> ViTInfo:
        inner = _inner(model)
        return find_adapter(inner).inspect(inner)

    def apply(self, model: nn.Module, reducer: TokenReducer) -> None:
        inner = _inner(model)
        find_adapter(inner).apply(inner, reducer)
        model.__dict__[REDUCER_ATTR] = reducer.shared()

    def remove(self, model: nn.Module) -> None:
        inner = _inner(model)
        find_adapter(inner).remove(inner)
        del model.__dict__[REDUCER_ATTR]

    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        inner = _inner(model)
        size = find_adapter(inner).input_size(inner)
        if size is None and hasattr(inner, "patch_embed"):
            h, w = inner.patch_embed.img_size
            size = (int(inner.patch_embed.proj.in_channels), int(h), int(w))
        return size

    def default_restore(self, model: nn.Module) -> bool:
        """Spatial maps (NCHW) need the whole grid; token lists (NLC) are given as they are."""
        return str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NCHW")
