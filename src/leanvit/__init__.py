"""leanvit: make Vision Transformers cheap to run (token reduction, token idling, tiny ViTs, distillation).

Importing leanvit registers its reference models in timm (``leanvit_*``).
"""
from __future__ import annotations

from . import models  # noqa: F401  (registers leanvit_* models in timm)
from .errors import CheckpointError, ConfigError, DataError, LeanvitError, TrainingError, UnsupportedModelError
from .models import create_model, list_models
from .reduce import Recipe, get_reducer, list_methods, patch, read_recipe, restore_tokens, unpatch

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "LeanvitError", "TrainingError", "UnsupportedModelError",
           "Recipe", "create_model", "export_onnx", "get_reducer", "list_methods", "list_models", "patch",
           "read_recipe", "restore_tokens", "unpatch", "__version__"]


def __getattr__(name: str):
    # leanvit.export_onnx on first use: deployment (leanvit.export, extra leanvit[onnx]) is not loaded by
    # ``import leanvit``
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'leanvit' has no attribute '{name}'")
