"""Attention building blocks for patched blocks: timm-layout attention that also produces what a reducer asked for
(:class:`~leanvit.reduce.types.AttnRequest`): a size bias, the probabilities or a score of them (explicit, or
beside fused attention), the cls row, the keys, or attention over a selected subset of the tokens.

An adapter maps its library's attention module onto the layout these functions read (``qkv``, ``q_norm``,
``k_norm``, ``norm``, ``gate``, ``proj``, ``attn_drop``, ``proj_drop``, ``num_heads``, ``scale``).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..ops.select import gather_tokens, sparsify_attention
from .types import AttnOut, AttnRequest


def label(name: str):
    """A profiler label (``torch.profiler.record_function``) in eager mode, nothing under ``torch.compile``: dynamo
    ignores profiler calls with a warning, and they must not end up in a compiled graph."""
    if torch.compiler.is_compiling():
        return nullcontext()
    return record_function(name)


# Explicit attention on CPU is computed this many bytes of probabilities at a time, so that each slice of the
# (B, H, N, N) map is written, normalised, multiplied with V and scored while it is still in cache instead of
# streaming the whole map through memory four times (found by timing DeiT-S at batch 32; see gtp_overhead.py).
CPU_PROBS_CHUNK_BYTES = 1 << 21


def attention_forward(attn: nn.Module, x: torch.Tensor, req: AttnRequest = AttnRequest()) -> AttnOut:
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


def _subset_attention(attn: nn.Module, x: torch.Tensor, req: AttnRequest) -> AttnOut:
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


def _stats_op_applies(req: AttnRequest, q: torch.Tensor, attn: nn.Module) -> bool:
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
