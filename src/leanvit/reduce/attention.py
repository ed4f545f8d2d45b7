"""Attention building blocks that reducers compose in :meth:`TokenReducer.attend
<leanvit.reduce.base.TokenReducer.attend>`: timm-layout attention whose pieces a method takes as it needs them,
so a new need is a new block (or a method's own composition), never a wider request type.

* :func:`heads` projects queries, keys and values (``(B, H, N, Dh)``, q/k norm applied) with the additive key
  bias of proportional attention (``log(size)``);
* :func:`fused` runs them through ``scaled_dot_product_attention``; :func:`explicit` computes the map (sliced over
  the batch on CPU when only a score of it is needed), sparsified and/or scored; :func:`explicit_stats` is the
  compiled-CPU form of a score of the map's diagonal and column sums (one cache-blocked custom op);
  :func:`cls_row` is the cls query's attention row beside fused attention;
* :func:`output` applies the attention's own output layers (norm, gate, projection);
* :func:`dense` is the whole unreduced attention; :func:`subset` and :func:`masked_subset` attend among a selected
  subset of the tokens (the gathered inference path and the masked training path of idling).

An adapter maps its library's attention module onto the layout these functions read (``qkv``, ``q_norm``,
``k_norm``, ``norm``, ``gate``, ``proj``, ``attn_drop``, ``proj_drop``, ``num_heads``, ``scale``, and for rotary
attention ``rotate(t, index)``, which rotates queries or keys by their tokens' grid positions).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..ops.host import probs_chunk_bytes
from ..ops.select import diag_colsum, gather_tokens, sparsify_attention
from .types import AttnOut


def label(name: str):
    """A profiler label (``torch.profiler.record_function``) in eager mode, nothing under ``torch.compile``: dynamo
    ignores profiler calls with a warning, and they must not end up in a compiled graph."""
    if torch.compiler.is_compiling():
        return nullcontext()
    return record_function(name)


# Explicit attention on CPU is computed this many bytes of probabilities at a time, so that each slice of the
# (B, H, N, N) map is written, normalised, multiplied with V and scored while it is still in cache instead of
# streaming the whole map through memory four times. None (the default): the host's own value, read at each call
# from leanvit.ops.host.probs_chunk_bytes (the L2 caches of the threads' cores, or a stored calibration; that
# module says on which host the rule was found). An int set here overrides it (tests, experiments).
CPU_PROBS_CHUNK_BYTES: int | None = None


@dataclass
class Heads:
    """One block's attention inputs: the queries, keys and values ``(B, H, N, Dh)`` (q/k norm applied), the size
    bias ``(B, N)`` they were made with and its additive form ``(B, 1, 1, N)`` (None: no bias)."""

    attn: nn.Module
    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    size_bias: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _head_dim(attn: nn.Module) -> int:
    return getattr(attn, "head_dim", attn.qkv.out_features // 3 // attn.num_heads)


def _dropout(attn: nn.Module) -> float:
    return attn.attn_drop.p if attn.training else 0.0


def heads(attn: nn.Module, x: torch.Tensor, size_bias: torch.Tensor | None = None) -> Heads:
    """Queries, keys and values of ``x`` ``(B, N, C)``; ``size_bias`` ``(B, N)`` is added to every query's logit
    for key j (``log s_j``, proportional attention)."""
    B, N, _ = x.shape
    if getattr(attn, "projections", None) is not None:  # three Linears (an adapter's view): no concatenated output
        shape = (B, N, attn.num_heads, _head_dim(attn))
        q, k, v = (_project(attn, x, i).view(shape).transpose(1, 2) for i in range(3))
    else:
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, _head_dim(attn)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    q, k = _rotate(attn, attn.q_norm(q)), _rotate(attn, attn.k_norm(k))
    bias = size_bias[:, None, None, :].to(q.dtype) if size_bias is not None else None
    return Heads(attn, x, q, k, v, size_bias, bias)


def _rotate(attn: nn.Module, t: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Queries or keys ``(B, H, n, Dh)`` rotated by their tokens' positions where the attention is rotary (an
    adapter's view with a ``rotate(t, index)`` method: RoPE); ``index`` ``(B, n)`` says which of the current tokens
    they are (None: all, in order). Unchanged for every other attention."""
    rotate = getattr(attn, "rotate", None)
    return t if rotate is None else rotate(t, index)


