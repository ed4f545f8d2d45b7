"""Token graphs for GTP: spatial (8-neighbourhood on the patch grid), semantic (k most cosine-similar tokens), mixed.

Pure tensor functions; no model needed. Graphs are dense ``(B, N, N)`` adjacency tensors over image tokens only
(prefix tokens are never part of the graph). Dense is the right layout here: N is a few hundred, the graph is
sliced by index every block, and sparse gathers are slower than dense ones on both CPU and GPU at this size.
"""
from __future__ import annotations

from functools import lru_cache

import torch

GRAPHS = ("spatial", "semantic", "mixed")


@lru_cache(maxsize=16)
def _spatial(h: int, w: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    # cached per device so that a CUDA forward does not copy the grid graph from the host every time
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    dr = (rows[:, None] - rows[None, :]).abs()
    dc = (cols[:, None] - cols[None, :]).abs()
    adj = (dr <= 1) & (dc <= 1)
    adj.fill_diagonal_(False)
    return adj.to(device=device, dtype=dtype)


def spatial_adjacency(grid: tuple[int, int], device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0/1 adjacency ``(N, N)`` of the 8-neighbourhood on an ``(h, w)`` grid (row-major tokens, no self loops)."""
    return _spatial(int(grid[0]), int(grid[1]), str(torch.device(device)), dtype)


@lru_cache(maxsize=16)
def _normalized_spatial(h: int, w: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return normalize_adjacency(_spatial(h, w, device, dtype))


def _set_knn_(graph: torch.Tensor, x: torch.Tensor, k: int, value: float) -> torch.Tensor:
    """Write ``value`` into ``graph (B, N, N)`` at row i's ``k`` most cosine-similar tokens (self excluded)."""
    if k > 0:
        xf = x.float()
        # F.normalize's values; written out because its ONNX form materialises the norms broadcast to x's shape
        xn = xf / torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(1e-12)
        sim = xn @ xn.transpose(1, 2)  # (B, N, N)
        # self excluded by a masked fill of the whole map, not ``sim.diagonal().fill_``: an in-place write through a
        # diagonal view does not functionalise, which torch.export (and so ONNX export) needs; same values
        sim.masked_fill_(torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device), float("-inf"))
        graph.scatter_(2, sim.topk(k, dim=-1, sorted=False).indices, value)
    return graph


def semantic_adjacency(x: torch.Tensor, k: int = 8) -> torch.Tensor:
    """0/1 directed adjacency ``(B, N, N)``: row i marks the ``k`` tokens most cosine-similar to token i.

    Args:
        x: image tokens ``(B, N, C)``.
        k: neighbours per token (self excluded); capped at ``N - 1``.
    """
    B, N, _ = x.shape
    return _set_knn_(torch.zeros(B, N, N, device=x.device, dtype=torch.float32), x, min(k, N - 1), 1.0)


def normalize_adjacency(adj: torch.Tensor) -> torch.Tensor:
    """Symmetric normalisation ``D^-1/2 A D^-1/2`` with D the row sums (isolated nodes keep zero rows)."""
    return _normalize_(adj.clone())


def _normalize_(adj: torch.Tensor) -> torch.Tensor:
    # in place: two passes over the (B, N, N) graph instead of building the normalised copy in three
    inv_sqrt = adj.sum(-1)
    inv_sqrt = torch.where(inv_sqrt > 0, inv_sqrt.clamp_min(1e-12).rsqrt(), torch.zeros_like(inv_sqrt))
    return adj.mul_(inv_sqrt.unsqueeze(-1)).mul_(inv_sqrt.unsqueeze(-2))


def build_graph(x: torch.Tensor, grid: tuple[int, int], kind: str = "mixed", k: int = 8,
                spatial: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised token graph ``(B, N, N)`` of image tokens ``x (B, N, C)`` laid out on ``grid``.

    ``kind``: ``spatial``, ``semantic`` (k nearest by cosine) or ``mixed`` (their union). The spatial graph is
    the same for every image: it is returned as a broadcast view (batch stride 0) of one matrix. ``spatial``: that
    0/1 adjacency ``(N, N)`` already on ``x``'s device (a reducer builds it once, so that a compiled forward reads
    it instead of building it); by default it comes from a per-device cache.
    """
    B, N, _ = x.shape
    if kind not in GRAPHS:
        raise ValueError(f"unknown graph '{kind}'; choose one of {', '.join(GRAPHS)}")
    if kind in ("spatial", "mixed") and grid[0] * grid[1] != N:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} cells but there are {N} image tokens")
    if kind == "spatial":
        if spatial is not None:
            return normalize_adjacency(spatial.to(x.dtype)).expand(B, N, N)
        return _normalized_spatial(int(grid[0]), int(grid[1]), str(x.device), x.dtype).expand(B, N, N)
    k = min(k, N - 1)
    if kind == "semantic":
        # every row has exactly k neighbours, so D^-1/2 A D^-1/2 = A / k: written directly, no normalising pass
        graph = _set_knn_(torch.zeros(B, N, N, device=x.device, dtype=torch.float32), x, k, 1.0 / max(k, 1))
    else:  # mixed: the union of both graphs, normalised in place
        adj = spatial_adjacency(grid, x.device) if spatial is None else spatial.float()
        graph = _normalize_(_set_knn_(adj.expand(B, N, N).clone(), x, k, 1.0))
    return graph.to(x.dtype)


def fallback_edges(w: torch.Tensor, x_kept: torch.Tensor, x_removed: torch.Tensor,
                   weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges that give every removed token without a kept neighbour (an orphan) its most similar kept token.

    Fixed shapes and no host sync: every removed token's nearest kept token is found (one ``(B, r, K)`` product of
    ``r * K * C`` MACs per image), and the edge is written for the orphans only.

    Args:
        w: edge weights from kept to removed tokens ``(B, K, r)``, non-negative; removed token j is an orphan when
            ``w[b, :, j]`` is all zero.
        x_kept: kept tokens ``(B, K, C)``.
        x_removed: removed tokens ``(B, r, C)``.
        weight: ``(B, r)`` the weight of each removed token's fallback edge.

    Returns:
        ``(edges (B, K, r), orphan (B, r))``: ``edges[b, k, j] = weight[b, j]`` where j is an orphan and k its most
        cosine-similar kept token (the first on ties), 0 elsewhere; ``orphan`` marks the orphans.
    """
    orphan = w.sum(1) == 0  # (B, r)
    # cosine similarity up to the removed token's norm, which does not change its argmax over the kept tokens
    sim = x_removed @ torch.nn.functional.normalize(x_kept, dim=-1).transpose(1, 2)  # (B, r, K)
    nearest = sim.argmax(-1, keepdim=True).transpose(1, 2)  # (B, 1, r) kept position of each removed token
    edges = torch.zeros_like(w).scatter_(1, nearest, (weight * orphan).unsqueeze(1).to(w.dtype))  # (B, K, r)
    return edges, orphan
