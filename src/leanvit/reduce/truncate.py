"""The ideal reducer for speed benchmarks: drops the last ``r`` image tokens with no selection and no overhead.

It gives the physical limit of a schedule's speed-up (same token counts, fused attention, nothing computed to
choose tokens); its accuracy is meaningless. Benchmarks report each method's speed-up as a fraction of it.

``point`` says where block i drops its ``schedule[i]`` tokens: ``mlp`` (default), between its attention and its
MLP, where GTP, ToMe and EViT reduce; ``attn``, before its attention, so that the whole block runs on the fewer
tokens: the token counts of idling (IdleViT), whose blocks compute the selected tokens in both.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..ops.schedule import BlockTokens
from .base import TokenReducer
from .registry import register_method
from .types import AttnOut, ViTInfo

POINTS = ("mlp", "attn")


@register_method
class TruncateReducer(TokenReducer):
    name = "truncate"
    display = "ideal"
    summary = "the zero-overhead ideal of a schedule's token counts (for speed; its accuracy is meaningless)"
    style = ("tab:gray", "x")

    def __init__(self, info: ViTInfo, schedule: list[int], point: str = "mlp", trace: bool = False):
        super().__init__(info, schedule, trace=trace)
        if point not in POINTS:
            raise ConfigError(f"unknown truncate point '{point}'; choose one of {', '.join(POINTS)}")
        self.point = point

    def before_attn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        r = self.schedule[i]
        if not r or self.point != "attn":
            return x
        if self.trace:
            self._trace_extra = {}
            self._drop_trace(r)
            self._trace_step(i, self._passed)
        if self.tracking:
            self._drop_moved(x, r)
            self._record_owner(i)
        return x[:, : x.shape[1] - r]

    def reduce(self, i: int, x: torch.Tensor, attn: AttnOut) -> torch.Tensor:
        return super().reduce(i, x, attn) if self.point == "mlp" else x  # at "attn" the block already ran fewer

    def _reduce(self, i: int, x: torch.Tensor, attn: AttnOut, r: int) -> torch.Tensor:
        if self.trace:
            self._drop_trace(r)
        if self.tracking:
            self._drop_moved(x, r)
        return x[:, : x.shape[1] - r]

    def _drop_moved(self, x: torch.Tensor, r: int) -> None:
        """The first ``n - r`` image tokens stay where they are; the last ``r`` reach no token."""
        n = x.shape[1] - self.info.num_prefix
        stay = torch.arange(n - r, device=x.device).expand(x.shape[0], -1)
        self._moved(x, stay, torch.cat([stay, stay.new_full((x.shape[0], r), -1)], dim=1))

    def _drop_trace(self, r: int) -> None:
        """The last ``r`` image tokens go and their features reach no token: ``removed`` in the trace."""
        self.source = self.source[:, : self.source.shape[1] - r]
        self._passed = torch.zeros_like(self._state, dtype=torch.bool)

    def block_tokens(self) -> list[BlockTokens]:
        if self.point == "mlp":
            return super().block_tokens()
        out, n = [], self.info.num_image + self.info.num_prefix
        for r in self.schedule:
            n -= r
            out.append(BlockTokens(attn=n, mlp=n))
        return out

    def options(self) -> dict:
        return {"point": self.point}
