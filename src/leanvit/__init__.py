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
           "Recipe", "create_model", "get_reducer", "list_methods", "list_models", "patch", "read_recipe",
           "restore_tokens", "unpatch", "__version__"]
