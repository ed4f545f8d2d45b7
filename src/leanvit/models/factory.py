"""Model creation with readable errors: unknown names list the valid ones, weights are checked against the model,
pretrained weights that would need the network are refused unless asked for, and a teacher is checked to read
the input it will be given."""
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
    """Raise a :class:`ConfigError` listing the valid names (and close matches) if timm does not know ``name``;
    ``hf:PATH`` and ``open_clip:ARCH`` are checked by :func:`~leanvit.models.external.check_external`."""
    from .external import check_external, is_external

    if is_external(name):
        check_external(name)
        return
    if not isinstance(name, str) or not timm.is_model(name):
        known = timm.list_models()
        close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown model '{name}'. leanvit reference models: {', '.join(list_models())}; any timm ViT name "
            f"also works (`leanvit list-models '*vit*'`).{hint}")


def hub_source(name: str) -> str | None:
    """Where timm would fetch the pretrained weights of ``name`` from (a Hugging Face hub repository or a URL), or
    None when nothing is fetched: leanvit's models load their weights from the package (or have none), and a timm
    model may point to a local file."""
    from timm.models import get_pretrained_cfg

    if name.split(".")[0].startswith("leanvit_"):
        return None
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # timm knows the name but has no pretrained config for it
        return None
    if cfg is None or cfg.file:
        return None
    return cfg.hf_hub_id or cfg.url or None


def check_pretrained(name: str, download: bool = True, weights_flag: str = "--weights",
                     no_pretrained: str | None = "--no-pretrained") -> None:
    """Refuse, before any work and in one line, pretrained weights of ``name`` that cannot be loaded offline.

    * a leanvit model whose weights do not ship with leanvit: how to train them, ``weights_flag`` and, when the
      command can run without pretrained weights, ``no_pretrained``;
    * a timm model whose weights come from the Hugging Face hub (or a URL), unless ``download``: timm would fetch
      them, which on a machine without network ends, after minutes of retries, in an error; the user is offered a
      file (``weights_flag``) or ``--download``.

    Args:
        download: the user asked for a download (``--download``); the Python default leaves it to timm.
        weights_flag: the command-line flag that gives a weights file instead (``--weights``, ``--teacher-weights``).
        no_pretrained: the flag (or wording) that runs without pretrained weights; None where that makes no sense
            (a teacher, a model to fine-tune).
    """
    from ..zoo import RUNS_DIR, has_weights, weight_file
    from .external import is_external

    check_model_name(name)
    if is_external(name):  # hf:PATH brings its weights; open_clip:ARCH is checked when it is created
        return
    base = name.split(".")[0]  # without a pretrained tag (leanvit_vit_fm_teacher.fmnist)
    if base.startswith("leanvit_") and not has_weights(base):
        alone = f", or start from random weights ({no_pretrained})" if no_pretrained else ""
        command = RUNS_DIR / base / "command.txt"
        how = f"the command in {command}" if command.is_file() else "`leanvit train`"
        raise ConfigError(f"no shipped weights for '{name}' (expected {weight_file(base)}): train them with {how} "
                          f"and pass the file with {weights_flag} FILE{alone}")
    source = hub_source(name)
    if source is not None and not download:
        where = source if "://" in source else f"the Hugging Face hub ({source})"
        raise ConfigError(f"the pretrained weights of '{name}' do not ship with leanvit and must be downloaded from "
                          f"{where}: pass a weights file with {weights_flag} FILE, or --download to fetch them")


def check_reads_input(teacher: nn.Module, model: nn.Module, model_role: str = "student",
                      context: str = "which it sees during training") -> tuple[tuple[int, int], tuple[int, int]]:
    """``((model features, model classes), (teacher features, teacher classes))``, from a dry forward pass of two
    blank images of ``model``'s input size through each (:func:`~leanvit.models.features.probe_widths`, the probe
    ``leanvit distill`` sizes its projectors with); a teacher that cannot read that input is a one-line
    :class:`ConfigError` (a CNN that expects 3 channels on Fashion-MNIST, a ViT built for another image size).

    Every verb that runs a second model on a model's data calls it before any work: ``distill`` and ``train``
    (the teacher sees the student's images) and ``analyze`` (the teacher is compared on the model's images).
    ``model_role`` names the model in the message and ``context`` says when the teacher sees its input.
    """
    from ..analysis.macs import default_input_size
    from .features import probe_widths

    size = default_input_size(model)
    own = probe_widths(model, size)
    try:
        other = probe_widths(teacher, size)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ConfigError(f"the teacher cannot read the {model_role}'s {'x'.join(map(str, size))} input, {context} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return own, other


def create_model(name: str, pretrained: bool = False, weights: str | None = None, download: bool = True,
                 weights_flag: str = "--weights", no_pretrained: str | None = "--no-pretrained",
                 **kwargs) -> nn.Module:
    """``timm.create_model`` for any timm or leanvit model name, optionally loading a weights file; a model of another
    library for ``hf:PATH`` and ``open_clip:ARCH`` (:func:`~leanvit.models.external.create_external`).

    Args:
        name: a timm model name (``deit_small_patch16_224``), a leanvit reference model (``leanvit_vit_fm_teacher``),
            ``hf:PATH`` or ``open_clip:ARCH``.
        pretrained: load the model's pretrained weights (shipped offline for ``leanvit_*`` models).
        weights: path of a safetensors file, a leanvit checkpoint or a torch state dict, loaded strictly.
        download: whether timm may fetch pretrained weights from the hub (:func:`check_pretrained`).
        weights_flag, no_pretrained: the flags an error about missing pretrained weights names
            (:func:`check_pretrained`).
        kwargs: passed to the model constructor (``num_classes``, ``drop_path_rate``, ...).
    """
    from ..io import load_into, load_weights
    from .external import create_external, is_external

    if is_external(name):
        return create_external(name, pretrained=pretrained, weights=weights, **kwargs)
    check_model_name(name)
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"weights file {weights} does not exist")
    if pretrained and not weights:
        check_pretrained(name, download=download, weights_flag=weights_flag, no_pretrained=no_pretrained)
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