def _norm(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The attention's own output norm (timm's ``norm``, Identity unless ``scale_norm``); a layout without one
    (an adapter's view) has none. No module is built per call: this runs in every block of every forward."""
    norm = getattr(attn, "norm", None)
    return out if norm is None else norm(out)


def fused(h: Heads, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(scale q k^T + bias [+ mask]) v`` by ``scaled_dot_product_attention``, ``(B, H, N, Dh)``."""
    attn_mask = h.bias if mask is None else (mask if h.bias is None else mask + h.bias)
    if attn_mask is not None and torch.compiler.is_exporting() and not h.attn.training:
        # torch's ONNX form of masked scaled_dot_product_attention scales queries and transposed keys separately,
        # so ONNX Runtime writes the keys transposed in memory every block; this form (the same values up to
        # rounding) it runs as one fused product with the transpose and the scale folded in
        return _product_attention(h.q, h.k.transpose(-2, -1), h.v, h.attn.scale, attn_mask)
    return F.scaled_dot_product_attention(h.q, h.k, h.v, attn_mask=attn_mask, dropout_p=_dropout(h.attn))


def _product_attention(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, scale: float,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``softmax(scale q k_t + bias) v`` written as products, for export only (``k_t`` the keys transposed,
    ``(B, H, Dh, M)``): ONNX Runtime fuses the scale and a transpose of the keys into the first product, where torch's
    ONNX form of ``scaled_dot_product_attention`` builds the transposed keys through a dozen shape nodes."""
    return _product_probs(q, k_t, scale, bias) @ v


def _product_probs(q: torch.Tensor, k_t: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """``softmax(scale q k_t + bias)`` as products, the bias broadcast (``(B, 1, 1, M)``), for export only (see
    :func:`_product_attention`)."""
    logits = torch.matmul(q, k_t) * scale
    return (logits if bias is None else logits + bias).softmax(-1)


def explicit(h: Heads, theta: float = 1.0, score: Callable[[torch.Tensor], torch.Tensor] | None = None,
             keep_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention through the explicit map: ``(output, probs, score(probs))``, the map sparsified to a keep ratio
    ``theta`` per head (GTP; 1 = dense). When only a score of the map is needed on CPU (and not compiling: each
    slice would be traced and compiled as separate kernels), the map is computed a slice of the batch at a time
    and ``probs`` is None (never held whole); ``keep_probs`` asks for the whole map."""
    sliced = (score is not None and not keep_probs and not h.q.is_cuda and not torch.compiler.is_compiling())
    with label("leanvit.attn.explicit"):
        return _explicit_attention(h.q, h.k, h.v, h.bias, h.attn.scale, h.attn.attn_drop, theta, score, sliced)


def stats_op_applies(h: Heads, theta: float = 1.0) -> bool:
    """Whether a compiled forward should run a score of the map's diagonal and column sums as
    :func:`explicit_stats`: on CPU, for a batch whose map takes more than one slice (a single slice is as fast
    traced, and inductor then fuses it with its neighbours), without gradients (the op has no backward), dense
    (theta 1) and with no attention dropout. Never while exporting (torch.export, ONNX): one exported graph serves
    every batch size, so the choice may not depend on the batch, and the op has no ONNX form; the explicit map in one
    piece gives the same values."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not h.q.is_cuda
            and h.q.shape[0] > _slice_step(h.q)
            and theta >= 1.0 and not torch.is_grad_enabled() and not (h.attn.training and h.attn.attn_drop.p > 0))


def explicit_stats(h: Heads, combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, combine(diagonal, column sums))`` of the explicit map, run as one opaque cache-blocked op
    (:func:`explicit_attention_stats`) so that a compiled graph neither traces the slices nor streams the map."""
    out, diag, col = explicit_attention_stats(h.q, h.k, h.v, h.bias, float(h.attn.scale))
    return out, combine(diag, col)


def cls_row(h: Heads, probs: torch.Tensor | None = None) -> torch.Tensor:
    """The cls query's attention row ``(B, H, N)``: read from the map when there is one, else one row computed
    beside fused attention."""
    if probs is not None:
        return probs[:, :, 0]
    # the keys times the query, not the query times the transposed keys: exported to ONNX, the transposed keys are
    # shared with the attention beside it, so ONNX Runtime cannot fold the transpose into either product and
    # writes the keys transposed in memory (about 1.5 ms a block on DeiT-S at batch 32); the same dot products
    row = (h.k @ (h.q[:, :, :1] * h.attn.scale).transpose(-2, -1)).transpose(-2, -1)  # (B, H, 1, N)
    return (row if h.bias is None else row + h.bias).softmax(dim=-1)[:, :, 0]


def output(h: Heads, out: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The attention's output layers on ``out`` ``(B, H, N, Dh)``: ``(B, N, C)`` after norm, gate and projection;
    ``keep`` ``(B, N, 1)`` gates the tokens (the masked subset path)."""
    attn = h.attn
    B, H, N, Dh = out.shape
    out = out.transpose(1, 2).reshape(B, N, H * Dh)
    out = _norm(attn, out)
    gate_layer = getattr(attn, "gate", None)
    if gate_layer is not None:
        out = out * gate_layer(h.x).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    return out if keep is None else out * keep


def dense(attn: nn.Module, x: torch.Tensor, size_bias: torch.Tensor | None = None, theta: float = 1.0) -> AttnOut:
    """The block's whole attention with an optional size bias and sparsification (explicit only when
    ``theta < 1``): what a block runs when its reducer needs nothing from it."""
    h = heads(attn, x, size_bias)
    out = fused(h) if theta >= 1.0 else explicit(h, theta)[0]
    return AttnOut(output(h, out))


def masked_subset(attn: nn.Module, x: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor],
                  size_bias: torch.Tensor | None = None, logits: bool = False) -> AttnOut:
    """The differentiable (training) form of :func:`subset`: every token is computed, the unselected ones are
    masked out as keys of fused attention and the outputs are gated by the selection (``AttnOut.gate``), so it
    gives the gathered path's output. No ``(B, H, N, N)`` map: the cls row is one row, and with ``logits`` the
    head-averaged logits of the token-cut loss are one matmul over the full width,
    ``mean_h q_h.k_h = (q_1..q_H).(k_1..k_H) / H`` (``AttnOut.logits``, pre-mask)."""
    h = heads(attn, x, size_bias)
    q, k = h.q, h.k
    B, H, N, Dh = q.shape
    cls_logits = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).mean(1)[:, 0]  # (B, N)
    if size_bias is not None:
        cls_logits = cls_logits + size_bias.to(q.dtype)
    index = select(cls_logits)
    selected = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, index, True)
    mean_logits = None
    if logits:
        qf, kf = (t.transpose(1, 2).reshape(B, N, H * Dh) for t in (q, k))
        mean_logits = (qf @ kf.transpose(1, 2)) * (attn.scale / H)  # (B, N, N)
        if size_bias is not None:
            mean_logits = mean_logits + size_bias[:, None, :].to(q.dtype)
    key_mask = torch.zeros(B, 1, 1, N, dtype=q.dtype, device=x.device).masked_fill(
        ~selected[:, None, None, :], float("-inf"))
    keep = selected[..., None].to(x.dtype)
    return AttnOut(output(h, fused(h, key_mask), keep), gate=keep, selected=selected, logits=mean_logits)


