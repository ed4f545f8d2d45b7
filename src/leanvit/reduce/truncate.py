"""The ideal reducer for speed benchmarks: drops the last ``r`` image tokens with no selection and no overhead.

It gives the physical limit of a schedule's speed-up (same token counts, fused attention, nothing computed to
choose tokens); its accuracy is meaningless. Benchmarks report each method's speed-up as a fraction of it.
"""
from __future__ import annotations

import torch

from .base import TokenReducer
from .compat import AttnOut, ViTInfo


class TruncateReducer(TokenReducer):
    name = "truncate"
    display = "ideal"
    summary = "the zero-overhead ideal of a schedule's token counts (for speed; its accuracy is meaningless)"
    style = ("tab:gray", "x")

    def __init__(self, info: ViTInfo, schedule: list[int], trace: bool = False):
        super().__init__(info, schedule, trace=False)

    def _reduce(self, i: int, x: torch.Tensor, attn: AttnOut, r: int) -> torch.Tensor:
        return x[:, : x.shape[1] - r]

    def options(self) -> dict:
        return {}
