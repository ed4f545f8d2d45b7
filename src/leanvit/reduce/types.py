"""The reducer contract's types, in one module that every reducer, adapter and attention building block imports.

Nothing here touches a model library: :class:`ViTInfo` is what an adapter reports about a model, :class:`AttnRequest`
what a reducer asks of a block's attention, :class:`AttnOut` what the attention hands back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
class AttnRequest:
    """What one block's attention must produce for its reducer.

    Attributes:
        probs: the post-softmax attention probabilities ``(B, H, N, N)`` (forces explicit attention).
        score: a function from probabilities ``(b, H, N, N)`` to per-image-token scores ``(b, N_img)``, computed
            beside explicit attention and, on CPU, on slices of the batch so the map is never held whole.
        cls_probs: the cls query's attention row ``(B, H, N)``, computed beside fused attention.
        keys: the keys ``(B, H, N, Dh)``.
        size_bias: ``(B, N)`` added to every query's logits for key j (``log s_j``, proportional attention).
        theta: keep ratio of attention entries per head (GTP's sparsification; 1 = dense).
        select: the block computes a subset of the tokens: a function from the head-averaged, scaled logits of the
            cls query against every key ``(B, N)`` to the positions ``(B, M)`` of the tokens to compute, prefix
            tokens included. Only keys are computed for the others.
        masked: with ``select``, compute every token but mask the unselected ones out as keys and gate the block's
            outputs by the selection (the differentiable training path; the same output as the gathered path).
        logits: with a masked ``select``, also return the head-averaged, scaled, pre-mask logits ``(B, N, N)``.
    """

    probs: bool = False
    score: Callable[[torch.Tensor], torch.Tensor] | None = None
    cls_probs: bool = False
    keys: bool = False
    size_bias: torch.Tensor | None = None
    theta: float = 1.0
    select: Callable[[torch.Tensor], torch.Tensor] | None = None
    masked: bool = False
    logits: bool = False
    fused_score: Callable[..., torch.Tensor] | None = None
    score_stats: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    # ``fused_score``: instead of ``score``, a function ``(q, k, size_bias, scale) -> (B, N_img)`` that scores the
    # tokens from the queries and keys without the attention map, so that the attention stays fused
    # (:mod:`leanvit.ops.fused_score`); ignored when something else needs the explicit map.
    # ``score_stats``: beside ``score``, the same score as a function ``(diag, colsum) -> (B, N_img)`` of the map's
    # diagonal and column sums ``(B, H, N)``, for a score that needs no more of the map: a compiled CPU forward then
    # runs the attention as one cache-blocked op (``leanvit::explicit_attention_stats``) instead of tracing it.

    @property
    def explicit(self) -> bool:
        """Whether the attention map must be computed explicitly (no fused kernel)."""
        return self.probs or self.theta < 1.0 or self.score is not None


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


@dataclass
class AttnOut:
    """Attention output and the internals a reducer asked for (:class:`~leanvit.reduce.base.AttnRequest`)."""

    x: torch.Tensor  # (B, N, C) after proj; (B, M, C) for the tokens in ``index`` when the block computes a subset
    probs: torch.Tensor | None = None  # (B, H, N, N) post-softmax (after sparsification), if requested
    keys: torch.Tensor | None = None  # (B, H, N, Dh), if requested
    cls_probs: torch.Tensor | None = None  # (B, H, N) attention of the first token (cls), if requested
    score: torch.Tensor | None = None  # request.score(probs), if a score function was given
    index: torch.Tensor | None = None  # (B, M) positions of the tokens computed (gathered subset path)
    gate: torch.Tensor | None = None  # (B, N, 1) 0/1 selection that gates the block's outputs (masked path)
    selected: torch.Tensor | None = None  # (B, N) bool, the tokens the block computes (either subset path)
    logits: torch.Tensor | None = None  # (B, N, N) head-averaged scaled pre-mask logits (masked path), if requested