def subset(attn: nn.Module, x: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor],
           size_bias: torch.Tensor | None = None) -> AttnOut:
    """Attention among the tokens ``select`` chooses (from the head-averaged, scaled logits of the cls query against
    every key ``(B, N)`` to the positions ``(B, M)`` of the tokens to compute, prefix tokens included),
    computing only what they need (the inference path of idling): keys for every token (to score them), the cls query, then queries and values of the selected tokens;
    unselected tokens are neither queries, keys nor values. Returns the output of the selected tokens only."""
    B, N, C = x.shape
    heads = attn.num_heads
    A = attn.qkv.out_features // 3
    head_dim = A // heads
    # keys of every token, laid out (B, N, H * Dh) so that the selected ones are gathered as rows
    k = attn.k_norm(_project(attn, x, 1).view(B, N, heads, head_dim))
    if getattr(attn, "rotate", None) is not None:  # rotary keys: rotated by every token's position
        k = _rotate(attn, k.transpose(1, 2)).transpose(1, 2)
    k = k.reshape(B, N, A)
    # the cls query: a prefix token, never rotated
    q_cls = attn.q_norm(_project(attn, x[:, :1], 0).view(B, 1, heads, head_dim))
    # mean over heads of q_h.k_h is the full-width product over the number of heads: one (1 x N) product per image
    cls_logits = (q_cls.reshape(B, 1, A) @ k.transpose(1, 2))[:, 0] * (attn.scale / heads)  # (B, N)
    if size_bias is not None:
        cls_logits = cls_logits + size_bias
    index = select(cls_logits)  # (B, M)
    M = index.shape[1]
    xs = gather_tokens(x, index)
    ks = gather_tokens(k, index).view(B, M, heads, head_dim)
    # queries and values of the selected tokens
    q = attn.q_norm(_project(attn, xs, 0).view(B, M, heads, head_dim).transpose(1, 2))
    q = _rotate(attn, q, index)
    v = _project(attn, xs, 2).view(B, M, heads, head_dim).transpose(1, 2)
    bias = None
    if size_bias is not None:
        bias = size_bias.gather(1, index)[:, None, None, :].to(q.dtype)
    if torch.compiler.is_exporting() and not attn.training:
        out = _product_attention(q, ks.permute(0, 2, 3, 1), v, attn.scale, bias)  # keys (B, H, Dh, M)
    else:
        out = F.scaled_dot_product_attention(q, ks.transpose(1, 2), v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(B, M, A)
    out = _norm(attn, out)
    gate_layer = getattr(attn, "gate", None)
    if gate_layer is not None:
        out = out * gate_layer(xs).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    selected = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, index, True)
    return AttnOut(out, index=index, selected=selected)


