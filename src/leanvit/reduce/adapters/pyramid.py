"""Token idling on pyramid ViTs (timm's PVT v2): ``leanvit.patch(pvt_v2_b0, "idle", keep=0.7)``.

Idling keeps every token, so it fits a pyramid, whose stages need the whole grid (the spatial-reduction attention,
the depthwise convolution of the MLP, the downsampling between stages); methods that remove or merge tokens do
not. What differs from the plain-ViT case (:mod:`leanvit.reduce.idle`; this module is the PVT v2 adapter):

* No cls token: the query of the block's average token (the mean of its normalised tokens, projected by the
  attention's query layer) stands in for the cls query. It is dotted with every token's key at full resolution
  (the key half of the ``kv`` layer on the token itself, before the spatial reduction), mean over heads, and the
  top ``int(N * ratio)`` tokens are computed.
* The spatial-reduction attention keeps keys and values from all tokens, idle ones included (they are still in
  the feature map); only the selected tokens are queries. So idle tokens cost their share of the reduced keys and
  values, which a plain ViT's idling does not pay.
* The MLP's depthwise 3x3 convolution runs on the grid with the hidden features of idle tokens set to zero (they
  are not computed); its output is read at the selected tokens only.
* The stages: ``keep=r`` keeps ``r``, ``r^2``, ``r^3`` from 1/4, 1/2 and 3/4 of the total number of blocks on
  (PVT v2 b0: blocks 3-4, 5-6, 7-8 of 8, i.e. stages 2, 3 and 4), of each block's own token count; a per-block list
  of ratios otherwise. ``budget=`` and ``r=`` are not supported on pyramids.
* Training uses the masked path (attention and MLP outputs gated by the selection, hidden features of idle tokens
  zeroed before the convolution); the token-cut loss is not recorded (pyramid attention maps are not square).
* An empty batch (0 images) gives an empty output, ``(0, num_classes)``: timm's PVT v2 stages and attention reshape
  with -1, which a tensor of 0 elements cannot take, so patching also swaps each stage's class for one that runs
  an empty batch with explicit sizes (any other batch runs timm's own stage forward).

Supported: PVT v2 with spatial-reduction attention (``pvt_v2_b0`` ... ``pvt_v2_b5``). Not supported, with an error
that says so: the linear-attention variant (``pvt_v2_b2_li``, whose pooled keys do not follow the tokens) and
other pyramids.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, UnsupportedModelError
from ..base import TokenReducer
from ..idle import PATHS, IdleReducer, idle_keep_ratios
from ..types import ViTInfo
from .base import REDUCER_ATTR, ModelAdapter, register_adapter

try:
    from timm.models.pvt_v2 import Block as PvtBlock, PyramidVisionTransformerStage as PvtStage
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
except ImportError:  # pragma: no cover - timm without PVT v2
    PvtBlock = PvtStage = PyramidVisionTransformerV2 = None


def pyramid_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of every stage, in order."""
    return [blk for stage in model.stages for blk in stage.blocks]


