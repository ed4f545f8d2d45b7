"""timm's ``Eva`` family (EVA, EVA-02 and the other rotary ViTs built on ``timm.models.eva.Eva``): the one place
that touches Eva's internals.

Supported: ``EvaBlock`` (pre-norm, LayerScale ``gamma_1``/``gamma_2``, ``attn_only_layer_scale``) and
``EvaBlockPostNorm``; ``EvaAttention`` (fused ``qkv`` with separate ``q_bias``/``v_bias``, or separate
``q_proj``/``k_proj``/``v_proj``; ``scale_attn_inner``, q/k norm, an output gate) and timm's ``AttentionRope``
(``attn_type='rope'``) without grouped-query attention; ``Mlp``, ``GluMlp`` and ``SwiGLU``; a cls token and/or
register tokens; rotary position embeddings of every ``rope_type`` (``cat``, ``mixed``, ``dinov3``, ``mrope``) and
none (``use_rot_pos_emb=False``: ``ViTInfo.rotary`` is False and nothing is rotated); pooling
``token``, ``avg``, ``avgmax``, ``max`` and the attention-pool head (``global_pool='map'``).

What differs from timm's forward, and why:

* **Rotary attention (RoPE).** timm's Eva computes the rotary table once per forward (``rope``, one ``(N, D)``
  row of concatenated sin and cos per grid position, or ``(H, N, D)`` per block for ``mixed``) and each block's
  attention rotates its queries and keys ``x[:, npt:]`` by the rows in order, which holds only while every token is
  at its grid position. Patched, the attention view's ``rotate`` (called by :mod:`leanvit.reduce.attention` after
  q/k norm) reads the current tokens' grid positions from the reducer (:meth:`TokenReducer.token_positions
  <leanvit.reduce.base.TokenReducer.token_positions>`) and rotates each token by its own position's row: a
  kept token keeps its rotation wherever it now sits in the sequence, and a token without a position (prefix
  tokens, EViT's fused token: position ``info.num_image``) gets an identity row (sin 0, cos 1), i.e. is not
  rotated, as timm leaves prefix tokens. While no token has moved, the rotation is timm's own code on the table
  in order (bit-identical to the unpatched model).
* **ToMe's merged token keeps its destination's position** (the rule the methods follow in
  :meth:`TokenReducer._moved <leanvit.reduce.base.TokenReducer._moved>`; facebookresearch/ToMe issue 29 leaves it
  open). Why: the merged token then sits where one of its own patches is, on the integer grid the weights were
  trained on, and continues the token that was kept in place (the destination of bipartite matching); the rule
  needs nothing but an index, serves every rope type and is the same gather for every method. The alternatives,
  measured on an EVA-02-style model trained on Fashion-MNIST with RoPE as its only position signal
  (``benchmarks/rope_tome.py``; BENCHMARKS.md, "RoPE: where ToMe's merged token sits"), are worse at every ``r``
  tried: the size-weighted centroid of the merged patches' grid coordinates (rotated exactly at that fractional
  position: timm's angles are linear in the coordinates) loses clearly, since ToMe's partners are often not grid
  neighbours and their centroid can then lie where none of the token's patches is; no rotation for merged tokens
  loses more; rotating by the place in the sequence (not tracking positions) breaks the model.
* **Post-norm blocks** (``EvaBlockPostNorm``, ``x + norm1(attn(x))``): the norm is applied to each computed
  token's attention (and MLP) output; on idling's masked path the selection gates the normalised output, since a
  norm of a gated zero is the norm's bias, not zero.
* **Pooling** weights tokens by their size where the reducer tracks sizes (ToMe, GTP with proportional
  attention), like :mod:`.timm_vit`: ``avg``/``avgmax`` average the image tokens weighted by the patches each
  stands for; the attention-pool head gets proportional attention, ``+ log(size)`` on its logits (its own
  ``attn_mask`` argument), so a merged token weighs as the tokens it stands for would have. ``max`` and ``token``
  are unchanged.
* The attention runs through :mod:`leanvit.reduce.attention` (``scaled_dot_product_attention`` or the explicit
  map a method asks for) instead of Eva's own ``forward``; a view in timm's ``Attention`` layout is built per
  block call (it carries that forward's rotary table and reducer, so threads never share one), reads the
  attention's own modules and parameters, and is never a submodule: state-dict keys do not change.

Refused with :class:`~leanvit.errors.UnsupportedModelError`: attention masks and ``is_causal``; grouped-query
attention (``num_kv_heads``); an attention output width other than the model width; a subclass of ``Eva`` or a
block, attention, MLP or pooling head leanvit does not know; an attention pool with its own position embedding;
gradient checkpointing and patch dropout in training while tokens are reduced (the first would run the reducer
twice, the second changes the tokens before the blocks); a reducing schedule on an input of another size (as for
every family).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import (AttentionPoolLatent, AttentionRope, GluMlp, Mlp, SwiGLU, apply_rot_embed_cat,
                         register_notrace_module)
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

from ...errors import UnsupportedModelError
from ...ops.schedule import BlockShape
from ...ops.select import gather_tokens
from ..base import TokenReducer
from ..types import ViTInfo
from .base import REDUCER_ATTR, ModelAdapter, block_reducer, register_adapter
from .timm_vit import _ReducedMixin, not_scriptable, refuse_fx_sizes

ATTENTIONS = (EvaAttention, AttentionRope)
MLPS = (Mlp, GluMlp, SwiGLU)


def _fail(model: nn.Module, why: str) -> None:
    raise UnsupportedModelError(
        f"leanvit cannot patch {type(model).__name__}: {why}. Supported: timm Eva models (EVA, EVA-02 and other "
        f"RoPE ViTs of timm.models.eva) with EvaBlock or EvaBlockPostNorm, EvaAttention or AttentionRope without "
        f"grouped-query attention, and Mlp, GluMlp or SwiGLU MLPs.")


# ----------------------------------------------------------------------------------------------- attention view
class _QKV:
    """The attention's query, key and value projections as one timm-layout ``qkv`` Linear: ``(B, N, 3 * A)`` in
    q, k, v order, with ``weight`` and ``bias`` the concatenated parameters (read by idling's subset attention).

    Eva's fused form keeps ``qkv`` without a bias and adds ``cat(q_bias, k_bias, v_bias)`` (``k_bias`` a zero
    buffer), inside the matmul or after it (``qkv_bias_separate``); the separate form has three Linears, ``k_proj``
    without a bias. Parameters are read at every call, so ``.to()`` and loaded weights reach the view."""

    def __init__(self, attn: nn.Module):
        self.attn = attn
        fused = attn.qkv is not None
        self.in_features = attn.qkv.in_features if fused else attn.q_proj.in_features
        self.out_features = attn.qkv.out_features if fused else 3 * attn.q_proj.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        if a.qkv is None:  # (B, N, A) three times
            return torch.cat((a.q_proj(x), a.k_proj(x), a.v_proj(x)), dim=-1)
        if getattr(a, "qkv_bias_separate", False):
            return a.qkv(x) + self.bias
        return F.linear(x, a.qkv.weight, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        a = self.attn
        if a.qkv is not None:
            return a.qkv.weight
        return torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight))

    @property
    def bias(self) -> torch.Tensor | None:
        a = self.attn
        if a.qkv is not None:
            q_bias = getattr(a, "q_bias", None)
            return a.qkv.bias if q_bias is None else torch.cat((q_bias, a.k_bias, a.v_bias))
        projs = (a.q_proj, a.k_proj, a.v_proj)
        if all(p.bias is None for p in projs):
            return None
        return torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs])


def _qkv(attn: nn.Module) -> Any:
    """The view's ``qkv``: the attention's own fused Linear where it carries its whole bias, else a :class:`_QKV`."""
    if attn.qkv is not None and getattr(attn, "q_bias", None) is None:
        return attn.qkv
    return _QKV(attn)


class AttentionView:
    """One Eva attention in timm's ``Attention`` layout, for :mod:`leanvit.reduce.attention` (no rotary table)."""

    def __init__(self, attn: nn.Module):
        self.module = attn
        self.qkv = _qkv(attn)
        self.q_norm, self.k_norm, self.norm, self.gate = attn.q_norm, attn.k_norm, attn.norm, attn.gate
        self.proj, self.attn_drop, self.proj_drop = attn.proj, attn.attn_drop, attn.proj_drop
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale

    @property
    def training(self) -> bool:
        return self.module.training