def _project(attn: nn.Module, x: torch.Tensor, part: int) -> torch.Tensor:
    """The query (0), key (1) or value (2) projection of ``x``: by the attention's own Linear where it keeps three
    (an adapter's view with ``projections``: no concatenated weight is built), else by rows of the fused ``qkv``
    weight (views of it, no copy)."""
    parts = getattr(attn, "projections", None)
    if parts is not None:
        return parts[part](x)
    w, b = attn.qkv.weight, attn.qkv.bias
    rows = slice(part * (w.shape[0] // 3), (part + 1) * (w.shape[0] // 3))
    return F.linear(x, w[rows], None if b is None else b[rows])


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                        scale: float, drop: Callable[[torch.Tensor], torch.Tensor], theta: float,
                        score_fn: Callable[[torch.Tensor], torch.Tensor] | None,
                        sliced: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(output, probs, score_fn(probs))`` of explicit attention; with ``sliced``, computed
    ``CPU_PROBS_CHUNK_BYTES`` (the host's slice) of probabilities at a time and ``probs`` is None (never held
    whole)."""
    B = q.shape[0]
    step = _slice_step(q) if sliced else B
    outs, scores = [], []
    # unsliced: the whole batch as one slice without a loop over its size, which an exported graph (torch.export,
    # ONNX) keeps symbolic; sliced: an empty batch is one empty slice (empty outputs, not no outputs)
    for s in range(0, max(B, 1), max(step, 1)) if sliced else (0,):
        sl = slice(s, s + step) if sliced else slice(None)
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


def _slice_step(q: torch.Tensor) -> int:
    """Images per slice of explicit CPU attention: ``CPU_PROBS_CHUNK_BYTES`` (default: the host's
    :func:`~leanvit.ops.host.probs_chunk_bytes`) of the ``(b, H, N, N)`` map."""
    B, H, N, _ = q.shape
    chunk = CPU_PROBS_CHUNK_BYTES if CPU_PROBS_CHUNK_BYTES is not None else probs_chunk_bytes()
    return max(1, chunk // (H * N * N * q.element_size()))


@torch.library.custom_op("leanvit::explicit_attention_stats", mutates_args=())
def explicit_attention_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(softmax(scale q k^T + bias) @ v, diagonal, column sums)`` of explicit attention, ``(B, H, N, Dv)``,
    ``(B, H, N)``, ``(B, H, N)``, computed ``CPU_PROBS_CHUNK_BYTES`` (the host's slice) of the map at a time.

    Why an op: traced by ``torch.compile``, the loop over slices becomes separate kernels per slice (slow to
    compile), and without it inductor streams the whole ``(B, H, N, N)`` map through memory several times (slower
    than the eager slices at batch 32 on CPU; BENCHMARKS.md, "Design measurements behind code defaults"). As a
    custom op the compiled graph calls this eager, cache-blocked code as one extern kernel."""
    out, _, stats = _explicit_attention(q, k, v, bias, scale, _identity, 1.0, diag_colsum, sliced=True)
    diag, col = stats.unbind(1)
    return out, diag.contiguous(), col.contiguous()


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@explicit_attention_stats.register_fake
def _(q, k, v, bias, scale):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, N), q.new_empty(B, H, N)


def _attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(scale * q @ k^T + bias), ``(B, H, N, N)``; scale, product and bias in one baddbmm kernel."""
    B, H, N, Dh = q.shape
    if torch.compiler.is_exporting():
        # products with the bias broadcast: ONNX Runtime folds the scale and the keys' transpose into one product,
        # where the batched form below exports as eleven nodes a block (the bias expanded and the operands reshaped
        # around a product and a separate scale)
        return _product_probs(q, k.transpose(-2, -1), scale, bias)
    if bias is None:
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    logits = torch.baddbmm(bias.expand(B, H, 1, N).reshape(B * H, 1, N), q.reshape(B * H, N, Dh),
                           k.reshape(B * H, N, Dh).transpose(1, 2), alpha=scale)
    return logits.view(B, H, N, N).softmax(dim=-1)
