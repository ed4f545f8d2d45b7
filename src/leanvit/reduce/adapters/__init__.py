"""Model-library adapters: what differs between model families (how to find the blocks, the attention, the prefix
tokens and the pooling, and which classes to swap) lives here; the methods in :mod:`leanvit.reduce` serve all.

Registered: timm ``VisionTransformer`` (:mod:`.timm_vit`, with leanvit's channel-shuffle blocks registered by
:mod:`.shuffle`), timm's PVT v2 pyramids (:mod:`.pyramid`), transformers' ViT/DeiT/CLIP (:mod:`.hf_vit`, which claims
only models whose class comes from ``transformers`` and imports nothing from it until then) and SigLIP/DINOv2
(:mod:`.hf_more`, families registered with it), timm's Eva/EVA-02 with rotary attention (:mod:`.eva`), open_clip's
ViT towers (:mod:`.open_clip`), and timm's
``features_only`` wrapper of any of them (:mod:`.timm_features`).
"""
from __future__ import annotations

from . import hf_more, hf_vit, pyramid, shuffle, timm_features, timm_vit  # noqa: F401  (each registers itself)
from . import eva  # noqa: F401  (timm's Eva / EVA-02 RoPE ViTs; not a VisionTransformer, claims only Eva)
from . import open_clip  # noqa: F401  (registers itself; imports open_clip only to unpickle a patched model)
from .base import ModelAdapter, find_adapter, get_reducer, is_patched, register_adapter

__all__ = ["ModelAdapter", "find_adapter", "get_reducer", "is_patched", "register_adapter"]