class RotaryAttentionView(AttentionView):
    """An attention view that rotates queries and keys by their tokens' grid positions (RoPE).

    Args:
        attn: the block's ``EvaAttention`` / ``AttentionRope``.
        reducer: the reducer of this forward (the calling thread's).
        rope: this forward's rotary table for the block, ``(N, D)`` or ``(H, N, D)`` (``mixed``), ``N`` the grid's
            positions in order and ``D`` the concatenated sin and cos of one head.
    """

    def __init__(self, attn: nn.Module, reducer: TokenReducer, rope: torch.Tensor):
        super().__init__(attn)
        self.reducer, self.rope = reducer, rope
        self.num_prefix = int(attn.num_prefix_tokens)
        self.half = bool(getattr(attn, "rotate_half", False))

    def rotate(self, t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Queries or keys ``t`` ``(B, H, n, Dh)`` rotated by their tokens' positions; ``index`` ``(B, n)``: which
        of the current tokens (prefix included) the rows are, None for all of them in order."""
        pos = self.reducer.token_positions()  # (B, P + m) or None: every token at its place
        P = self.num_prefix
        if pos is None and index is None:  # timm's own rotation: prefix tokens as they are, the grid in order
            return torch.cat([t[:, :, :P], apply_rot_embed_cat(t[:, :, P:], self.rope, half=self.half)], dim=2)
        if pos is None:
            pos = self.grid_positions(t.shape[0], t.device)
        if index is not None:
            pos = pos.gather(1, index)  # (B, n)
        return apply_rot_embed_cat(t, self.rows(pos), half=self.half)

    def grid_positions(self, B: int, device: torch.device) -> torch.Tensor:
        """``(B, P + N)`` the positions while no token has moved: prefix tokens (none), then the grid in order."""
        N = self.reducer.info.num_image
        prefix = torch.full((self.num_prefix,), N, dtype=torch.long, device=device)
        return torch.cat([prefix, torch.arange(N, device=device)]).expand(B, -1)

    def rows(self, pos: torch.Tensor) -> torch.Tensor:
        """The rotary rows ``(B, 1 or H, n, D)`` of the grid positions ``pos`` ``(B, n)``; position ``N`` (no
        position) is the identity rotation."""
        rope = self.rope
        N = self.reducer.info.num_image
        if rope.dim() not in (2, 3) or rope.shape[-2] != N:
            raise UnsupportedModelError(
                f"the rotary embedding of this forward has shape {tuple(rope.shape)}, not one row per position of "
                f"the {N}-token grid (patch dropout in training?); token reduction needs the model's own grid")
        D = rope.shape[-1]
        identity = torch.cat([rope.new_zeros(D // 2), rope.new_ones(D - D // 2)])  # sin 0, cos 1
        table = torch.cat([rope, identity.expand(*rope.shape[:-2], 1, D)], dim=-2)  # (..., N + 1, D)
        if rope.dim() == 2:
            return table[pos].unsqueeze(1)  # (B, 1, n, D)
        return table[:, pos].transpose(0, 1)  # (H, B, n, D) -> (B, H, n, D)


def attention_view(attn: nn.Module, reducer: TokenReducer, rope: torch.Tensor | None) -> AttentionView:
    """The view a patched block's attention runs through in this forward."""
    return AttentionView(attn) if rope is None else RotaryAttentionView(attn, reducer, rope)


# ----------------------------------------------------------------------------------------------- blocks
class _ReducingEva:
    """What every patched Eva block does around its own layout. Never constructed: patching swaps the class of an
    existing block and sets ``_leanvit_reducer`` and ``_leanvit_index``."""

    _leanvit_reducer: TokenReducer
    _leanvit_index: int

    def __prepare_scriptable__(self) -> nn.Module:
        return not_scriptable(self)

    def _begin(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> TokenReducer:
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("token reduction cannot be combined with attention masks")
        return block_reducer(self, x)

    def _finish(self, red: TokenReducer, x: torch.Tensor) -> torch.Tensor:
        i = self._leanvit_index
        x = red.after_mlp(i, x)
        return red.end(x) if i == red.info.depth - 1 else x


class ReducingEvaBlock(_ReducingEva, EvaBlock):
    """Eva's pre-norm block: ``x + gamma_1 * attn(norm1(x))`` -> reduce -> ``x + gamma_2 * mlp(norm2(x))``."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        red = self._begin(x, attn_mask, is_causal)
        i = self._leanvit_index
        x = red.before_attn(i, x)
        a = red.attend(i, attention_view(self.attn, red, rope), self.norm1(x))
        if a.index is not None:  # the attention computed a subset: so does the rest of the block
            x = gather_tokens(x, a.index)
        y = a.x if self.gamma_1 is None else self.gamma_1 * a.x
        x = x + self.drop_path1(y)
        x = red.reduce(i, x, a)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        y = self.drop_path2(y)
        x = x + (y if a.gate is None else y * a.gate)
        return self._finish(red, x)


class ReducingEvaBlockPostNorm(_ReducingEva, EvaBlockPostNorm):
    """Eva's post-norm block: ``x + norm1(attn(x))`` -> reduce -> ``x + norm2(mlp(x))``; a selection gate
    multiplies the normalised outputs (see the module docs)."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        red = self._begin(x, attn_mask, is_causal)
        i = self._leanvit_index
        x = red.before_attn(i, x)
        a = red.attend(i, attention_view(self.attn, red, rope), x)
        if a.index is not None:
            x = gather_tokens(x, a.index)
        y = self.drop_path1(self.norm1(a.x))
        x = x + (y if a.gate is None else y * a.gate)
        x = red.reduce(i, x, a)
        y = self.drop_path2(self.norm2(self.mlp(x)))
        x = x + (y if a.gate is None else y * a.gate)
        return self._finish(red, x)


BLOCK_CLASSES: dict[type, type] = {EvaBlock: ReducingEvaBlock, EvaBlockPostNorm: ReducingEvaBlockPostNorm}
for _reducing in BLOCK_CLASSES.values():  # leaves of timm's fx tracer, as timm_vit's blocks (see register_block)
    register_notrace_module(_reducing)


# ----------------------------------------------------------------------------------------------- the model
def _refuse_training_forward(model: Eva) -> None:
    """Gradient checkpointing would run the reducer twice (the recomputed forward); patch dropout changes the
    tokens before the blocks. Both act only in training, and only matter while tokens are reduced."""
    red = model.__dict__.get(REDUCER_ATTR)
    if red is None or not model.training or not red.reducing:
        return
    if model.grad_checkpointing:
        raise UnsupportedModelError("token reduction cannot be combined with gradient checkpointing (the "
                                    "recomputed forward would run the reducer twice)")
    if model.patch_drop is not None:
        raise UnsupportedModelError("token reduction cannot be combined with patch dropout in training "
                                    "(patch_drop_rate > 0 removes tokens before the blocks); set "
                                    "model.patch_drop = None or train unpatched")


class ReducedEva(_ReducedMixin, Eva):
    """Eva whose pooling weights tokens by their size (see the module docs); ``forward_intermediates`` as
    :class:`~leanvit.reduce.adapters.timm_vit._ReducedMixin` (NCHW only on the whole grid, e.g. ``restore``)."""

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        _refuse_training_forward(self)
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_intermediates(self, *args: Any, **kwargs: Any):
        _refuse_training_forward(self)
        return super().forward_intermediates(*args, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        red = self.__dict__.get(REDUCER_ATTR)
        reads_sizes = self.attn_pool is not None or (self.global_pool if pool_type is None else pool_type) in (
            "avg", "avgmax")
        if red is not None and reads_sizes and refuse_fx_sizes(red):
            return super().pool(x, pool_type)
        size = None if red is None else red.for_thread().current_sizes()  # (B, N) this thread's forward left
        if size is None or size.shape[1] != x.shape[1]:  # no sizes, or the whole grid given back (restore)
            return super().pool(x, pool_type)
        if self.attn_pool is not None:  # proportional attention of the latent query: + log(size_j)
            return self.attn_pool(x, attn_mask=size.log()[:, None, None, :].to(x.dtype))
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        P = self.num_prefix_tokens
        xs, w = x[:, P:], size[:, P:, None].to(x.dtype)  # (B, n, C), (B, n, 1)
        mean = (xs * w).sum(1) / w.sum(1)
        return mean if pool_type == "avg" else 0.5 * (xs.amax(dim=1) + mean)


def _attn_dims(model: nn.Module, i: int, attn: nn.Module, dim: int) -> int:
    """Check block i's attention layout; its width (heads x head dim)."""
    if type(attn) not in ATTENTIONS:
        _fail(model, f"block {i} uses {type(attn).__name__}, not EvaAttention or AttentionRope")
    for name in ("q_norm", "k_norm", "norm", "gate", "proj", "attn_drop", "proj_drop", "num_heads", "head_dim",
                 "scale", "qkv", "q_proj", "k_proj", "v_proj", "num_prefix_tokens"):
        if not hasattr(attn, name):
            _fail(model, f"block {i} attention has no '{name}' (unknown timm version)")
    if getattr(attn, "num_kv_groups", 1) != 1:
        _fail(model, f"block {i} uses grouped-query attention (num_kv_heads), which the reducers' attention "
                     f"does not implement")
    width = attn.num_heads * attn.head_dim
    qkv = _qkv(attn)
    if qkv.in_features != dim or qkv.out_features != 3 * width or attn.proj.out_features != dim:
        _fail(model, f"block {i} attention maps {qkv.in_features} -> {qkv.out_features} -> "
                     f"{attn.proj.out_features} channels, not width {dim} with {attn.num_heads} heads of "
                     f"{attn.head_dim}")
    return width


def inspect_eva(model: nn.Module) -> ViTInfo:
    """Check that ``model`` is an Eva leanvit can patch and describe it; raise UnsupportedModelError if not."""
    if type(model) not in (Eva, ReducedEva):
        _fail(model, "it is a subclass of timm's Eva that leanvit does not know" if isinstance(model, Eva)
              else "it is not a timm Eva")
    if not isinstance(model.blocks, nn.ModuleList) or len(model.blocks) == 0:
        _fail(model, "model.blocks is not a non-empty nn.ModuleList")
    dim = int(model.embed_dim)
    P = int(model.num_prefix_tokens)
    shapes = []
    for i, blk in enumerate(model.blocks):
        if type(blk) not in BLOCK_CLASSES and type(blk) not in BLOCK_CLASSES.values():
            _fail(model, f"block {i} is a {type(blk).__name__}, not EvaBlock or EvaBlockPostNorm")
        attn = blk.attn
        width = _attn_dims(model, i, attn, dim)
        if model.rope is not None and int(attn.num_prefix_tokens) != P:
            _fail(model, f"block {i} attention leaves {attn.num_prefix_tokens} tokens unrotated but the model has "
                         f"{P} prefix tokens")
        if type(blk.mlp) not in MLPS:
            _fail(model, f"block {i} MLP is a {type(blk.mlp).__name__}, not Mlp, GluMlp or SwiGLU")
        # per-token MACs outside the attention's qkv/proj/maps: the MLP's Linears and the attention's output gate
        # (counted with the MLP's tokens; the measured MACs of budget= correct the difference)
        linears = [m for m in blk.mlp.modules() if isinstance(m, nn.Linear)]
        if attn.gate is not None:
            linears.append(attn.gate)
        shapes.append(BlockShape(dim, width, sum(m.in_features * m.out_features for m in linears)))
    if model.attn_pool is not None:
        if type(model.attn_pool) is not AttentionPoolLatent:
            _fail(model, f"its pooling head is a {type(model.attn_pool).__name__}, not timm's AttentionPoolLatent")
        if model.attn_pool.pos_embed is not None:
            _fail(model, "its attention-pool head adds a position embedding per token, which does not follow "
                         "removed or merged tokens")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return ViTInfo(depth=len(model.blocks), dim=dim, num_prefix=P, has_cls=model.cls_token is not None, grid=grid,
                   num_image=grid[0] * grid[1], global_pool=str(model.global_pool), blocks=tuple(shapes),
                   rotary=model.rope is not None)


@register_adapter
class EvaAdapter(ModelAdapter):
    """timm ``Eva`` models (:mod:`timm.models.eva`)."""

    describes = "timm Eva models (EVA, EVA-02 and other RoPE ViTs of timm.models.eva)"

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def inspect(self, model: nn.Module) -> ViTInfo:
        return inspect_eva(model)

    def apply(self, model: nn.Module, reducer: TokenReducer) -> None:
        """Swap the block and model classes and attach ``reducer``; :meth:`remove` undoes it exactly."""
        reducer = reducer.shared()  # patch() may hand back the calling thread's copy (get_reducer) on a failure
        inspect_eva(model)
        model.__dict__[REDUCER_ATTR] = reducer
        model.__dict__["_leanvit_orig_class"] = type(model)
        model.__class__ = ReducedEva
        for i, blk in enumerate(model.blocks):
            blk.__class__ = BLOCK_CLASSES.get(type(blk), type(blk))
            blk.__dict__[REDUCER_ATTR] = reducer
            blk.__dict__["_leanvit_index"] = i

    def remove(self, model: nn.Module) -> None:
        original = {reducing: block for block, reducing in BLOCK_CLASSES.items()}
        for blk in model.blocks:
            blk.__class__ = original.get(type(blk), type(blk))
            blk.__dict__.pop(REDUCER_ATTR, None)
            blk.__dict__.pop("_leanvit_index", None)
        model.__class__ = model.__dict__.pop("_leanvit_orig_class")
        del model.__dict__[REDUCER_ATTR]

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """The patch embedding's own size (an Eva built from a config has no pretrained config to read it from)."""
        h, w = (int(v) for v in model.patch_embed.img_size)
        return int(model.patch_embed.proj.in_channels), h, w
