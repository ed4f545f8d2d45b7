"""Token importance scores from a post-softmax attention map, and top-k splitting. Pure tensor functions.

All scores are over image tokens only: ``attn`` is ``(B, H, N, N)`` over all tokens and ``num_prefix`` leading
tokens (cls / dist / registers) are excluded from the result, which is ``(B, N - num_prefix)``; higher = keep.
"""
from __future__ import annotations

import torch

SCORES = ("mixed", "mixed_mean", "cls", "colsum", "diag", "random")


def attention_score(attn: torch.Tensor, num_prefix: int, kind: str = "mixed", has_cls: bool = True) -> torch.Tensor:
    """Importance of each image token.

    Kinds (GTP paper, Sec. 3.3):
        ``mixed``: regeneration difficulty x broadcasting ability, each maxed over heads: the diagonal ``A_ii`` (a
            token that mostly attends to itself is hard to rebuild from others) times the column sum
            ``sum_j A_ji`` (how much the other tokens draw on it). The paper's recommended score.
        ``mixed_mean``: the same with the mean over heads.
        ``cls``: attention from the cls token, mean over heads (EViT's score); needs a cls token.
        ``colsum``: column sum, max over heads.
        ``diag``: diagonal, max over heads.
        ``random``: uniform random ranks (an ablation; uses torch's global RNG).
    """
    B, H, N, _ = attn.shape
    if kind == "random":
        return torch.rand(B, N - num_prefix, device=attn.device)
    if kind == "cls":
        if not has_cls:
            raise ValueError("score 'cls' needs a model with a cls token")
        return cls_score(attn[:, :, 0], num_prefix)
    if kind not in SCORES:
        raise ValueError(f"unknown score '{kind}'; choose one of {', '.join(SCORES)}")
    return combine_scores(map_diagonal(attn), attn.sum(-2), num_prefix, kind)


def map_diagonal(probs: torch.Tensor) -> torch.Tensor:
    """The diagonal ``(..., N)`` of attention maps ``(..., N, N)``: ``probs.diagonal(dim1=-2, dim2=-1)``, read as a
    strided slice of each flattened map (every ``N + 1``-th value). The same values, and the same view of a contiguous
    map; written so because ONNX has no diagonal: torch's exporter writes ``diagonal`` as a product of the whole map
    with an identity matrix and a sum over it (two passes over ``(B, H, N, N)``, about 2 ms a block on DeiT-S at batch
    32 in ONNX Runtime), where this slice reads ``N`` values."""
    return probs.flatten(-2)[..., ::probs.shape[-1] + 1]


def diag_colsum(probs: torch.Tensor) -> torch.Tensor:
    """``(b, 2, H, N)``: the diagonal and the column sums of a slice of the map ``(b, H, N, N)``, stacked (the
    statistics GTP's attention scores are combined from)."""
    return torch.stack((map_diagonal(probs), probs.sum(-2)), 1)


def combine_scores(diag: torch.Tensor, col: torch.Tensor, num_prefix: int, kind: str) -> torch.Tensor:
    """The ``mixed``, ``mixed_mean``, ``colsum`` or ``diag`` score of each image token from the attention map's
    diagonal and column sums ``(B, H, N)`` (all tokens; the prefix is dropped here)."""
    diag, col = diag[..., num_prefix:], col[..., num_prefix:]
    if kind == "mixed":
        return diag.amax(1) * col.amax(1)
    if kind == "mixed_mean":
        return diag.mean(1) * col.mean(1)
    if kind == "colsum":
        return col.amax(1)
    if kind == "diag":
        return diag.amax(1)
    raise ValueError(f"score '{kind}' is not computed from the diagonal and column sums")


def cls_score(cls_probs: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """EViT's score from the cls query's attention row ``(B, H, N)``: mean over heads, image tokens only."""
    return cls_probs[:, :, num_prefix:].mean(1)


def split_topk(score: torch.Tensor, num_remove: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(kept (B, N - r), removed (B, r))`` of the highest and the ``num_remove`` lowest scores.

    Kept indices are returned in ascending order so that kept tokens keep their relative order.
    """
    N = score.shape[1]
    order = descending_order(score, 1)
    return ascending(order[:, : N - num_remove], 1), order[:, N - num_remove:]


def descending_order(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.argsort(dim, descending=True)``. Exported, a sort is a top-k whose k torch writes as a shape read at run
    time (three graph nodes each, the cost that counts at batch 1 in ONNX Runtime): top-k with a Python k there, the
    same sort with k a constant of the graph."""
    if torch.compiler.is_exporting():
        return x.topk(x.shape[dim], dim=dim).indices
    return x.argsort(dim=dim, descending=True)


def ascending(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` sorted ascending along ``dim`` (values), as a constant-k top-k when exporting (see
    :func:`descending_order`)."""
    if torch.compiler.is_exporting():
        return x.topk(x.shape[dim], dim=dim, largest=False).values
    return x.sort(dim=dim).values


def batch_rows(idx: torch.Tensor, N: int, offset: int = 0) -> torch.Tensor:
    """Rows ``b * N + offset + idx[b]`` ``(B, K)`` of a ``(B, N, ...)`` tensor flattened over the batch, for
    ``idx (B, K)``: one expression for every gather and write-back of token rows, so that an exported graph computes
    it once (ONNX Runtime merges identical nodes)."""
    B = idx.shape[0]
    return idx + (offset + torch.arange(B, device=idx.device) * N)[:, None]


def flat_rows(idx: torch.Tensor, N: int, offset: int = 0) -> torch.Tensor:
    """:func:`batch_rows` as one vector ``(B * K,)`` (for ``index_add_`` / ``index_put_`` on the flattened rows)."""
    return batch_rows(idx, N, offset).reshape(-1)


def take_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]``: the rows ``rows (B, K)`` of ``table (M, C)``, ``(B, K, C)``, copied with one
    ``index_select`` (several times faster on CPU than ``gather`` with an index expanded over channels).

    Exported, as ``embedding`` (the same rows): ONNX writes it as one Gather with the ``(B, K)`` index as it is, where
    ``index_select`` needs the index flattened, reshaped again by the exporter, and the result viewed back (three
    graph nodes a gather, which ONNX Runtime pays for at batch 1)."""
    if torch.compiler.is_exporting():
        return torch.nn.functional.embedding(rows, table)
    return table.index_select(0, rows.reshape(-1)).view(*rows.shape, table.shape[-1])


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``x[b, offset + idx[b]]`` for ``x (B, N, C)`` or ``(B, N)`` and ``idx (B, K)``: one row gather on the
    flattened batch (:func:`take_rows`)."""
    B, N = x.shape[:2]
    rows = batch_rows(idx, N, offset)
    if x.dim() == 2:
        return take_rows(x.reshape(B * N, 1), rows)[..., 0]
    return take_rows(x.reshape(B * N, x.shape[-1]), rows)


def sparsify_attention(attn: torch.Tensor, theta: float) -> torch.Tensor:
    """GTP attention sparsification: per head, zero the ``(1 - theta) N^2`` smallest entries (rows not renormalised).

    ``theta`` in (0, 1]; 1 returns ``attn`` unchanged.
    """
    if theta >= 1.0:
        return attn
    B, H, N, M = attn.shape
    k = int((1.0 - theta) * N * M)
    if k < 1:
        return attn
    flat = attn.reshape(B, H, N * M)
    thresh = flat.kthvalue(k, dim=-1, keepdim=True).values.unsqueeze(-1)  # (B, H, 1, 1)
    return attn * (attn >= thresh)
