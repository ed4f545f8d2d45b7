"""IdleViT's fine-tuning recipe (Xu et al., 2023): which loss terms, with which weights (the terms are in
:mod:`leanvit.engine.losses`).

* :class:`~leanvit.engine.losses.TokenCutTerm`: per idle layer, a normalised-cut style loss on the attention
  graph that pushes selected and idle tokens apart (``cut``) and keeps attention inside the selection
  (``assoc``).
* :class:`~leanvit.engine.losses.LogitKDTerm` at temperature 1 and :class:`~leanvit.engine.losses.NormalizedFeatureMSETerm`: distillation from the frozen dense model
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

from torch import nn

from ..engine.losses import LogitKDTerm, LossTerm, NormalizedFeatureMSETerm, TokenCutTerm
from ..reduce import get_reducer

# Default weights. Token cut: main.py's --cutw 20, divided by the number of idle layers (TokenCutTerm averages the
# layers, so its weight is the 20 itself). Self-distillation: the README trains with --distillw 10, which
# IdleViTTotalLoss uses as the logit weight and multiplies by 100 for the feature weight.
TOKEN_CUT_WEIGHT = 20.0
LOGITS_WEIGHT = 10.0
FEATURES_WEIGHT = 1000.0


def finetune_terms(model: nn.Module, token_cut_weight: float = TOKEN_CUT_WEIGHT,
                   logits_weight: float = LOGITS_WEIGHT, features_weight: float = FEATURES_WEIGHT) -> list[LossTerm]:
    """The recipe's terms besides cross-entropy for a patched ``model``: self-distillation from the frozen dense
    model (KL of the logits at temperature 1, ``sd_logits``; MSE of the normalised features, ``sd_features``),
    plus the token cut loss when the model's reducer records its inputs (``idle`` on a plain ViT; not on a
    pyramid, whose attention maps are not square). A zero weight leaves a term out."""
    terms: list[LossTerm] = []
    if logits_weight > 0:
        terms.append(LogitKDTerm(logits_weight, temperature=1.0, name="sd_logits"))
    if features_weight > 0:
        terms.append(NormalizedFeatureMSETerm(features_weight, name="sd_features"))
    red = get_reducer(model)
    if token_cut_weight > 0 and getattr(red, "records_cut_inputs", False):
        terms.append(TokenCutTerm(token_cut_weight))
    return terms
