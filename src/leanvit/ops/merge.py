"""ToMe's bipartite soft matching (Bolya et al., ICLR 2023), as pure tensor functions.

Image tokens are split alternately into sets A (even positions) and B (odd positions); every A token finds its
most cosine-similar B token, and the ``r`` most similar pairs are merged into their B token by size-weighted
average. Prefix tokens are never matched. Matching returns a ``merge`` function so that features, sizes and
provenance are merged with one shared assignment.
"""
from __future__ import annotations

from typing import Callable

import torch


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """Plan merging ``r`` image tokens away.

    Args:
        metric: image-token descriptors ``(B, N, D)`` (ToMe uses the keys averaged over heads).
        r: tokens to remove; capped at ``N // 2`` (the size of set A).

    Returns:
        ``merge(x, mode)`` mapping ``(B, N, C)`` to ``(B, N - r, C)``: unmerged A tokens first, then B tokens;
        ``mode`` is ``"sum"`` (for size-weighted averages: merge ``x * size`` and ``size`` with sum, then divide)
        or ``"amax"``.
    """
    N = metric.shape[1]
    r = min(r, N // 2)
    if r <= 0:
        return lambda x, mode="sum": x
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        best_val, best_b = scores.max(dim=-1)  # (B, Na)
        order = best_val.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1)
        unm_idx = order[:, r:]  # A tokens that stay
        src_idx = order[:, :r]  # A tokens merged away
        dst_idx = best_b[..., None].gather(1, src_idx)  # their B partners

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        xa, xb = x[:, ::2], x[:, 1::2]
        B_, Na, C = xa.shape
        unm = xa.gather(1, unm_idx.expand(B_, Na - r, C))
        src = xa.gather(1, src_idx.expand(B_, r, C))
        xb = xb.scatter_reduce(1, dst_idx.expand(B_, r, C), src, reduce=mode)
        return torch.cat([unm, xb], dim=1)

    return merge


def merge_weighted(merge: Callable, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x (B, N, C)`` with token sizes ``size (B, N, 1)``."""
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size
