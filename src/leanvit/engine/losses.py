"""Every loss term of the training loop, in one home: cross-entropy, logit distillation (Hinton KD, KD through a
logit projector), feature distillation through projectors (PEFD and the single-projector baseline), normalised
feature MSE, and IdleViT's token cut loss. Recipes (:mod:`leanvit.distill`, :mod:`leanvit.finetune`) choose terms
and weights; they define none.

A term is an ``nn.Module`` (it may own parameters, e.g. distillation projectors; the trainer optimises and
checkpoints them with the model) whose ``forward(ctx)`` returns a scalar. The trainer sums ``weight * term(ctx)``.
:class:`StepContext` carries what a term may need; features and teacher outputs are computed lazily and cached,
so a term only pays for what it reads. Losses are computed in float32 whatever the autocast dtype of the forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.features import pooled_features
from ..reduce import get_reducer
from .teacher import TeacherCache, batch_key

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
        teacher_cache: a :class:`~leanvit.engine.teacher.TeacherCache` that keeps the teacher's outputs across runs,
            or None.
    """

    model: nn.Module
    images: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor | None = None
    teacher: nn.Module | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    teacher_cache: TeacherCache | None = None

    def teacher_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ``(pre_logits_features, logits)`` for this batch, computed once per step without gradients and
        shared by every term (:func:`leanvit.models.features.pooled_features`: timm's ``forward_head(pre_logits=True)``,
        or a hook on the classifier's input for models without it); read from ``teacher_cache`` when it holds
        this exact batch."""
        if self.teacher is None:
            raise RuntimeError("this loss term needs a teacher; pass --teacher")
        if "teacher" not in self.cache:
            key = hit = None
            if self.teacher_cache is not None:
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
        temperature: softmax temperature ``T`` of both teacher and student (1: IdleViT's self-distillation KL).
        name: the name the term's value is logged under.
    """

    name = "kd"

    def __init__(self, weight: float = 1.0, temperature: float = 4.0, name: str = "kd"):
        super().__init__(weight)
        self.temperature = temperature
        self.name = name

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

    With a :class:`~leanvit.models.projectors.ProjectorEnsemble` of three Linear + ReLU projectors this is PEFD; with one
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


class NormalizedFeatureMSETerm(LossTerm):
    """MSE between the L2-normalised pre-logits features of the model and of the teacher (IdleViT's
    self-distillation on features, where the teacher is the frozen dense model).

    The features are what the classifier reads (timm's ``forward_head(pre_logits=True)``): for a cls-token ViT the
    cls token after the final norm, as in the authors' ``vit.py``. The mean runs over batch and channels, so the
    loss of two unit vectors is ``(2 - 2 cos) / D``: the same weight pulls harder on a narrower model.
    """

    needs_features = True

    def __init__(self, weight: float = 1.0, name: str = "feat_mse"):
        super().__init__(weight)
        self.name = name

    def forward(self, ctx: StepContext) -> torch.Tensor:
        t_features, _ = ctx.teacher_outputs()
        return F.mse_loss(F.normalize(ctx.features.float(), dim=-1), F.normalize(t_features.float(), dim=-1))


def token_cut_terms(logits: torch.Tensor, mask: torch.Tensor, num_prefix: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of one idle layer's token cut loss, ``(cut, assoc)``.

    With ``W = softmax(logits)`` over each row and ``m`` the selection:

    * ``cut_i = sum_j |m_i - m_j| W_ij`` over non-prefix columns ``j``: attention between a selected and an idle
      token; ``cut = mean_{b, i} cut_i^2`` (MSE against 0);
    * ``assoc_i = sum_j m_i m_j W_ij``: attention of a selected token within the selection;
      ``assoc = mean_{b, i} (assoc_i - m_i)^2`` (MSE against ``m``).

    Both means run over every row, prefix and idle rows included (an idle row's ``assoc`` is 0, so it adds 0).

    Args:
        logits: head-averaged, scaled attention logits before the idle mask, ``(B, N, N)`` over all tokens.
        mask: selection, ``(B, N)``, 1 for selected tokens and prefix tokens, 0 for idle tokens. Not
            differentiated.
        num_prefix: leading prefix tokens (cls, dist, registers) whose columns the cut leaves out.
    """
    if logits.ndim != 3 or logits.shape[1] != logits.shape[2] or mask.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, N, N) and mask (B, N), got {tuple(logits.shape)} and "
                         f"{tuple(mask.shape)}")
    W = logits.float().softmax(dim=-1)  # (B, N, N)
    m = mask.detach().float()  # (B, N)
    diff = (m.unsqueeze(2) - m.unsqueeze(1)).abs()  # (B, N, N): 1 where exactly one of i, j is selected
    diff[:, :, :num_prefix] = 0.0  # prefix columns are not cut
    same = m.unsqueeze(2) * m.unsqueeze(1)  # (B, N, N): 1 where both i and j are selected
    cut = (diff * W).sum(-1)  # (B, N)
    assoc = (same * W).sum(-1)  # (B, N)
    return F.mse_loss(cut, torch.zeros_like(cut)), F.mse_loss(assoc, m)


def token_cut_loss(logits: torch.Tensor, mask: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """One idle layer's token cut loss: ``cut + assoc`` of :func:`token_cut_terms` (the authors' ``both``)."""
    cut, assoc = token_cut_terms(logits, mask, num_prefix)
    return cut + assoc


class TokenCutTerm(LossTerm):
    """Token cut loss averaged over the idle layers of the last forward pass.

    Reads ``get_reducer(ctx.model).cut_inputs``: one ``{"logits": (B, N, N), "mask": (B, N)}`` per idle layer,
    recorded by the ``idle`` reducer in training mode. The weight (default 20) multiplies the average over layers,
    i.e. each layer is weighted ``20 / number of idle layers``.

    Raises:
        ConfigError: the model has no reducer that records ``cut_inputs``.
    """

    name = "token_cut"

    def __init__(self, weight: float = 20.0):
        super().__init__(weight)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        red = get_reducer(ctx.model)
        layers = getattr(red, "cut_inputs", None)
        if not getattr(red, "records_cut_inputs", False) or layers is None:
            raise ConfigError(f"the token cut loss needs a model patched with a reducer that records cut_inputs "
                              f"(leanvit.patch(model, 'idle', keep=...)); this model has {red!r}")
        if not layers:  # eval mode, or a schedule without idle layers
            return ctx.logits.new_zeros((), dtype=torch.float32)
        info = getattr(red, "info", None)
        num_prefix = int(getattr(info, "num_prefix", 1))
        total = sum(token_cut_loss(layer["logits"], layer["mask"], num_prefix) for layer in layers)
        return total / len(layers)
