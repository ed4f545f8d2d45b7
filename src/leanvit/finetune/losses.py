"""Loss terms of IdleViT's fine-tuning recipe (Xu et al., 2023): token cut loss and self-distillation.

* :func:`token_cut_loss` / :class:`TokenCutTerm`: per idle layer, a normalised-cut style loss on the attention
  graph that pushes selected and idle tokens apart (``cut``) and keeps attention inside the selection
  (``assoc``).
* :class:`SelfDistillLogitsTerm` and :class:`SelfDistillFeaturesTerm`: distillation from the frozen dense model
  the patched model started from, on the logits (KL) and on the L2-normalised pre-logits (cls) features (MSE).

Equations, reductions, weights and which features follow the authors' code (github.com/Ackesnal/IdleViT,
``losses.py`` ``IdleViTTotalLoss``, ``vit.py``, ``main.py`` and the README's training command). Differences:

* Every idle layer counts in the token cut loss. The authors' loop deletes entries from the lists it iterates
  over, so it visits idle layers 0, 2, 4, ... only (4 of DeiT-S's 8) while still dividing by the number of idle
  layers: their effective token cut weight is about half of the nominal 20.
* Their cut term zeroes the cls column alone; here every prefix column (cls, dist, registers) is left out, which
  is the same for a model with only a cls token.
* The two self-distillation parts are two terms (the trainer logs and weighs each term on its own); their sum is
  the authors' ``distillw * KL + 100 * distillw * MSE`` with ``distillw`` 10 (README).

Every loss is computed in float32, whatever the autocast dtype of the forward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distill.losses import LogitKDTerm
from ..engine.losses import LossTerm, StepContext
from ..errors import ConfigError

# Default weights. Token cut: main.py's --cutw 20, divided by the number of idle layers (TokenCutTerm averages the
# layers, so its weight is the 20 itself). Self-distillation: the README trains with --distillw 10, which
# IdleViTTotalLoss uses as the logit weight and multiplies by 100 for the feature weight.
TOKEN_CUT_WEIGHT = 20.0
LOGITS_WEIGHT = 10.0
FEATURES_WEIGHT = 1000.0


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

    def __init__(self, weight: float = TOKEN_CUT_WEIGHT):
        super().__init__(weight)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        from ..reduce import get_reducer

        red = get_reducer(ctx.model)
        layers = getattr(red, "cut_inputs", None)
        if layers is None:
            raise ConfigError(f"the token cut loss needs a model patched with a reducer that records cut_inputs "
                              f"(leanvit.patch(model, 'idle', keep=...)); this model has {red!r}")
        if not layers:  # eval mode, or a schedule without idle layers
            return ctx.logits.new_zeros((), dtype=torch.float32)
        info = getattr(red, "info", None)
        num_prefix = int(getattr(info, "num_prefix", 1))
        total = sum(token_cut_loss(layer["logits"], layer["mask"], num_prefix) for layer in layers)
        return total / len(layers)


class SelfDistillLogitsTerm(LogitKDTerm):
    """KL divergence from the frozen dense model's logits, temperature 1, averaged over the batch
    (``F.kl_div(..., reduction="batchmean")`` in the authors' ``IdleViTTotalLoss``); default weight 10."""

    name = "sd_logits"

    def __init__(self, weight: float = LOGITS_WEIGHT):
        super().__init__(weight, temperature=1.0)


class SelfDistillFeaturesTerm(LossTerm):
    """MSE between the L2-normalised pre-logits features of the model and of the frozen dense model; default
    weight 1000.

    The features are what the classifier reads (timm's ``forward_head(pre_logits=True)``): for a cls-token ViT the
    cls token after the final norm, as in the authors' ``vit.py``. The mean runs over batch and channels, so the
    loss of two unit vectors is ``(2 - 2 cos) / D``: the same weight pulls harder on a narrower model.
    """

    name = "sd_features"
    needs_features = True

    def __init__(self, weight: float = FEATURES_WEIGHT):
        super().__init__(weight)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        t_features, _ = ctx.teacher_outputs()
        return F.mse_loss(F.normalize(ctx.features.float(), dim=-1), F.normalize(t_features.float(), dim=-1))


def finetune_terms(model: torch.nn.Module, token_cut_weight: float = TOKEN_CUT_WEIGHT,
                   logits_weight: float = LOGITS_WEIGHT, features_weight: float = FEATURES_WEIGHT) -> list[LossTerm]:
    """The recipe's terms besides cross-entropy for a patched ``model``: self-distillation, plus the token cut loss
    when the model's reducer records ``cut_inputs`` (the ``idle`` method). A zero weight leaves a term out."""
    from ..reduce import get_reducer

    terms: list[LossTerm] = []
    if logits_weight > 0:
        terms.append(SelfDistillLogitsTerm(logits_weight))
    if features_weight > 0:
        terms.append(SelfDistillFeaturesTerm(features_weight))
    if token_cut_weight > 0 and hasattr(get_reducer(model), "cut_inputs"):
        terms.append(TokenCutTerm(token_cut_weight))
    return terms


__all__ = ["FEATURES_WEIGHT", "LOGITS_WEIGHT", "SelfDistillFeaturesTerm", "SelfDistillLogitsTerm",
           "TOKEN_CUT_WEIGHT", "TokenCutTerm", "finetune_terms", "token_cut_loss", "token_cut_terms"]
