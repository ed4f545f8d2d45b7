"""IdleViT: token idling (Xu et al., "No Token Left Behind: Efficient Vision Transformer via Dynamic Token
Idling", AJCAI 2023). Meant to be fine-tuned (``leanvit finetune --method idle``).

From the first idling block on, each block computes only a selected subset of the image tokens: the cls query
is dotted with every token's key (scaled, mean over heads) and the top ``K_i`` image tokens, with every prefix
token, are computed by the block (attention among them only, then the MLP); the other tokens are idle: they pass
through the block unchanged, keep their place, and can be selected again by a later block, because every
block scores every token. No token is ever removed, so the output has all tokens.

Two forward paths give the same output (up to float rounding):

* ``gather`` (inference, what saves compute): keys of every token and the cls query, then queries, values,
  attention, projection and MLP of the selected tokens only, scattered back in place;
* ``masked`` (training, differentiable): full attention with the unselected tokens masked out as keys, and the
  attention and MLP outputs multiplied by the 0/1 selection, so idle tokens keep their residual only. It also
  records, per idling block, the head-averaged pre-mask logits and the selection (``cut_inputs``), the inputs of
  the token-cut loss (:class:`leanvit.engine.losses.TokenCutTerm`).

``path="auto"`` (default) takes ``masked`` in training mode and ``gather`` in eval mode.

Schedule. ``keep=r`` keeps ``int(N * r)`` image tokens in blocks 4-6 (1-indexed), ``int(N * r^2)`` in 7-9 and
``int(N * r^3)`` in 10-12 of a 12-block ViT; blocks 1-3 are dense. The authors' training and inference scripts
disagree on whether idling starts at block 4 or 5; we start at block 4, where EViT (and DynamicViT) place their
first reduction, so that IdleViT and EViT at one keep rate have the same stages. Other depths use the same three
stages starting at EViT's relative depths (:func:`~leanvit.reduce.evit.evit_locations`: 1/4, 1/2 and 3/4 of the
depth). ``keep=[...]`` gives one keep ratio per block (1.0 = dense block). ``budget=`` finds the largest three-stage
keep rate whose MACs fit. ``schedule[i]`` is the number of image tokens idle in block i.

Where we differ from the authors' code: prefix tokens beyond the cls token (distillation, registers) are always
computed, like the cls token (theirs has only a cls token); a block whose keep ratio gives all tokens runs dense;
the masked path masks with ``-inf`` instead of adding ``-1e5`` (the same probabilities in float32, and exact in
half precision too).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.schedule import BlockTokens, tokens_macs
from ..ops.select import flat_rows
from . import attention
from .base import TokenReducer
from .registry import register_method
from .evit import evit_locations
from .types import IDLE, KEPT, REACTIVATED, AttnOut, ViTInfo

PATHS = ("auto", "masked", "gather")


def idle_keep_ratios(keep: float | list[float] | tuple[float, ...], depth: int) -> list[float]:
    """Per-block keep ratios: the three-stage rule of a float ``keep``, or a per-block list (padded with 1.0)."""
    if isinstance(keep, (list, tuple)):
        if len(keep) > depth:
            raise ConfigError(f"keep has {len(keep)} entries but the model has {depth} blocks")
        ratios = [float(k) for k in keep] + [1.0] * (depth - len(keep))
    else:
        if not 0.0 < float(keep) <= 1.0:
            raise ConfigError(f"keep must be in (0, 1], got {keep}")
        starts = evit_locations(depth)
        ratios = [1.0] * depth
        for stage, start in enumerate(starts, start=1):
            end = starts[stage] if stage < len(starts) else depth
            for i in range(start, end):
                ratios[i] = float(keep) ** stage
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise ConfigError(f"keep ratios must be in (0, 1], got {r}")
    return ratios


def idle_schedule(keep: float | list[float] | tuple[float, ...], depth: int, num_image: int) -> list[int]:
    """Image tokens idle per block: block i computes ``max(1, int(num_image * ratio_i))`` of them."""
    return [num_image - max(1, int(num_image * r + 1e-9)) for r in idle_keep_ratios(keep, depth)]


@register_method
class IdleReducer(TokenReducer):
    """Token idling. Needs a cls token (selection is by the cls query).

    Args:
        path: ``auto`` (masked in training mode, gathered in eval mode), ``masked`` or ``gather``.
    """

    name = "idle"
    display = "IdleViT"
    summary = "token idling: each block computes the top tokens, the rest wait (fine-tuned)"
    style = ("tab:purple", "D")
    amounts = ("budget", "keep")
    keep_help = "computed r, r^2, r^3 in its three stages"
    keeps_all_tokens = True
    selects_subsets = True
    records_cut_inputs = True
    schedule_counts = "idle"
    _per_forward = TokenReducer._per_forward + ("_full", "_index", "_k", "cut_inputs")

    def __init__(self, info: ViTInfo, schedule: list[int], path: str = "auto", trace: bool = False):
        super().__init__(info, schedule, trace=trace)
        if not info.has_cls and any(schedule):
            raise ConfigError("IdleViT selects tokens by the cls query and needs a model with a cls token")
        if path not in PATHS:
            raise ConfigError(f"unknown idle path '{path}'; choose one of {', '.join(PATHS)}")
        self.path = path
        self.cut_inputs: list[dict[str, torch.Tensor]] = []
        self._full = self._index = None
        self._k = 0

    @property
    def keep_ratios(self) -> list[float]:
        """Share of the image tokens each block computes."""
        return [(self.info.num_image - s) / self.info.num_image for s in self.schedule]

    # ------------------------------------------------------------------ schedules
    @classmethod
    def schedule_from_keep(cls, keep: Any, info: ViTInfo, options: dict[str, Any]) -> list[int]:
        return idle_schedule(keep, info.depth, info.num_image)

    @classmethod
    def schedule_for_budget(cls, target: float, info: ViTInfo, other_macs: int, options: dict[str, Any]
                            ) -> list[int]:
        dense = tokens_macs(info.blocks, cls.schedule_tokens([0] * info.depth, info)) + other_macs
        # the largest three-stage keep rate (steps of 1/1000) whose analytic MACs fit; MACs fall with keep
        lo, hi = 1, 1000
        if cls._macs(hi / 1000, info) + other_macs <= target * dense:
            return idle_schedule(1.0, info.depth, info.num_image)
        while lo < hi:  # binary search for the largest fitting step
            mid = (lo + hi + 1) // 2
            if cls._macs(mid / 1000, info) + other_macs <= target * dense:
                lo = mid
            else:
                hi = mid - 1
        if cls._macs(lo / 1000, info) + other_macs > target * dense:
            raise ConfigError(f"budget {target:g} cannot be reached by idling tokens (the dense blocks and the "
                              f"keys of idle tokens cost more); use a larger budget")
        return idle_schedule(lo / 1000, info.depth, info.num_image)

    @classmethod
    def _macs(cls, keep: float, info: ViTInfo) -> int:
        return tokens_macs(info.blocks, cls.schedule_tokens(idle_schedule(keep, info.depth, info.num_image), info))

    @classmethod
    def check_schedule(cls, schedule: list[int], info: ViTInfo, options: dict[str, Any]) -> None:
        for i, s in enumerate(schedule):
            if not 0 <= s < info.num_image:
                raise ConfigError(f"block {i} cannot idle {s} of its {info.num_image} image tokens")

    @classmethod
    def schedule_tokens(cls, schedule: list[int], info: ViTInfo) -> list[BlockTokens]:
        P, N = info.num_prefix, info.num_image
        return [BlockTokens(attn=N - s + P, mlp=N - s + P, keys=s) for s in schedule]

    # ------------------------------------------------------------------ forward hooks
    def _masked(self) -> bool:
        return self.path == "masked" or (self.path == "auto" and self.training)

    def begin(self, x: torch.Tensor) -> None:
        super().begin(x)
        self.cut_inputs = []
        self._full = self._index = None

    def attend(self, i: int, attn: nn.Module, x: torch.Tensor) -> AttnOut:
        """An idling block attends among the tokens it selects: gathered in inference, masked (the differentiable
        form, which also records the token-cut loss's logits) in training."""
        if self.schedule[i] == 0:
            return attention.dense(attn, x)
        self._k = self.info.num_image - self.schedule[i]
        if self._masked():
            return attention.masked_subset(attn, x, self._select, logits=self.training)
        return attention.subset(attn, x, self._select)

    def _select(self, cls_logits: torch.Tensor) -> torch.Tensor:
        """Positions ``(B, P + K)`` of the prefix tokens and the K image tokens the cls query scores highest."""
        P = self.info.num_prefix
        top = cls_logits[:, P:].topk(self._k, dim=1, sorted=False).indices + P
        prefix = torch.arange(P, device=top.device).expand(top.shape[0], P)
        self._index = torch.cat([prefix, top], dim=1)
        return self._index

    def before_attn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.schedule[i] and not self._masked():
            self._full = x  # the idle tokens come back from here after the MLP
        return x

    def reduce(self, i: int, x: torch.Tensor, attn: AttnOut) -> torch.Tensor:
        attn.x = None  # the block has added it to the residual: not held through the MLP (memory above dense)
        if attn.logits is not None:
            self.cut_inputs.append({"logits": attn.logits, "mask": attn.selected.to(attn.logits.dtype)})
        if self.trace and attn.selected is not None:
            self._trace_idle(i, attn.selected[:, self.info.num_prefix:])
        return x

    def after_mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self._full is None:
            return x
        full, self._full = self._full, None
        B, N, C = full.shape
        # computed tokens back in place as rows of the flattened batch (one index_copy); idle ones unchanged
        rows = flat_rows(self._index, N)
        return full.reshape(B * N, C).index_copy(0, rows, x.reshape(-1, C)).view(B, N, C)

    def _trace_idle(self, i: int, computed: torch.Tensor) -> None:
        prev = self._state
        state = torch.where(computed, torch.where(prev == IDLE, REACTIVATED, KEPT).to(prev.dtype),
                            torch.full_like(prev, IDLE))
        self._state = state
        # every image computes the same number of tokens, the schedule's: read from it, not from image 0's row,
        # which an empty batch does not have (and which would cost a device sync)
        tokens = torch.tensor(self.info.num_image - self.schedule[i])
        self.trace_log.append({"block": torch.tensor(i), "tokens": tokens,
                               "source": self.source.clone(), "state": state.clone()})

    def options(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._full = self._index = None
        self._k = 0
        self.cut_inputs = []
