"""The reducer contract's types, in one module that every reducer, adapter and attention building block imports.

Nothing here touches a model library: :class:`ViTInfo` is what an adapter reports about a model, :class:`AttnOut`
what a reducer's attention (:meth:`TokenReducer.attend <leanvit.reduce.base.TokenReducer.attend>`, composed from
:mod:`leanvit.reduce.attention`) hands back to the block and to the reducer's own ``reduce``.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from ..ops.schedule import BlockShape

# What happened to an original patch by the end of a block (trace records, ``state``):
KEPT, MERGED, PROPAGATED, REMOVED, IDLE, REACTIVATED = range(6)
TOKEN_STATES = ("kept", "merged", "propagated", "removed", "idle", "reactivated")
"""``kept``: its own token, computed; ``merged``: part of a token that stands for several patches (ToMe's merges,
EViT's fused token); ``propagated``: removed after passing its features to kept tokens (GTP's graph edges);
``removed``: removed and its features reached no token (EViT without fusing, GTP's orphans as published);
``idle``: still a token but not computed by this block (IdleViT); ``reactivated``: computed again after idling."""


@dataclass(frozen=True)
class ViTInfo:
    """What a reducer needs to know about a ViT."""

    depth: int
    dim: int
    num_prefix: int
    has_cls: bool
    grid: tuple[int, int]
    num_image: int
    global_pool: str
    blocks: tuple[BlockShape, ...]
    # the attention rotates queries and keys by each token's grid position (RoPE: timm's Eva family); the reducers
    # then keep every token's position (:meth:`TokenReducer.token_positions`), which the adapter's attention reads
    rotary: bool = False


@dataclass
class AttnOut:
    """Attention output for the block (``x``, and ``index``/``gate`` when it computed a subset) and what the method
    kept for its own ``reduce`` (a reducer may return a subclass to carry more)."""

    x: torch.Tensor  # (B, N, C) after proj; (B, M, C) for the tokens in ``index`` when the block computes a subset
    probs: torch.Tensor | None = None  # (B, H, N, N) post-softmax (after sparsification), if requested
    keys: torch.Tensor | None = None  # (B, H, N, Dh), if requested
    cls_probs: torch.Tensor | None = None  # (B, H, N) attention of the first token (cls), if requested
    score: torch.Tensor | None = None  # request.score(probs), if a score function was given
    index: torch.Tensor | None = None  # (B, M) positions of the tokens computed (gathered subset path)
    gate: torch.Tensor | None = None  # (B, N, 1) 0/1 selection that gates the block's outputs (masked path)
    selected: torch.Tensor | None = None  # (B, N) bool, the tokens the block computes (either subset path)
    logits: torch.Tensor | None = None  # (B, N, N) head-averaged scaled pre-mask logits (masked path), if requested
