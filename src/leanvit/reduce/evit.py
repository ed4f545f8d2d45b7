"""EViT: keep the attentive tokens, fuse the rest (Liang et al., ICLR 2022), a baseline.

Image tokens are ranked by the cls token's attention (post-softmax, mean over heads); the lowest are removed and,
with ``fuse``, combined into one extra token weighted by their cls attention. Two ways to schedule it:

* ``r=`` / ``budget=`` (shared with every method): remove ``r_i`` tokens in every block, so EViT runs with
  exactly the token counts of GTP and ToMe at the same budget;
* ``keep=`` (EViT's own form): keep ``ceil(keep * n)`` image tokens at blocks 4, 7 and 10 of 12 (1-indexed;
  scaled to other depths), so the token count drops by ``keep`` three times.

With ``fuse`` the extra token is re-fused at each reduction (it competes with the image tokens like the authors'
code). ``fuse="mean"`` (default) normalises the cls-attention weights to sum to one, which keeps the fused token
on the scale of the others when the model was not fine-tuned with EViT; ``fuse="sum"`` is the authors' unnormalised
weighted sum; ``fuse=None`` drops the tokens.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.schedule import check_schedule
from ..ops.select import cls_score, gather_tokens, split_topk
from . import attention
from .base import TokenReducer
from .registry import register_method
from .types import AttnOut, ViTInfo


def evit_locations(depth: int) -> list[int]:
    """0-indexed blocks where EViT reduces: 3, 6, 9 for 12 blocks, the same relative depths otherwise."""
    if depth == 12:
        return [3, 6, 9]
    return sorted({max(1, min(depth - 1, round(depth * f))) for f in (0.25, 0.5, 0.75)})


def keep_schedule(keep: float, depth: int, num_image: int, fuse: bool, locations: list[int] | None = None
                  ) -> list[int]:
    """EViT's keep-rate schedule as tokens removed per block."""
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep must be in (0, 1], got {keep}")
    locations = evit_locations(depth) if locations is None else list(locations)
    sched, n = [0] * depth, num_image
    for loc in locations:
        if not 0 <= loc < depth:
            raise ConfigError(f"EViT location {loc} is outside the model's {depth} blocks")
        left = math.ceil(keep * n)
        new_n = left + (1 if fuse and left < n else 0)
        sched[loc] = n - new_n
        n = new_n
    return sched


@register_method
class EViTReducer(TokenReducer):
    """Keep top tokens by cls attention, fuse the rest. Needs a cls token."""

    name = "evit"
    display = "EViT"
    summary = "keep the tokens the cls token attends to, fuse the rest"
    style = ("tab:green", "^")
    amounts = ("r", "budget", "keep")
    keep_help = "kept at each of its three reduction blocks"

    @classmethod
    def schedule_from_keep(cls, keep: Any, info: ViTInfo, options: dict[str, Any]) -> list[int]:
        return keep_schedule(keep, info.depth, info.num_image, fuse=options.get("fuse", "mean") is not None)

    @classmethod
    def min_image_tokens(cls, options: dict[str, Any]) -> int:
        return 2 if options.get("fuse", "mean") is not None else 1  # one kept token and the fused one

    @classmethod
    def check_schedule(cls, schedule: list[int], info: ViTInfo, options: dict[str, Any]) -> None:
        super().check_schedule(schedule, info, options)
        if options.get("fuse", "mean") is not None and any(schedule):
            check_schedule(schedule, info.num_image - 1, 1.0)  # room for the fused token

    def __init__(self, info: ViTInfo, schedule: list[int], fuse: str | None = "mean", trace: bool = False):
        super().__init__(info, schedule, trace=trace)
        if not info.has_cls:
            raise ConfigError("EViT ranks tokens by cls attention and needs a model with a cls token")
        if fuse not in ("mean", "sum", None):
            raise ConfigError(f"EViT fuse must be 'mean', 'sum' or None, got {fuse!r}")
        self.fuse = fuse

    def attend(self, i: int, attn: nn.Module, x: torch.Tensor) -> AttnOut:
        """Fused attention; a reducing block also computes the cls query's attention row (one row, no map)."""
        h = attention.heads(attn, x)
        out = attention.output(h, attention.fused(h))
        return AttnOut(out, cls_probs=attention.cls_row(h) if self.schedule[i] else None)

    def _reduce(self, i: int, x: torch.Tensor, attn: AttnOut, r: int) -> torch.Tensor:
        attn.x = None  # the block has added it to the residual: not held through the MLP (memory above dense)
        P = self.info.num_prefix
        n_img = x.shape[1] - P
        score = cls_score(attn.cls_probs, P)  # (B, N)
        drop = r + 1 if self.fuse else r
        if drop >= n_img:
            raise ConfigError(f"EViT cannot remove {r} of {n_img} tokens at block {i} and fuse the rest")
        kept, removed = split_topk(score, drop)
        B, K = x.shape[0], kept.shape[1]
        # the output's rows in one gather (one pass over the tokens, no concatenation): the prefix tokens, the kept
        # tokens and, with fusing, a placeholder row (the cls token again) that the fused token overwrites
        rows = [torch.arange(P, device=x.device).expand(B, P), kept + P]
        out = gather_tokens(x, torch.cat(rows + [rows[0][:, :1]] if self.fuse else rows, dim=1))  # (B, P + K (+1), C)
        if self.fuse:
            w = gather_tokens(score, removed).unsqueeze(-1)  # (B, r+1, 1)
            if self.fuse == "mean":
                w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
            out[:, P + K] = (gather_tokens(x, removed, offset=P) * w).sum(1)  # (B, C) the fused token
        if self.tracking:  # kept tokens continue themselves; removed ones went into the fused token, or nowhere
            fused = kept.new_full((B, 1), -1)
            sources = torch.cat([kept, fused], dim=1) if self.fuse else kept
            dests = torch.empty(B, n_img, dtype=kept.dtype, device=x.device)
            dests.scatter_(1, kept, torch.arange(kept.shape[1], device=x.device).expand_as(kept))
            dests.scatter_(1, removed, kept.shape[1] if self.fuse else -1)
            self._moved(x, sources, dests)
        if self.trace:
            src = self.source.float()
            new = [gather_tokens(src, kept)]
            if self.fuse:  # the fused token stands for the removed patches: they are merged
                new.append(gather_tokens(src, removed).amax(1, keepdim=True))
            else:  # dropped: their features reach no token
                self._passed = torch.zeros_like(self._state, dtype=torch.bool)
            self.source = torch.cat(new, dim=1).bool()
        return out

    def options(self) -> dict[str, Any]:
        return {"fuse": self.fuse}
