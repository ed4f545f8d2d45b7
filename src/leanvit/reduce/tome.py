"""ToMe: token merging (Bolya et al., ICLR 2023), a training-free baseline.

Between attention and MLP, bipartite soft matching (:func:`~leanvit.ops.merge.bipartite_soft_matching`) on the
keys averaged over heads merges the ``r`` most similar token pairs by size-weighted average, sizes summed;
proportional attention adds ``log(size)`` to the logits. On cls-token and distilled (cls + dist) models this is
the authors' timm patch (facebookresearch/ToMe, ``tome/patch/timm.py`` and ``tome/merge.py``) token for token:

* the alternation into sets A (even positions) and B (odd positions) runs over all tokens, the cls token at A[0]
  and the dist token at B[0], both never merged;
* with a cls token the unmerged A tokens are put back in their original order, so the next block alternates over
  the same order; the output is cls, (dist,) the unmerged A tokens, then the B tokens;
* ``r`` is capped per block at half the image tokens (ToMe: ``(tokens - protected) // 2``); ``leanvit.patch``
  caps an int ``r`` the same way before building, so the reported schedule is the one that runs.

``tests/test_tome_exact.py`` checks this against a reference written from these rules, in float64.

Where we differ from the authors' code, and why:

* Register tokens (and any other prefix token) are protected like the dist token: they keep their positions in
  the alternation over all tokens and are never merged, and the output starts with every prefix token in its
  order. ToMe's patch knows only cls and dist and would merge registers into image tokens, mixing the global
  memory the model keeps there into patch tokens; the rule above is ToMe's own rule for the dist token, applied to
  every prefix token, so cls and dist models are unchanged by it.
* Models without a cls token match as ToMe's ``class_token=False`` path (nothing protected but their prefix
  tokens, unmerged A tokens left in order of similarity), but average pooling weights every token by its size
  (how many patches it stands for); ToMe's patch leaves timm's plain mean, which counts a token of 20 merged
  patches as much as a single patch.
* The block's own modules run the attention and MLP, so LayerScale, q/k norm and new timm blocks are kept (ToMe
  copies an old timm ``forward``); the keys are taken after ``k_norm`` (the identity on DeiT) and, on rotary
  models (RoPE: timm's Eva), after their rotation: the keys as the attention uses them, as on models with an
  absolute position embedding, whose keys carry position too. A merged token keeps its destination's grid position
  (BENCHMARKS.md, "RoPE: where ToMe's merged token sits").
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.merge import bipartite_soft_matching, merge_weighted
from . import attention
from .base import TokenReducer
from .registry import register_method
from .types import AttnOut, ViTInfo


@register_method
class ToMeReducer(TokenReducer):
    """Token merging. ``prop_attn`` defaults to True, as in ToMe's timm patch for off-the-shelf models."""

    name = "tome"
    display = "ToMe"
    summary = "token merging (training-free)"
    style = ("tab:blue", "s")
    max_fraction = 0.5

    def __init__(self, info: ViTInfo, schedule: list[int], prop_attn: bool = True, trace: bool = False):
        super().__init__(info, schedule, prop_attn=prop_attn, trace=trace)

    def attend(self, i: int, attn: nn.Module, x: torch.Tensor) -> AttnOut:
        """Fused attention with proportional attention's size bias; the keys averaged over heads, ``(B, 1, N, Dh)``,
        are the merge metric. Averaged here, not in :meth:`_reduce`: the keys are a view of the block's whole
        ``qkv`` projection, which the block would otherwise hold through its MLP (three channels' worth of memory
        per token above the dense block's peak)."""
        h = attention.heads(attn, x, self.size_bias())
        out = attention.output(h, attention.fused(h))
        return AttnOut(out, keys=_mean_over_heads(h.k) if self.schedule[i] else None)

    def _reduce(self, i: int, x: torch.Tensor, attn: AttnOut, r: int) -> torch.Tensor:
        attn.x = None  # the block has added it to the residual: not held through the MLP (memory above dense)
        P = self.info.num_prefix
        keys, attn.keys = attn.keys, None  # (B, H, N, Dh); H = 1 when attend averaged them
        metric = (keys if keys.shape[1] == 1 else _mean_over_heads(keys)).squeeze(1)  # (B, N, Dh), prefix included
        merge = bipartite_soft_matching(metric, r, protected=P, keep_order=self.info.has_cls)
        if self.tracking:  # a merged token continues its destination (its position); its patches go there too
            B, T = x.shape[:2]
            self._moved(x, merge.sources(T, B, x.device)[:, P:] - P, merge.destinations(T, B, x.device)[:, P:] - P)
        size = self._sizes_or_ones(x)  # (B, N)
        x, s = merge_weighted(merge, x, size[..., None])  # (B, N - r, C), (B, N - r, 1)
        self._size = s.squeeze(-1)  # (B, N - r)
        if self.trace:
            B, n, n0 = self.source.shape
            rows = torch.cat([self.source.new_zeros(B, P, n0), self.source], dim=1)  # (B, P + n, N0): prefix rows
            self.source = merge(rows.to(x.dtype), "amax")[:, P:].bool()  # (B, n - r, N0), prefix rows dropped
        return x

    @property
    def tracks_sizes(self) -> bool:
        return self.reducing  # merged tokens are averaged by size, with or without proportional attention

    def options(self) -> dict[str, Any]:
        return {"prop_attn": self.prop_attn}


def _mean_over_heads(k: torch.Tensor) -> torch.Tensor:
    """``(B, 1, N, Dh)``: the mean over heads of ``k`` ``(B, H, N, Dh)``, as one sum of head slices then one division
    (ToMe's ``k.mean(1)`` up to rounding). On CPU a reduction over the head dimension of the strided ``qkv`` view
    took about twice the time of these ``H`` adds (DeiT-S, batch 32, one thread, AMD EPYC)."""
    if torch.compiler.is_exporting():
        # exported, each slice and add is a graph node (about 11 a block for DeiT-S), which at batch 1 costs
        # ONNX Runtime more than the reduction: one mean
        return k.mean(1, keepdim=True)
    with torch.no_grad():  # only the matching reads it, under no_grad: no autograd record in training
        acc = k[:, :1] + k[:, 1:2] if k.shape[1] > 1 else k[:, :1].clone()
        for h in range(2, k.shape[1]):
            acc += k[:, h:h + 1]
        return acc.div_(k.shape[1])
