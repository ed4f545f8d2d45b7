"""Distillation loss terms: Hinton KD, KD through a logit projector, and feature distillation through projectors.

Each term is a :class:`~leanvit.engine.LossTerm`; the trainer adds ``weight * term(ctx)`` to the total. Teacher
outputs come from :meth:`~leanvit.engine.StepContext.teacher_outputs`, which runs the frozen teacher once per
training step (without gradients) and shares its features and logits between all terms of that step.

Losses are computed in float32 whatever the autocast dtype of the forward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.losses import LossTerm, StepContext


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch (Hinton et al., 2015).

    The ``T^2`` factor keeps the gradient scale independent of the temperature; it is also what the PEFD authors'
    ``DistillKL`` computes (their sum over the batch divided by the batch size is ``batchmean``).
    """
    T = temperature
    s = F.log_softmax(student_logits.float() / T, dim=-1)
    t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * T * T


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``1 - cos(x_i, y_i)`` for ``(B, D)`` inputs.

    A row of zeros (every ReLU of a projector off) has cosine 0, so its loss is 1 instead of the authors' 0 / 0.
    """
    return (1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8)).mean()


class LogitKDTerm(LossTerm):
    """Hinton et al. (2015) logit distillation: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Args:
        weight: factor of this term in the total loss.
        temperature: softmax temperature ``T`` of both teacher and student.
    """

    name = "kd"

    def __init__(self, weight: float = 1.0, temperature: float = 4.0):
        super().__init__(weight)
        self.temperature = temperature

    def forward(self, ctx: StepContext) -> torch.Tensor:
        _, t_logits = ctx.teacher_outputs()
        return kd_loss(ctx.logits, t_logits, self.temperature)


class ProjectedLogitKDTerm(LossTerm):
    """KD through a trainable ``Linear(K, K)`` on the student's logits (the logit projector of the extended PEFD
    paper): ``T^2 * KL(softmax(t/T) || softmax(P(s)/T))``. Only the loss sees ``P(s)``; the student is evaluated
    and exported with its raw logits.

    Args:
        num_classes: number of logits ``K`` of student and teacher.
        weight: factor of this term in the total loss.
        temperature: softmax temperature.
    """

    name = "kd_proj"

    def __init__(self, num_classes: int, weight: float = 1.0, temperature: float = 4.0):
        super().__init__(weight)
        self.temperature = temperature
        self.projector = nn.Linear(num_classes, num_classes)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        _, t_logits = ctx.teacher_outputs()
        return kd_loss(self.projector(ctx.logits), t_logits, self.temperature)


class ProjectedFeatureTerm(LossTerm):
    """Feature distillation through a projector: ``mean_i (1 - cos(P(s_i), t_i))`` on the student's and the
    teacher's pre-logits features (PEFD's loss, Chen et al., NeurIPS 2022).

    With a :class:`~leanvit.distill.ProjectorEnsemble` of three Linear + ReLU projectors this is PEFD; with one
    Linear projector it is the single-projector baseline. Where the authors' code differs: a projection whose ReLUs
    are all off gives loss 1 rather than NaN (see :func:`cosine_distance`).

    Args:
        projector: maps ``(B, D_student)`` to ``(B, D_teacher)``.
        weight: factor of this term in the total loss.
        name: the name the term's value is logged under.
    """

    needs_features = True

    def __init__(self, projector: nn.Module, weight: float = 1.0, name: str = "feat"):
        super().__init__(weight)
        self.name = name
        self.projector = projector

    def forward(self, ctx: StepContext) -> torch.Tensor:
        t_features, _ = ctx.teacher_outputs()
        return cosine_distance(self.projector(ctx.features), t_features)


__all__ = ["LogitKDTerm", "ProjectedFeatureTerm", "ProjectedLogitKDTerm", "cosine_distance", "kd_loss"]