def _grid_sizes(model: nn.Module) -> list[int]:
    """Tokens each block sees at the model's default input size."""
    h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
    out = []
    for stage, feat in zip(model.stages, model.feature_info):
        red = int(feat["reduction"])
        out += [(h // red) * (w // red)] * len(stage.blocks)
    return out


@register_adapter
class PyramidAdapter(ModelAdapter):
    """timm's PVT v2 pyramids: a method runs on them through its pyramid reducer (:data:`PYRAMID_REDUCERS`)."""

    describes = "timm PVT v2 pyramids (pvt_v2_b0-b5) for methods that keep every token (idle)"

    def claims(self, model: nn.Module) -> bool:
        return PyramidVisionTransformerV2 is not None and isinstance(model, PyramidVisionTransformerV2)

    def inspect(self, model: nn.Module) -> ViTInfo:  # pragma: no cover - pyramids are costed by counting
        raise UnsupportedModelError("a pyramid ViT has no single token grid; leanvit describes plain ViTs only")

    def patch(self, model: nn.Module, cls: type[TokenReducer], r: Any, budget: Any, keep: Any, measure: bool,
              options: dict[str, Any], restore: bool = False) -> nn.Module:
        """Build the method's pyramid reducer; checks everything before it changes the model. ``restore`` changes
        nothing: idling removes no token, so every stage's grid is whole."""
        variant = PYRAMID_REDUCERS.get(cls)
        if variant is None:
            why = ("removes or merges tokens, which a pyramid ViT's stages cannot take (its attention, convolutions "
                   "and downsampling need the whole grid)" if not cls.keeps_all_tokens
                   else "has no pyramid variant")
            keepers = ", ".join(f"'{c.name}'" for c in PYRAMID_REDUCERS)
            raise UnsupportedModelError(f"'{cls.name}' {why}; on a pyramid ViT use {keepers}")
        if keep is None:
            given = "r=" if r is not None else "budget="
            raise ConfigError(f"{given} is not supported for {cls.name} on pyramid ViTs; give keep= (a ratio or a "
                              f"per-block list)")
        blocks = pyramid_blocks(model)
        for i, blk in enumerate(blocks):
            if type(blk) not in (PvtBlock, IdlePyramidBlock):
                raise UnsupportedModelError(f"block {i} of {type(model).__name__} is a {type(blk).__name__}, not "
                                            f"timm's PVT v2 Block")
            if blk.attn.pool is not None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} uses PVT v2's linear attention (pooled keys, e.g. pvt_v2_b2_li), whose "
                    f"keys do not follow the tokens; idling supports PVT v2 with spatial-reduction attention "
                    f"(pvt_v2_b0-b5)")
        unknown = set(options) - {"path", "trace"}
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} for {cls.name} on a pyramid ViT")
        if options.get("trace"):
            raise ConfigError("trace= (leanvit vis) is not supported on pyramid ViTs")
        reducer = variant(idle_keep_ratios(keep, len(blocks)), _grid_sizes(model), path=options.get("path", "auto"))
        reducer.report.update(method=cls.name, keep=keep, schedule=reducer.schedule,
                              schedule_counts=reducer.schedule_counts)
        self.apply(model, reducer)
        return model

    def apply(self, model: nn.Module, reducer: TokenReducer) -> None:
        reducer = reducer.shared()  # patch() may hand back the calling thread's copy (get_reducer) on a failure
        model.__dict__[REDUCER_ATTR] = reducer
        model.__dict__["_leanvit_orig_class"] = type(model)
        for stage in model.stages:
            if type(stage) is PvtStage:
                stage.__class__ = EmptyBatchPyramidStage
        for i, blk in enumerate(pyramid_blocks(model)):
            blk.__class__ = IdlePyramidBlock
            blk.__dict__[REDUCER_ATTR] = reducer
            blk.__dict__["_leanvit_index"] = i

    def remove(self, model: nn.Module) -> None:
        for stage in model.stages:
            if type(stage) is EmptyBatchPyramidStage:
                stage.__class__ = PvtStage
        for blk in pyramid_blocks(model):
            blk.__class__ = PvtBlock
            blk.__dict__.pop(REDUCER_ATTR, None)
            blk.__dict__.pop("_leanvit_index", None)
        model.__dict__.pop("_leanvit_orig_class", None)
        del model.__dict__[REDUCER_ATTR]


