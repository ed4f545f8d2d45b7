"""Knowledge distillation: a frozen teacher, trainable projectors, and a registry of methods.

The teacher is frozen (eval mode, no gradients) and stays outside DDP; the trainer runs it once per training step
and every term of that step reads its output. Projectors live inside the loss terms, so the trainer optimises,
checkpoints (``last.pt``), resumes and synchronises them with the student, and leaves them out of the exported
``model.safetensors``.

    from leanvit.distill import build_terms
    d = build_terms("pefd", student, teacher, projectors=3)
    Trainer(student, train_set, val_set, cfg, "runs/pefd", loss_terms=d.terms, teacher=teacher,
            ce_weight=d.ce_weight).fit()

Methods (:data:`METHODS`): ``none``, ``kd``, ``kd-proj``, ``proj``, ``pefd``; see :mod:`leanvit.distill.methods`. The
loss terms are :mod:`leanvit.engine.losses`', the projectors :mod:`leanvit.models.projectors`', the teacher's outputs
and their cache :mod:`leanvit.engine.teacher`'s.
"""
from .methods import METHODS, Distillation, Method, build_terms, check_options, get_method, register_method

__all__ = ["METHODS", "Distillation", "Method", "build_terms", "check_options", "get_method", "register_method"]
