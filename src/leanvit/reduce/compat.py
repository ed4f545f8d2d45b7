"""The one place that touches timm internals.

Patching swaps the class of each timm ``Block`` for :class:`ReducingBlock` (a module-level subclass, so patched
models still pickle, keep their state-dict keys and can be restored exactly), of each of leanvit's
:class:`~leanvit.models.shuffle.ChannelShuffleBlock` for :class:`ReducingShuffleBlock`, and, for average-pooling
models, the model's class for one that pools with token sizes. The block's forward reuses the block's own
sub-modules (norms, LayerScale, drop-path, MLP; a channel-shuffle block's own steps around its attention) and
re-implements only the attention call, to expose the attention map, keys and a size bias; that is the part that
depends on timm's ``Attention`` layout, checked here before anything is patched.
Anything not recognised (post-norm blocks, parallel blocks, RoPE attention, another model family) raises
:class:`~leanvit.errors.UnsupportedModelError` instead of running a silently different forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from contextlib import nullcontext

from torch.profiler import record_function
from torch import nn
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock, VisionTransformer

from ..errors import UnsupportedModelError
from ..models.shuffle import ChannelShuffleBlock
from ..ops.schedule import BlockShape
from ..ops.select import gather_tokens, sparsify_attention
from .base import AttnRequest

if TYPE_CHECKING:
    from .base import TokenReducer

try:  # DeiT's distilled ViT (cls + dist token) is a VisionTransformer subclass with its own head
    from timm.models.deit import VisionTransformerDistilled
except ImportError:  # pragma: no cover - very old timm
    VisionTransformerDistilled = None


def label(name: str):
    """A profiler label (``torch.profiler.record_function``) in eager mode, nothing under ``torch.compile``: dynamo
    ignores profiler calls with a warning, and they must not end up in a compiled graph."""
    if torch.compiler.is_compiling():
        return nullcontext()
    return record_function(name)


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


def _fail(model: nn.Module, why: str) -> None:
    raise UnsupportedModelError(
        f"leanvit cannot patch {type(model).__name__}: {why}. Supported: timm VisionTransformer models with "
        f"pre-norm Blocks and standard Attention (DeiT, ViT/AugReg, registers, LayerScale, q/k norm).")


def inspect_vit(model: nn.Module) -> ViTInfo:
    """Check that ``model`` is a ViT leanvit can patch and describe it; raise UnsupportedModelError if not."""
    if not isinstance(model, VisionTransformer):
        _fail(model, "it is not a timm VisionTransformer")
    if not isinstance(model.blocks, nn.Sequential) or len(model.blocks) == 0:
        _fail(model, "model.blocks is not a non-empty nn.Sequential")
    shapes = []
    for i, blk in enumerate(model.blocks):
        if type(blk) not in BLOCK_CLASSES and type(blk) not in BLOCK_CLASSES.values():
            _fail(model, f"block {i} is a {type(blk).__name__}, not timm's pre-norm Block")
        attn = blk.attn
        if type(attn) is not TimmAttention:
            _fail(model, f"block {i} uses {type(attn).__name__}, not timm's Attention")
        for name in ("qkv", "q_norm", "k_norm", "proj", "num_heads", "scale"):
            if not hasattr(attn, name):
                _fail(model, f"block {i} attention has no '{name}' (unknown timm version)")
        head_dim = getattr(attn, "head_dim", attn.qkv.out_features // 3 // attn.num_heads)
        # a channel-shuffle block's idle group may have an MLP of its own
        mlps = [m for m in (blk.mlp, getattr(blk, "mlp_idle", None)) if m is not None]
        linears = [m for mlp in mlps for m in mlp.modules() if isinstance(m, nn.Linear)]
        if not linears:
            _fail(model, f"block {i} MLP has no Linear layers")
        # attention's MACs follow the channels qkv reads: all of them, or a channel-shuffle block's attended group
        shapes.append(BlockShape(attn.qkv.in_features, attn.num_heads * head_dim,
                                 sum(m.in_features * m.out_features for m in linears)))
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    num_prefix = int(model.num_prefix_tokens)
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    return ViTInfo(
        depth=len(model.blocks), dim=int(model.embed_dim), num_prefix=num_prefix, has_cls=has_cls, grid=grid,
        num_image=grid[0] * grid[1], global_pool=str(model.global_pool), blocks=tuple(shapes))


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


# Explicit attention on CPU is computed this many bytes of probabilities at a time, so that each slice of the
# (B, H, N, N) map is written, normalised, multiplied with V and scored while it is still in cache instead of
# streaming the whole map through memory four times (found by timing DeiT-S at batch 32; see gtp_overhead.py).
CPU_PROBS_CHUNK_BYTES = 1 << 21


def attention_forward(attn: TimmAttention, x: torch.Tensor, req: AttnRequest = AttnRequest()) -> AttnOut:
    """timm ``Attention.forward`` producing what ``req`` asks for: an additive key bias (``log(size)``,
    proportional attention), the attention probabilities, a score of them, the cls row, the keys, GTP's attention
    sparsification, or attention over a selected subset of the tokens (gathered, or masked for training).

    Uses fused ``scaled_dot_product_attention`` unless the probabilities (or a score of them) are needed.
    """
    if req.select is not None and not req.masked:
        return _subset_attention(attn, x, req)
    B, N, C = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // 3 // heads)
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, Dh)
    q, k = attn.q_norm(q), attn.k_norm(k)
    size_bias = req.size_bias
    bias = size_bias[:, None, None, :].to(q.dtype) if size_bias is not None else None  # (B, 1, 1, N)
    probs = score = selected = keep = mean_logits = None
    if req.select is not None:
        # the masked (training) path of a subset: unselected tokens are masked out as keys of the fused attention;
        # outputs gated below. No (B, H, N, N) map: the cls row is one row, and the head-averaged logits of the
        # token-cut loss are one matmul over the full width, mean_h q_h.k_h = (q_1..q_H).(k_1..k_H) / H
        cls_logits = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).mean(1)[:, 0]  # (B, N)
        if size_bias is not None:
            cls_logits = cls_logits + size_bias.to(q.dtype)
        index = req.select(cls_logits)
        selected = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, index, True)
        if req.logits:
            qf, kf = (t.transpose(1, 2).reshape(B, N, heads * head_dim) for t in (q, k))
            mean_logits = (qf @ kf.transpose(1, 2)) * (attn.scale / heads)  # (B, N, N)
            if size_bias is not None:
                mean_logits = mean_logits + size_bias[:, None, :].to(q.dtype)
        key_mask = torch.zeros(B, 1, 1, N, dtype=q.dtype, device=x.device).masked_fill(
            ~selected[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask if bias is None else key_mask + bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
        keep = selected[..., None].to(x.dtype)
    elif req.fused_score is not None and not req.explicit:
        # the attention stays fused; the score comes from its own exact pass over q and k (no attention map)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
        with label("leanvit.attn.score"):
            score = req.fused_score(q, k, size_bias, attn.scale)
    elif req.explicit and _stats_op_applies(req, q, attn):
        # compiled on CPU, a score of the map's diagonal and column sums: the sliced explicit attention runs as one
        # opaque op (see explicit_attention_stats), and only the score's combination is traced
        out, diag, col = explicit_attention_stats(q, k, v, bias, float(attn.scale))
        score = req.score_stats(diag, col)
    elif req.explicit:
        # explicit attention: the reducer needs the probabilities or a score of them (labelled for profiles);
        # sliced over the batch on CPU unless the whole map is asked for; never when compiling: each slice would be
        # traced and compiled as separate kernels (their offsets differ), which multiplied GTP's compile time
        sliced = req.score is not None and not req.probs and not q.is_cuda and not torch.compiler.is_compiling()
        with label("leanvit.attn.explicit"):
            out, probs, score = _explicit_attention(q, k, v, bias, attn.scale, attn.attn_drop, req.theta,
                                                    req.score, sliced)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    cls_probs = None
    if req.cls_probs:
        if probs is not None:
            cls_probs = probs[:, :, 0]
        else:
            row = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
            cls_probs = (row if bias is None else row + bias).softmax(dim=-1)[:, :, 0]
    out = out.transpose(1, 2).reshape(B, N, heads * head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    if keep is not None:
        out = out * keep
    return AttnOut(out, probs if req.probs else None, k if req.keys else None, cls_probs, score, gate=keep,
                   selected=selected, logits=mean_logits)


def _subset_attention(attn: TimmAttention, x: torch.Tensor, req: AttnRequest) -> AttnOut:
    """Attention among the tokens ``req.select`` chooses, computing only what they need (the inference path of
    idling): keys for every token (to score them), the cls query, then queries and values of the selected tokens;
    unselected tokens are neither queries, keys nor values. Returns the output of the selected tokens only."""
    B, N, C = x.shape
    heads = attn.num_heads
    A = attn.qkv.out_features // 3
    head_dim = A // heads
    w, b = attn.qkv.weight, attn.qkv.bias
    # keys of every token, laid out (B, N, H * Dh) so that the selected ones are gathered as rows
    k = attn.k_norm(F.linear(x, w[A:2 * A], None if b is None else b[A:2 * A]).view(B, N, heads, head_dim))
    k = k.reshape(B, N, A)
    q_cls = attn.q_norm(F.linear(x[:, :1], w[:A], None if b is None else b[:A]).view(B, 1, heads, head_dim))
    # mean over heads of q_h.k_h is the full-width product over the number of heads: one (1 x N) product per image
    cls_logits = (q_cls.reshape(B, 1, A) @ k.transpose(1, 2))[:, 0] * (attn.scale / heads)  # (B, N)
    if req.size_bias is not None:
        cls_logits = cls_logits + req.size_bias
    index = req.select(cls_logits)  # (B, M)
    M = index.shape[1]
    xs = gather_tokens(x, index)
    ks = gather_tokens(k, index).view(B, M, heads, head_dim).transpose(1, 2)  # (B, H, M, Dh)
    # queries and values of the selected tokens from views of the qkv weight (no copy of the weights)
    q = attn.q_norm(F.linear(xs, w[:A], None if b is None else b[:A]).view(B, M, heads, head_dim).transpose(1, 2))
    v = F.linear(xs, w[2 * A:], None if b is None else b[2 * A:]).view(B, M, heads, head_dim).transpose(1, 2)
    bias = None
    if req.size_bias is not None:
        bias = req.size_bias.gather(1, index)[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, ks, v, attn_mask=bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(B, M, A)
    out = getattr(attn, "norm", nn.Identity())(out)
    gate_layer = getattr(attn, "gate", None)
    if gate_layer is not None:
        out = out * gate_layer(xs).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    selected = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, index, True)
    return AttnOut(out, index=index, selected=selected)


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                        scale: float, drop: Callable[[torch.Tensor], torch.Tensor], theta: float,
                        score_fn: Callable[[torch.Tensor], torch.Tensor] | None,
                        sliced: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(output, probs, score_fn(probs))`` of explicit attention; with ``sliced``, computed
    ``CPU_PROBS_CHUNK_BYTES`` of probabilities at a time and ``probs`` is None (never held whole)."""
    B = q.shape[0]
    step = _slice_step(q) if sliced else B
    outs, scores = [], []
    for s in range(0, B, step):
        sl = slice(s, s + step)
        probs = _attention_probs(q[sl], k[sl], None if bias is None else bias[sl], scale)
        if theta < 1.0:
            probs = sparsify_attention(probs, theta)
        outs.append(drop(probs) @ v[sl])
        if score_fn is not None:
            with label("leanvit.attn.score"):
                scores.append(score_fn(probs))
    score = (scores[0] if len(scores) == 1 else torch.cat(scores)) if scores else None
    if len(outs) == 1:
        return outs[0], probs, score
    return torch.cat(outs), None, score