class PyramidIdleReducer(TokenReducer):
    """Per-block keep ratios of a pyramid; ``schedule`` holds the idle tokens per block at the default size."""

    name = "idle"
    schedule_counts = "idle"
    display = "IdleViT"
    keeps_all_tokens = True
    _per_forward = TokenReducer._per_forward + ("cut_inputs",)

    def __init__(self, ratios: list[float], tokens: list[int], path: str = "auto"):
        if path not in PATHS:
            raise ConfigError(f"unknown idle path '{path}'; choose one of {', '.join(PATHS)}")
        self.ratios = list(ratios)
        self.tokens = list(tokens)
        self.path = path
        self.schedule = [n - self.keep_count(i, n) for i, n in enumerate(tokens)]
        self.report: dict[str, Any] = {}
        self.trace, self.prop_attn, self.theta = False, False, 1.0
        self.training = False
        self.cut_inputs: list[dict[str, torch.Tensor]] = []  # not recorded on pyramids (see the module docs)
        self._size, self.source, self._state, self.trace_log = None, None, None, []
        self._bind_thread()  # what TokenReducer.__init__ does for the threads (for_thread)

    @property
    def keep_ratios(self) -> list[float]:
        return list(self.ratios)

    def keep_count(self, i: int, n: int) -> int:
        return n if self.ratios[i] >= 1.0 else max(1, int(n * self.ratios[i] + 1e-9))

    def masked(self) -> bool:
        return self.path == "masked" or (self.path == "auto" and self.training)

    def block_tokens(self):
        raise NotImplementedError("pyramid blocks are costed by counting, not by the ViT token model")

    def options(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.cut_inputs = []


class IdlePyramidBlock(PvtBlock if PvtBlock is not None else nn.Module):
    """PVT v2 ``Block`` that computes only the tokens its reducer selects (see the module docs)."""

    _leanvit_reducer: PyramidIdleReducer
    _leanvit_index: int

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        red, i = self._leanvit_reducer.for_thread(), self._leanvit_index  # this thread's forward state
        if i == 0:
            red.training = self.training
        B, N, C = x.shape
        if B == 0:  # nothing to compute; timm's attention (a dense block) would reshape the empty batch with -1
            return x
        K = red.keep_count(i, N)
        if K >= N:
            return super().forward(x, feat_size)
        a = self.attn
        H, Dh = a.num_heads, a.head_dim
        h = self.norm1(x)
        # selection: the average token's query against every token's full-resolution key, mean over heads
        w, b = a.kv.weight[:C], None if a.kv.bias is None else a.kv.bias[:C]
        k_full = F.linear(h, w, b).view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, Dh)
        q_avg = a.q(h.mean(1, keepdim=True)).view(B, 1, H, Dh).transpose(1, 2)  # (B, H, 1, Dh)
        score = ((q_avg * a.scale) @ k_full.transpose(-2, -1)).mean(1)[:, 0]  # (B, N)
        top = score.topk(K, dim=1, sorted=False).indices  # (B, K)
        k, v = self._reduced_kv(h, feat_size)  # keys and values from every token, idle ones included
        drop = a.attn_drop.p if self.training else 0.0
        if red.masked():
            m = torch.zeros(B, N, 1, dtype=x.dtype, device=x.device).scatter_(1, top[..., None], 1.0)
            q = a.q(h).view(B, N, H, Dh).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop).transpose(1, 2).reshape(B, N, C)
            x = x + self.drop_path1(a.proj_drop(a.proj(out)) * m)
            y = self._mlp(self.mlp.fc1(self.norm2(x)) * m, feat_size)
            return x + self.drop_path2(y * m)
        idx = top[..., None]
        hs = h.gather(1, idx.expand(B, K, C))
        q = a.q(hs).view(B, K, H, Dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop).transpose(1, 2).reshape(B, K, C)
        xs = x.gather(1, idx.expand(B, K, C)) + self.drop_path1(a.proj_drop(a.proj(out)))
        hidden = self.mlp.fc1(self.norm2(xs))  # (B, K, D)
        grid = hidden.new_zeros(B, N, hidden.shape[-1]).scatter(1, idx.expand_as(hidden), hidden)
        y = self._mlp(grid, feat_size, top)
        xs = xs + self.drop_path2(y)
        return x.scatter(1, idx.expand(B, K, C), xs)  # idle tokens unchanged

    def _reduced_kv(self, h: torch.Tensor, feat_size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's spatial-reduction keys and values of the whole (normalised) grid, ``(B, H, N_r, Dh)`` each."""
        a = self.attn
        B, N, C = h.shape
        if a.sr is not None:
            h = a.sr(h.permute(0, 2, 1).reshape(B, C, *feat_size)).flatten(2).permute(0, 2, 1)
            h = a.norm(h)
        # sizes, not -1: an empty batch leaves -1 undetermined
        kv = a.kv(h).reshape(B, h.shape[1], 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def _mlp(self, hidden: torch.Tensor, feat_size: list[int], top: torch.Tensor | None = None) -> torch.Tensor:
        """The rest of timm's ``MlpWithDepthwiseConv`` after ``fc1``, on the grid of hidden features; with ``top``,
        read at those tokens only."""
        mlp = self.mlp
        B, N, D = hidden.shape
        z = mlp.dwconv(mlp.relu(hidden.transpose(1, 2).reshape(B, D, *feat_size))).flatten(2).transpose(1, 2)
        if top is not None:
            z = z.gather(1, top[..., None].expand(B, top.shape[1], D))
        return mlp.drop(mlp.fc2(mlp.drop(mlp.act(z))))


class EmptyBatchPyramidStage(PvtStage if PvtStage is not None else nn.Module):
    """PVT v2 stage that also takes an empty batch: timm's forward reshapes the tokens with -1, which 0 images leave
    undetermined. Any other batch runs timm's forward unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:  # static under torch.compile for a fixed shape
            return super().forward(x)
        if self.downsample is not None:
            x = self.downsample(x)  # (0, H, W, C)
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        for blk in self.blocks:
            x = blk(x, (H, W))
        x = self.norm(x)
        return x.reshape(B, H, W, x.shape[-1]).permute(0, 3, 1, 2).contiguous()


# a method's reducer class -> its pyramid variant
PYRAMID_REDUCERS: dict[type[TokenReducer], type[TokenReducer]] = {IdleReducer: PyramidIdleReducer}
