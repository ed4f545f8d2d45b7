"""Token reduction: ``leanvit.patch(model, method, r=... | budget=... | keep=...)`` and ``leanvit.unpatch``.

Methods (:data:`METHODS`, the one registry every command reads its choices, help and plot styles from):
``gtp`` (graph-based token propagation), ``tome`` (token merging), ``evit`` (keep attentive tokens, fuse the
rest), ``idle`` (IdleViT, token idling) and ``truncate`` (the zero-overhead ideal, for speed benchmarks only).
A method is one :class:`TokenReducer` subclass decorated with :func:`register_method` (the contract is in
:mod:`leanvit.reduce.base`, its types in :mod:`leanvit.reduce.types`); a model family is one adapter
(:mod:`leanvit.reduce.adapters`).

Example:
    >>> model = timm.create_model("deit_small_patch16_224", pretrained=True)
    >>> leanvit.patch(model, "gtp", budget=0.74)   # keep 74% of the dense MACs
    >>> leanvit.get_reducer(model).report           # schedule and the MACs it reached
"""
from __future__ import annotations

# the methods register in this order, which is the order of every method list (CLI help, tables, plots)
from . import gtp, tome, evit, idle, truncate, zoo  # noqa: F401, I001  (each registers its methods or models)
from .adapters import get_reducer, is_patched
from .base import TokenReducer
from .patching import inspect_vit, patch, restore_tokens, tokens_per_block, unpatch
from .recipe import Recipe, read_recipe, recipe_of, write_recipe
from .registry import METHODS, check_options, list_methods, method_help, register_method
from .types import TOKEN_STATES, AttnOut

__all__ = ["METHODS", "TOKEN_STATES", "AttnOut", "Recipe", "TokenReducer", "check_options", "get_reducer",
           "inspect_vit", "is_patched", "list_methods", "method_help", "patch", "read_recipe", "recipe_of",
           "register_method", "restore_tokens", "tokens_per_block", "unpatch", "write_recipe"]