def _stats_op_applies(req: AttnRequest, q: torch.Tensor, attn: TimmAttention) -> bool:
    """Whether a compiled forward runs the explicit attention as ``explicit_attention_stats``: on CPU, for a batch
    whose map takes more than one slice (a single slice is as fast traced, and inductor then fuses it with its
    neighbours: compiled GTP at batch 1 kept 0.65 of the ideal speed-up with the op, about 0.75-0.85 without), for a
    score of the diagonal and column sums only, without gradients (the op has no backward), dense (theta 1) and
    with no attention dropout."""
    return (req.score_stats is not None and torch.compiler.is_compiling() and not q.is_cuda and not req.probs
            and q.shape[0] > _slice_step(q) and req.theta >= 1.0 and not torch.is_grad_enabled()
            and not (attn.training and attn.attn_drop.p > 0))


def _slice_step(q: torch.Tensor) -> int:
    """Images per slice of explicit CPU attention: ``CPU_PROBS_CHUNK_BYTES`` of the ``(b, H, N, N)`` map."""
    B, H, N, _ = q.shape
    return max(1, CPU_PROBS_CHUNK_BYTES // (H * N * N * q.element_size()))


@torch.library.custom_op("leanvit::explicit_attention_stats", mutates_args=())
def explicit_attention_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(softmax(scale q k^T + bias) @ v, diagonal, column sums)`` of explicit attention, ``(B, H, N, Dv)``,
    ``(B, H, N)``, ``(B, H, N)``, computed ``CPU_PROBS_CHUNK_BYTES`` of the map at a time.

    Why an op: traced by ``torch.compile``, the loop over slices becomes separate kernels per slice (slow to
    compile), and without it inductor streams the whole ``(B, H, N, N)`` map through memory several times (slower
    than the eager slices at batch 32 on CPU: compiled GTP kept 0.77 of the ideal speed-up against about 0.9
    eagerly). As a custom op the compiled graph calls this eager, cache-blocked code as one extern kernel."""
    out, _, stats = _explicit_attention(q, k, v, bias, scale, _identity, 1.0, _diag_colsum, sliced=True)
    diag, col = stats.unbind(1)
    return out, diag.contiguous(), col.contiguous()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _diag_colsum(probs: torch.Tensor) -> torch.Tensor:
    """``(b, 2, H, N)``: the diagonal and the column sums of a slice of the map, stacked."""
    return torch.stack((probs.diagonal(dim1=-2, dim2=-1), probs.sum(-2)), 1)


@explicit_attention_stats.register_fake
def _(q, k, v, bias, scale):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N), q.new_empty(B, H, N)


def _attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(scale * q @ k^T + bias), ``(B, H, N, N)``; scale, product and bias in one baddbmm kernel."""
    B, H, N, Dh = q.shape
    if bias is None:
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    logits = torch.baddbmm(bias.expand(B, H, 1, N).reshape(B * H, 1, N), q.reshape(B * H, N, Dh),
                           k.reshape(B * H, N, Dh).transpose(1, 2), alpha=scale)
    return logits.view(B, H, N, N).softmax(dim=-1)


class _Reducing:
    """What every patched block does around its own layout: start the reducer at block 0, and run the attention
    with what the reducer asks for.

    Never constructed: patching swaps the class of an existing block and sets ``_leanvit_reducer`` and
    ``_leanvit_index``.
    """

    _leanvit_reducer: "TokenReducer"
    _leanvit_index: int
    attn: TimmAttention

    def _begin(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> "TokenReducer":
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("token reduction cannot be combined with attention masks")
        red = self._leanvit_reducer
        if self._leanvit_index == 0:
            n_img = x.shape[1] - red.info.num_prefix
            # a schedule that removes nothing is size-agnostic, so a dynamic_img_size model keeps taking any size;
            # a reducing schedule was solved for the native token count and its MACs hold only there
            if n_img != red.info.num_image and red.reducing:
                raise UnsupportedModelError(
                    f"the input gives {n_img} image tokens but the patch was set up for the model's "
                    f"{red.info.grid[0]}x{red.info.grid[1]} grid ({red.info.num_image} tokens); token reduction "
                    f"needs images of the model's native size (or patch with r=0)")
            red.training = self.training
            red.begin(x)
        return red

    def _finish(self, red: "TokenReducer", x: torch.Tensor) -> torch.Tensor:
        i = self._leanvit_index
        x = red.after_mlp(i, x)
        return red.end(x) if i == red.info.depth - 1 else x


class ReducingBlock(_Reducing, TimmBlock):
    """timm ``Block`` whose forward lets a :class:`TokenReducer` act between attention and MLP."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                **kwargs: Any) -> torch.Tensor:
        red = self._begin(x, attn_mask, is_causal)
        i = self._leanvit_index
        x = red.before_attn(i, x)
        a = attention_forward(self.attn, self.norm1(x), red.request(i))
        if a.index is not None:  # the attention computed a subset: so does the rest of the block
            x = gather_tokens(x, a.index)
        x = x + self.drop_path1(self.ls1(a.x))
        x = red.reduce(i, x, a)
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = x + (y if a.gate is None else y * a.gate)
        return self._finish(red, x)


class ReducingShuffleBlock(_Reducing, ChannelShuffleBlock):
    """:class:`~leanvit.models.shuffle.ChannelShuffleBlock` whose forward lets a :class:`TokenReducer` act between
    the attention (on the attended group) and the MLP, on every channel of the stream.

    The block's own steps do everything but the attention call: its forward is ``attn_input`` -> attention ->
    ``attn_residual`` -> ``mlp_residual`` by contract, and reducers treat channels alike, so reducing the stream
    whatever its channel order is exact.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                **kwargs: Any) -> torch.Tensor:
        red = self._begin(x, attn_mask, is_causal)
        i = self._leanvit_index
        x = red.before_attn(i, x)
        a = attention_forward(self.attn, self.attn_input(x), red.request(i))  # on the attended group, (B, N, a)
        x = self.attn_residual(x, a.x)  # (B, N, C)
        x = red.reduce(i, x, a)
        return self._finish(red, self.mlp_residual(x))


# the blocks leanvit can patch -> the classes they are swapped for
BLOCK_CLASSES: dict[type, type] = {TimmBlock: ReducingBlock, ChannelShuffleBlock: ReducingShuffleBlock}


def _weighted_pool(model: VisionTransformer, x: torch.Tensor, pool_type: str | None) -> torch.Tensor | None:
    """Size-weighted average pooling over image tokens when the reducer tracked token sizes (ToMe, GTP)."""
    pool_type = model.global_pool if pool_type is None else pool_type
    red = getattr(model, "_leanvit_reducer", None)
    if pool_type not in ("avg", "avgmax") or red is None or model.attn_pool is not None:
        return None
    size = red.current_sizes()
    if size is None or size.shape[1] != x.shape[1]:
        return None
    p = 0 if model.pool_include_prefix else model.num_prefix_tokens
    xs, w = x[:, p:], size[:, p:, None].to(x.dtype)
    mean = (xs * w).sum(1) / w.sum(1)
    return mean if pool_type == "avg" else 0.5 * (xs.amax(dim=1) + mean)


class _ReducedMixin:
    """Behaviour shared by patched model classes."""

    def forward_intermediates(self, *args: Any, **kwargs: Any):
        red = getattr(self, "_leanvit_reducer", None)
        fmt = kwargs.get("output_fmt", "NCHW")
        if red is not None and red.reducing and not red.keeps_all_tokens and fmt == "NCHW":
            raise UnsupportedModelError(
                "a token-reduced ViT has fewer tokens than grid cells, so its intermediates cannot be reshaped to "
                "NCHW; call forward_intermediates(..., output_fmt='NLC')")
        return super().forward_intermediates(*args, **kwargs)


class ReducedVisionTransformer(_ReducedMixin, VisionTransformer):
    """VisionTransformer whose average pooling weights tokens by their size (how many patches they stand for)."""

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        out = _weighted_pool(self, x, pool_type)
        return super().pool(x, pool_type) if out is None else out


MODEL_CLASSES: dict[type, type] = {VisionTransformer: ReducedVisionTransformer}
if VisionTransformerDistilled is not None:
    class ReducedVisionTransformerDistilled(_ReducedMixin, VisionTransformerDistilled):
        """Distilled DeiT: its head reads the cls and dist tokens, so only the blocks change."""

    MODEL_CLASSES[VisionTransformerDistilled] = ReducedVisionTransformerDistilled


def apply_patch(model: VisionTransformer, reducer: "TokenReducer") -> None:
    """Swap block (and model) classes and attach ``reducer``; :func:`remove_patch` undoes it exactly."""
    orig_model_cls = type(model)
    if orig_model_cls not in MODEL_CLASSES and orig_model_cls not in MODEL_CLASSES.values():
        if model.global_pool in ("avg", "avgmax"):
            _fail(model, "average pooling on a VisionTransformer subclass leanvit does not know")
    if not reducer.shuffle_blocks and any(isinstance(b, ChannelShuffleBlock) for b in model.blocks):
        raise UnsupportedModelError(f"'{reducer.name}' does not support channel-shuffle blocks (their attention "
                                    f"and MLP run on different channel groups); use gtp, tome or evit")
    model.__dict__["_leanvit_reducer"] = reducer
    model.__dict__["_leanvit_orig_class"] = orig_model_cls
    model.__class__ = MODEL_CLASSES.get(orig_model_cls, orig_model_cls)
    for i, blk in enumerate(model.blocks):
        blk.__class__ = BLOCK_CLASSES.get(type(blk), type(blk))
        blk.__dict__["_leanvit_reducer"] = reducer
        blk.__dict__["_leanvit_index"] = i


def remove_patch(model: nn.Module) -> None:
    if "_leanvit_reducer" not in model.__dict__:
        raise UnsupportedModelError(f"{type(model).__name__} is not patched by leanvit")
    original = {reducing: block for block, reducing in BLOCK_CLASSES.items()}
    for blk in model.blocks:
        blk.__class__ = original.get(type(blk), type(blk))
        blk.__dict__.pop("_leanvit_reducer", None)
        blk.__dict__.pop("_leanvit_index", None)
    model.__class__ = model.__dict__.pop("_leanvit_orig_class")
    del model.__dict__["_leanvit_reducer"]
