"""Model-library adapters: what differs between model families (how to find the blocks, the attention, the prefix
tokens and the pooling, and which classes to swap) lives here; the methods in :mod:`leanvit.reduce` serve all.

Registered: timm ``VisionTransformer`` (:mod:`.timm_vit`, with leanvit's channel-shuffle blocks registered by
:mod:`.shuffle`), timm's PVT v2 pyramids (:mod:`.pyramid`) and transformers' ViT/DeiT (:mod:`.hf_vit`, which claims
only models whose class comes from ``transformers`` and imports nothing from it until then).
"""
from __future__ import annotations

from . import hf_vit, pyramid, shuffle, timm_vit  # noqa: F401  (each registers itself)
from .base import ModelAdapter, find_adapter, get_reducer, is_patched, register_adapter

__all__ = ["ModelAdapter", "find_adapter", "get_reducer", "is_patched", "register_adapter"]
