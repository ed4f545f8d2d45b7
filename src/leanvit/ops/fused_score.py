"""GTP's attention scores without the explicit attention map: the attention itself runs on the fused kernel
(``scaled_dot_product_attention``) and the score comes from a second, exact pass over ``q`` and ``k``.

The scores need two statistics of the post-softmax map ``P = softmax(s)``, ``s_ij = scale q_i.k_j + b_j`` per head:
its diagonal ``P_jj`` and its column sums ``sum_i P_ij``. With the row log-sum-exp ``l_i = log sum_j exp(s_ij)``,
``P_ij = exp(s_ij - l_i)``, so

* the diagonal needs no matrix at all: ``P_jj = exp(scale q_j.k_j + b_j - l_j)`` (O(N d) per head);
* the column sums need every ``s_ij`` once more, but only summed: one pass of ``q k^T`` tiles that never writes
  the map, the same work as the attention's first matmul, without its softmax, its second matmul or the memory
  traffic of the ``(B, H, N, N)`` map.

On CUDA both passes are Triton kernels (``_row_lse_kernel``, ``_colsum_kernel``), registered as a torch custom op
so that ``torch.compile(fullgraph=True)`` keeps them; the row log-sum-exp is recomputed by its own kernel rather
than read from the fused attention, because PyTorch's public ``scaled_dot_product_attention`` does not return it.
They run on CPU tensors under ``TRITON_INTERPRET=1`` (the tests). Without Triton, or on CPU, ``torch_scores``
computes the same statistics a slice of the batch at a time.

On CPU the explicit path of :func:`leanvit.reduce.attention.explicit` (the map computed a slice at a time,
multiplied with V and scored while in cache) stays the default: on CPU, fused attention plus a separate score pass
costs more than one cache-blocked explicit pass, because a CPU's fused attention is not much faster than the
explicit one (figures in BENCHMARKS.md, "Design measurements behind code defaults").
"""
from __future__ import annotations

import torch

from .host import probs_chunk_bytes
from .select import combine_scores, map_diagonal

try:  # Triton ships with CUDA builds of PyTorch; the CPU-only build lacks it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

# image tokens' score kinds that the fused pass computes (``random`` and ``cls`` need no map at all)
FUSABLE = ("mixed", "mixed_mean", "colsum", "diag")


def torch_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float,
                 chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diag, col)`` ``(B, H, N)`` of the post-softmax map, computed a slice of the batch at a time (the map of
    one slice, ``chunk_bytes`` of it, is the most held at once; default: the host's slice for explicit attention,
    :func:`leanvit.ops.host.probs_chunk_bytes`, since the pass is the same per-slice work without the product
    with V)."""
    B, H, N, D = q.shape
    step = max(1, (probs_chunk_bytes() if chunk_bytes is None else chunk_bytes) // (H * N * N * 4))
    diags, cols = [], []
    for s in range(0, max(B, 1), step):  # an empty batch is one empty slice: empty statistics, not none
        qs, ks = q[s:s + step].float(), k[s:s + step].float()
        logits = (qs * scale) @ ks.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias[s:s + step, None, None, :].float()
        lse = logits.logsumexp(-1, keepdim=True)
        p = (logits - lse).exp_()
        cols.append(p.sum(-2))
        diags.append(map_diagonal(p))
    return torch.cat(diags), torch.cat(cols)


if triton is not None:
    @triton.jit
    def _row_lse_kernel(q_ptr, k_ptr, b_ptr, lse_ptr, N, D, scale, HAS_BIAS: tl.constexpr, H: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program: BLOCK_M queries of one (image, head); online log-sum-exp over key tiles
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        base = bh * N * D
        q = tl.load(q_ptr + base + offs_m[:, None] * D + offs_d[None, :],
                    mask=(offs_m[:, None] < N) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + base + offs_n[:, None] * D + offs_d[None, :],
                        mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            if HAS_BIAS:
                s += tl.load(b_ptr + (bh // H) * N + offs_n, mask=offs_n < N, other=0.0)[None, :]
            s = tl.where(offs_n[None, :] < N, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(lse_ptr + bh * N + offs_m, m_i + tl.log(s_i), mask=offs_m < N)

    @triton.jit
    def _colsum_kernel(q_ptr, k_ptr, b_ptr, lse_ptr, col_ptr, N, D, scale, HAS_BIAS: tl.constexpr,
                       H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program: BLOCK_N keys of one (image, head); sums exp(s_ij - lse_i) over every query tile
        pid_n, bh = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        base = bh * N * D
        k = tl.load(k_ptr + base + offs_n[:, None] * D + offs_d[None, :],
                    mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        bias = tl.zeros([BLOCK_N], tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + (bh // H) * N + offs_n, mask=offs_n < N, other=0.0)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q = tl.load(q_ptr + base + offs_m[:, None] * D + offs_d[None, :],
                        mask=(offs_m[:, None] < N) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + bh * N + offs_m, mask=offs_m < N, other=float("inf"))
            s = tl.dot(q, tl.trans(k)) * scale + bias[None, :] - lse[:, None]
            p = tl.where((offs_m[:, None] < N) & (offs_n[None, :] < N), tl.exp(s), 0.0)
            acc += tl.sum(p, 0)
        tl.store(col_ptr + bh * N + offs_n, acc, mask=offs_n < N)


def triton_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diag, col)`` ``(B, H, N)`` by the Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    if triton is None:  # pragma: no cover
        raise RuntimeError("Triton is not installed")
    B, H, N, D = q.shape
    q, k = q.contiguous(), k.contiguous()
    b = bias.float().contiguous() if bias is not None else q.new_zeros(1, dtype=torch.float32)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    col = torch.empty_like(lse)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK = 64 if BLOCK_D <= 64 else 32
    _row_lse_kernel[(triton.cdiv(N, BLOCK), B * H)](q, k, b, lse, N, D, scale, HAS_BIAS=bias is not None, H=H,
                                                   BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=BLOCK_D)
    _colsum_kernel[(triton.cdiv(N, BLOCK), B * H)](q, k, b, lse, col, N, D, scale, HAS_BIAS=bias is not None, H=H,
                                                  BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=BLOCK_D)
    s_diag = (q.float() * k.float()).sum(-1) * scale
    if bias is not None:
        s_diag = s_diag + bias.float()[:, None, :]
    return (s_diag - lse).exp(), col


@torch.library.custom_op("leanvit::attention_diag_colsum", mutates_args=())
def _diag_colsum_op(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    if triton is not None and q.is_cuda:
        return triton_scores(q, k, bias, scale)
    return torch_scores(q, k, bias, scale)


@_diag_colsum_op.register_fake
def _(q, k, bias, scale):
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, dtype=torch.float32), q.new_empty(B, H, N, dtype=torch.float32)


def fused_score(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, num_prefix: int,
                kind: str) -> torch.Tensor:
    """Image-token scores ``(B, N_img)`` of kind ``kind`` from ``q`` and ``k`` ``(B, H, N, D)`` and the key bias
    ``(B, N)``, without the attention map (one custom op: Triton on CUDA, sliced PyTorch elsewhere)."""
    if kind not in FUSABLE:
        raise ValueError(f"score '{kind}' is not computed by the fused pass; use one of {', '.join(FUSABLE)}")
    diag, col = _diag_colsum_op(q, k, bias, float(scale))
    return combine_scores(diag, col, num_prefix, kind).to(q.dtype)


__all__ = ["FUSABLE", "fused_score", "torch_scores", "triton_scores"]
