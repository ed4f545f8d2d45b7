"""Knowledge distillation: a frozen teacher, trainable projectors, and a registry of methods.

The teacher is frozen (eval mode, no gradients) and stays outside DDP; the trainer runs it once per training step
and every term of that step reads its output. Projectors live inside the loss terms, so the trainer optimises,
checkpoints (``last.pt``), resumes and synchronises them with the student, and leaves them out of the exported
``model.safetensors``.

    from leanvit.distill import build_terms
    d = build_terms("pefd", student, teacher, projectors=3)
    Trainer(student, train_set, val_set, cfg, "runs/pefd", loss_terms=d.terms, teacher=teacher,
            ce_weight=d.ce_weight).fit()

Methods (:data:`METHODS`): ``none``, ``kd``, ``kd-proj``, ``proj``, ``pefd``; see :mod:`leanvit.distill.methods`.
"""
from .features import block_features, pooled_features, probe_widths
from .losses import LogitKDTerm, ProjectedFeatureTerm, ProjectedLogitKDTerm, cosine_distance, kd_loss
from .methods import METHODS, Distillation, Method, build_terms, check_options, get_method, register_method
from .projectors import ProjectorEnsemble

__all__ = ["METHODS", "Distillation", "LogitKDTerm", "Method", "ProjectedFeatureTerm", "ProjectedLogitKDTerm",
           "ProjectorEnsemble", "block_features", "build_terms", "check_options", "cosine_distance", "get_method",
           "kd_loss", "pooled_features", "probe_widths", "register_method"]
