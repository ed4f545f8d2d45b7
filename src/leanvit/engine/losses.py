"""Pluggable loss terms for the training loop (distillation terms live in :mod:`leanvit.distill`).

A term is an ``nn.Module`` (it may own parameters, e.g. distillation projectors; the trainer optimises and
checkpoints them with the model) whose ``forward(ctx)`` returns a scalar. The trainer sums ``weight * term(ctx)``.
:class:`StepContext` carries what a term may need; features and teacher outputs are computed lazily and cached,
so a term only pays for what it reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StepContext:
    """Inputs and outputs of one training step, shared by all loss terms.

    Attributes:
        model: the student being trained (unwrapped from DDP).
        images: input batch ``(B, C, H, W)`` after mixup/cutmix.
        targets: hard labels ``(B,)`` or soft targets ``(B, K)`` (mixup / label smoothing).
        logits: student logits ``(B, K)``.
        features: student pre-logits features ``(B, D)`` (present when a term set ``needs_features``).
        teacher: frozen teacher in eval mode, or None.
        cache: per-step scratch space (teacher outputs, hook captures).
        teacher_cache: a :class:`leanvit.distill.cache.TeacherCache` that keeps the teacher's outputs across runs,
            or None.
    """

    model: nn.Module
    images: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor | None = None
    teacher: nn.Module | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    teacher_cache: Any = None

    def teacher_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ``(pre_logits_features, logits)`` for this batch, computed once per step without gradients and
        shared by every term (:func:`leanvit.distill.pooled_features`: timm's ``forward_head(pre_logits=True)``,
        or a hook on the classifier's input for models without it); read from ``teacher_cache`` when it holds
        this exact batch."""
        from ..distill.features import pooled_features

        if self.teacher is None:
            raise RuntimeError("this loss term needs a teacher; pass --teacher")
        if "teacher" not in self.cache:
            key = hit = None
            if self.teacher_cache is not None:
                from ..distill.cache import batch_key

                key = batch_key(self.images)
                hit = self.teacher_cache.lookup(key, self.images.device)
            if hit is None:
                with torch.no_grad():
                    pre, logits = pooled_features(self.teacher, self.images)
                hit = (pre.float(), logits.float())
                if key is not None:
                    self.teacher_cache.store(key, *hit)
            self.cache["teacher"] = hit
        return self.cache["teacher"]


class LossTerm(nn.Module):
    """Base class. Subclasses set ``name`` and ``needs_features`` and implement ``forward(ctx)``."""

    name: str = "loss"
    needs_features: bool = False

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)


class CrossEntropyTerm(LossTerm):
    """Cross-entropy on hard labels (with optional label smoothing) or on soft targets from mixup/cutmix."""

    name = "ce"

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0):
        super().__init__(weight)
        self.label_smoothing = label_smoothing

    def forward(self, ctx: StepContext) -> torch.Tensor:
        logits = ctx.logits.float()
        if ctx.targets.dim() == 2:  # soft targets already carry smoothing (timm Mixup applies it)
            return torch.sum(-ctx.targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, ctx.targets, label_smoothing=self.label_smoothing)
