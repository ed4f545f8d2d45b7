"""Fine-tuning a patched ViT with IdleViT's recipe: self-distillation from the frozen dense model it started from,
plus the token cut loss for token idling.

    model = leanvit.create_model("leanvit_vit_fm_teacher", pretrained=True)
    teacher = copy.deepcopy(model)                      # the frozen dense model
    leanvit.patch(model, "evit", keep=0.7)
    Trainer(model, train_set, val_set, cfg, "runs/ft", loss_terms=finetune_terms(model), teacher=teacher).fit()

``leanvit finetune`` does this with the recipe's schedule (see :mod:`leanvit.cli.finetune`).
"""
from .recipe import FEATURES_WEIGHT, LOGITS_WEIGHT, TOKEN_CUT_WEIGHT, finetune_terms

__all__ = ["FEATURES_WEIGHT", "LOGITS_WEIGHT", "TOKEN_CUT_WEIGHT", "finetune_terms"]
