"""Model creation with readable errors: unknown names list the valid ones, weights are checked against the model."""
from __future__ import annotations

import difflib
from pathlib import Path

import timm
from torch import nn

from ..errors import ConfigError


def list_models(pattern: str = "leanvit_*", pretrained: bool = False) -> list[str]:
    """Names of leanvit's registered models (``pattern`` is a timm wildcard; ``"*"`` lists every timm model).

    With ``pretrained``, only the leanvit models whose trained weights ship with leanvit (they load offline with
    ``pretrained=True``)."""
    from ..zoo import has_weights

    names = timm.list_models(pattern)
    return [n for n in names if has_weights(n)] if pretrained else names


def check_model_name(name: str) -> None:
    """Raise a :class:`ConfigError` listing the valid names (and close matches) if timm does not know ``name``."""
    if not isinstance(name, str) or not timm.is_model(name):
        known = timm.list_models()
        close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown model '{name}'. leanvit reference models: {', '.join(list_models())}; any timm ViT name "
            f"also works (`leanvit list-models '*vit*'`).{hint}")


def create_model(name: str, pretrained: bool = False, weights: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` for any timm or leanvit model name, optionally loading a weights file.

    Args:
        name: a timm model name (``deit_small_patch16_224``) or a leanvit reference model (``leanvit_vit_fm_teacher``).
        pretrained: load the model's pretrained weights (shipped offline for ``leanvit_*`` models).
        weights: path of a safetensors file, a leanvit checkpoint or a torch state dict, loaded strictly.
        kwargs: passed to the model constructor (``num_classes``, ``drop_path_rate``, ...).
    """
    from ..io import load_into, load_weights

    check_model_name(name)
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"weights file {weights} does not exist")
    try:
        model = timm.create_model(name, pretrained=pretrained and not weights, **kwargs)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except RuntimeError as e:
        if "pretrained" in str(e).lower() or "hub" in str(e).lower() or "url" in str(e).lower():
            raise ConfigError(f"no pretrained weights for '{name}' can be loaded here ({e}); pass --weights PATH")
        raise
    if weights:
        load_into(model, load_weights(weights), source=f"weights file {weights}")
    return model
