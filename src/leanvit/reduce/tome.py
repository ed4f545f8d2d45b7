"""ToMe: token merging (Bolya et al., ICLR 2023), a training-free baseline.

Between attention and MLP, bipartite soft matching on the keys (averaged over heads) merges the ``r`` most similar
image-token pairs by size-weighted average; proportional attention adds ``log(size)`` to the logits, and average
pooling weights tokens by size. Unlike the authors' timm patch, ours keeps LayerScale and q/k norms (it reuses
the block's own modules) and works with distillation and register tokens, which are never merged.
"""
from __future__ import annotations

from typing import Any

import torch

from ..ops.merge import bipartite_soft_matching, merge_weighted
from .base import AttnRequest, TokenReducer
from .compat import AttnOut, ViTInfo


class ToMeReducer(TokenReducer):
    """Token merging. ``prop_attn`` defaults to True, as in ToMe for DeiT/AugReg models."""

    name = "tome"
    display = "ToMe"
    summary = "token merging (training-free)"
    style = ("tab:blue", "s")
    max_fraction = 0.5
    tracks_sizes = True

    def __init__(self, info: ViTInfo, schedule: list[int], prop_attn: bool = True, trace: bool = False):
        super().__init__(info, schedule, prop_attn=prop_attn, trace=trace)

    def request(self, i: int) -> AttnRequest:
        return AttnRequest(size_bias=self.size_bias(), keys=self.schedule[i] > 0)

    def _reduce(self, i: int, x: torch.Tensor, attn: AttnOut, r: int) -> torch.Tensor:
        P = self.info.num_prefix
        metric = attn.keys.mean(1)[:, P:]  # (B, N, Dh)
        merge = bipartite_soft_matching(metric, r)
        size = self._sizes_or_ones(x)
        img, s_img = merge_weighted(merge, x[:, P:], size[:, P:, None])
        self._size = torch.cat([size[:, :P], s_img.squeeze(-1)], dim=1)
        if self.trace:
            self.source = merge(self.source.to(x.dtype), "amax").bool()
        return torch.cat([x[:, :P], img], dim=1)

    def options(self) -> dict[str, Any]:
        return {"prop_attn": self.prop_attn}
