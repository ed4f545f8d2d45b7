"""Linear centred kernel alignment (CKA) between two sets of features of the same inputs.

Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019, eq. (5): for features
``X`` (n, d1) and ``Y`` (n, d2) with centred columns,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

It is 1 for representations that differ by an orthogonal transform and an isotropic scaling, is invariant to
translations (the centring), and is near 0 for independent features. The feature-space form used here costs
O(n d1 d2); it equals the Gram-matrix form HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with ``K = X X^T``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError

__all__ = ["cka_matrix", "linear_cka"]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between ``x`` (n, d1) and ``y`` (n, d2), rows being the same n inputs; computed in float64.

    Returns 0.0 when either set of features is constant over the inputs (no variance to compare).

    Raises:
        ConfigError: inputs that are not 2-D, differ in n, or have fewer than two rows.
    """
    if x.ndim != 2 or y.ndim != 2:
        raise ConfigError(f"linear_cka takes (n, d) features, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"linear_cka needs the same inputs on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    if x.shape[0] < 2:
        raise ConfigError("linear_cka needs at least two inputs")
    x = x.double()
    y = y.double().to(x.device)
    x = x - x.mean(dim=0, keepdim=True)  # (n, d1), centred columns
    y = y - y.mean(dim=0, keepdim=True)  # (n, d2)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2  # ||Y^T X||_F^2, from a (d2, d1) product
    norms = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)  # (d1, d1) and (d2, d2)
    return float(cross / norms) if norms > 0 else 0.0


def cka_matrix(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> list[list[float]]:
    """``[[linear_cka(x, y) for y in ys] for x in xs]``: e.g. student blocks (rows) against teacher blocks."""
    return [[linear_cka(x, y) for y in ys] for x in xs]
