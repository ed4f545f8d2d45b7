"""Projectors: trainable maps from the student's feature space to the teacher's, used by the loss only.

A projector belongs to the training state (the trainer optimises it, checkpoints it in ``last.pt`` and DDP
synchronises it) and is never part of the exported student: the student's classifier reads its own unprojected
features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectorEnsemble(nn.Module):
    """``n`` independently initialised ``Linear(in_features, out_features)`` projectors, each optionally followed by
    ReLU, whose outputs are averaged (PEFD, Chen et al., NeurIPS 2022: three Linear + ReLU projectors).

    The ``n`` projectors are stored as one ``Linear(in_features, n * out_features)``: rows ``k * out_features`` to
    ``(k + 1) * out_features`` are projector ``k``. PyTorch initialises every row of a Linear independently from
    ``U(-1/sqrt(in_features), 1/sqrt(in_features))``, so this is the same distribution as ``n`` separate
    ``nn.Linear`` (the authors' initialisation) while the forward is one matrix product instead of ``n``.

    Args:
        in_features: width of the student's features.
        out_features: width of the teacher's features.
        n: number of projectors (1 with ``relu=False`` is a single linear projector).
        relu: apply ReLU to each projector's output before averaging.
    """

    def __init__(self, in_features: int, out_features: int, n: int = 3, relu: bool = True):
        super().__init__()
        if n < 1:
            raise ValueError(f"a projector ensemble needs n >= 1 projectors, got {n}")
        self.n, self.out_features, self.relu = n, out_features, relu
        self.linear = nn.Linear(in_features, n * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # (B, n * D_t)
        if self.relu:
            y = F.relu(y)
        return y.view(*x.shape[:-1], self.n, self.out_features).mean(dim=-2)  # (B, n, D_t) -> (B, D_t)

    def extra_repr(self) -> str:
        return f"n={self.n}, relu={self.relu}"
