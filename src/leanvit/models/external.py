"""Models of other libraries, named on leanvit's command line by a prefix: ``hf:PATH`` and ``open_clip:ARCH``.

Names (``-m`` of eval, bench, compare and vis):

* ``hf:PATH``: a folder written by transformers' ``save_pretrained`` (``config.json`` and the weights). A name that
  is not a local path (``hf:google/vit-base-patch16-224``) is passed on to ``from_pretrained``, which fetches it
  from the Hugging Face hub where the hub can be reached.
* ``open_clip:ARCH`` with ``--weights FILE``: ``open_clip.create_model(ARCH, pretrained=FILE)``, ARCH one of
  ``open_clip.list_models()`` and FILE a state dict (torch or safetensors) of the whole CLIP model. open_clip's own
  schemas pass through too: ``open_clip:local-dir:DIR`` (a folder with ``open_clip_config.json``, which is how a
  custom architecture is given, and its weights) and ``open_clip:hf-hub:ORG/REPO``; they bring their weights.

Which model runs:

* transformers: the class ``config.json`` names (``architectures``), so that a checkpoint loads into the class it
  was saved from (``DeiTForImageClassificationWithTeacher`` keeps both heads, where
  ``AutoModelForImageClassification`` would give ``DeiTForImageClassification`` and an untrained head). An
  ``...ForImageClassification`` class gives logits over its labels: eval and compare work. ``CLIPModel`` and
  ``SiglipModel`` give their vision tower (``CLIPVisionModelWithProjection``: the projected image embeddings, what
  ``get_image_features`` returns; ``SiglipVisionModel``: the attention-pooled features); other vision encoders
  (``ViTModel``, ``Dinov2Model``, ``CLIPVisionModel``, ...) run as they are and give features: the projected
  embeddings if any, else the pooled output, else the first token. A folder whose weights lack parameters of that
  class is refused (they would be random), except a ``ViTModel`` saved without its pooler, which runs without it.
* open_clip: the ``visual`` tower (``model.visual``), which returns the image embeddings ``encode_image`` gives.

A model without a classification head gives no logits over a dataset's classes, so eval and compare (accuracy)
refuse it with one message; bench, vis and ``compare --no-accuracy`` run it. (Zero-shot classification from
class-name prompts would need the text tower and prompts for the folder's class names, which leanvit does not do.)

transformers models return output objects; a forward hook (a module-level function, so the model still pickles,
deep-copies and compiles) makes ``model(x)`` return the logits or features tensor that leanvit's loops read. The
model's class is left alone, so :func:`leanvit.patch` finds the adapter of its family (:mod:`leanvit.reduce.adapters`).

Preprocessing is the model's own, given to leanvit's data module the way timm models give theirs: as a timm-style
``pretrained_cfg`` on the model (input size, mean, std, interpolation, crop fraction and crop mode), which
:func:`leanvit.data.build_dataset` reads with ``timm.data.resolve_data_config``:

* transformers: the image processor saved beside the model (``preprocessor_config.json``, read with
  ``AutoImageProcessor``): ``size`` height x width is a squash resize, ``size`` shortest edge S with a centre crop
  C is a resize of the shortest edge to S then the crop (crop fraction C / S), ``resample``, ``image_mean``,
  ``image_std`` (0 and 1 with ``do_normalize`` off). Settings leanvit cannot reproduce (no resize, a rescale other
  than 1/255, a shortest-edge resize without a crop, which gives images of different sizes) are refused. Without a
  processor: the config's ``image_size`` with timm's ImageNet defaults (resize and centre crop 0.875, bicubic,
  ImageNet mean and std), and a note says so.
* open_clip: the model's ``preprocess_cfg`` (``open_clip.get_model_preprocess_cfg``: size, mean, std,
  interpolation, resize mode ``shortest`` / ``squash`` / ``longest``). ``longest`` pads with the mean colour (timm's
  ``border`` mode) where open_clip pads with ``fill_color``; a note says so when they differ.

Where the preprocessing came from is returned in words (:attr:`ExternalModel.notes`), for the command line to say.
transformers and open_clip are imported only when such a name is used; without them the name is refused in one line
that names the install command.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import math
from dataclasses import dataclass
from inspect import signature
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ConfigError

# prefix -> (module to import, the extra that installs it, the pip package)
LIBRARIES = {"hf": ("transformers", "hf", "transformers"), "open_clip": ("open_clip", "clip", "open_clip_torch")}
# the attribute of a loaded model that holds its :class:`ExternalModel`
INFO_ATTR = "leanvit_external"
# composite (image-text) models whose vision tower runs, and the config key the tower class needs from the top level
TOWERS = {"CLIPModel": ("CLIPVisionModelWithProjection", ("projection_dim",)), "SiglipModel": ("SiglipVisionModel", ())}
# the verbs that take these names
VERBS = ("eval", "bench", "compare", "vis")
# PIL resampling filters (the ``resample`` of transformers' image processors) by number
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# open_clip's resize modes as timm's crop modes (crop fraction 1: the resize gives the model's size)
_RESIZE_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}


@dataclass(frozen=True)
class ExternalModel:
    """What was loaded for an ``hf:`` / ``open_clip:`` name (``getattr(model, INFO_ATTR)``).

    Attributes:
        name: the name as given (``hf:PATH``).
        library: ``transformers`` or ``open_clip``.
        architecture: the class that runs (``ViTForImageClassification``, ``CLIPVisionModelWithProjection``,
            ``VisionTransformer``).
        labels: the class names in the order of the head's outputs; None for a model without a classification head.
        notes: where the preprocessing came from, and anything else the user should know, one sentence each.
    """

    name: str
    library: str
    architecture: str
    labels: tuple[str, ...] | None
    notes: tuple[str, ...] = ()


def split_name(name: Any) -> tuple[str, str] | None:
    """``("hf", "PATH")`` for ``hf:PATH`` (``open_clip:ARCH`` likewise), None for any other name (timm, leanvit)."""
    if not isinstance(name, str):
        return None
    prefix, sep, ref = name.partition(":")
    return (prefix, ref) if sep and prefix in LIBRARIES else None


def is_external(name: Any) -> bool:
    return split_name(name) is not None


def external_info(model: nn.Module) -> ExternalModel | None:
    """The :class:`ExternalModel` of a model loaded by :func:`create_external`, or None."""
    return getattr(model, INFO_ATTR, None)


def _library(prefix: str):
    module, extra, package = LIBRARIES[prefix]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"-m {prefix}:... needs {package}, which cannot be imported ({e}): "
                          f"pip install 'leanvit[{extra}]'") from None


def _looks_like_hub_id(ref: str) -> bool:
    """``name`` or ``org/name``: what the hub accepts (a path with more parts, or starting with . / ~, is local)."""
    parts = ref.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not ref.startswith((".", "~")) and "\\" not in ref


def _check_ref(prefix: str, ref: str) -> None:
    if not ref.strip():
        what = "a folder written by save_pretrained (hf:PATH)" if prefix == "hf" else \
            "an architecture (open_clip:ARCH, see open_clip.list_models())"
        raise ConfigError(f"-m {prefix}: needs {what}")


def check_external(name: str) -> None:
    """Check an ``hf:`` / ``open_clip:`` name before anything is loaded: the library is installed, a local folder
    exists and holds ``config.json``, an open_clip architecture is known. Raises :class:`ConfigError`."""
    prefix, ref = split_name(name)
    _check_ref(prefix, ref)
    lib = _library(prefix)
    if prefix == "hf":
        _hf_folder(name, ref)
    else:
        _open_clip_arch(lib, name, ref)


# ------------------------------------------------------------------------------------------------- loading
def create_external(name: str, pretrained: bool | None = True, weights: str | None = None, logits: bool = False,
                    num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The model an ``hf:`` / ``open_clip:`` name stands for, in eval mode, returning a tensor from ``model(x)``,
    with its preprocessing as ``model.pretrained_cfg`` and an :class:`ExternalModel` as ``model.leanvit_external``
    (``num_classes`` is set for a model with a classification head).

    Args:
        pretrained: load the model's weights (the folder's; open_clip: ``weights``). False: random weights (for
            timing); None: the weights the name or ``weights`` gives, random for a bare open_clip architecture.
        weights: open_clip only: the weights file of the whole CLIP model.
        logits: the caller needs logits over a dataset's classes (eval, compare): a model without a classification
            head is refused before its weights are read.
        num_classes: must equal the head's size if given (leanvit gives models of other libraries no new head).
        kwargs: refused: model options (``drop_path_rate``, ...) apply to timm models.
    """
    check_external(name)
    if kwargs:
        raise ConfigError(f"{name}: {', '.join(sorted(kwargs))} apply to timm models only")
    prefix, ref = split_name(name)
    if prefix == "hf":
        return _create_hf(name, ref, pretrained, weights, logits, num_classes)
    return _create_open_clip(name, ref, pretrained, weights, logits, num_classes)


def check_labels(model: nn.Module, classes: list[str] | None) -> None:
    """Refuse a dataset whose class folders are the model's label names in another order: the labels would not line
    up with the head (the count alone is checked by :mod:`leanvit.data`). Names that do not match (ImageNet folder
    ids against readable labels, transformers' default ``LABEL_0``) cannot be compared and are left to the count."""
    info = external_info(model)
    if info is None or info.labels is None or not classes:
        return
    if set(info.labels) == set(classes) and list(info.labels) != list(classes):
        shown = ", ".join(info.labels[:5]) + (" ..." if len(info.labels) > 5 else "")
        raise ConfigError(f"{info.name} numbers its labels {shown}, but the data's class folders sort as "
                          f"{', '.join(list(classes)[:5])}{' ...' if len(classes) > 5 else ''}: the labels would not "
                          f"line up with the head; rename the folders so that they sort in the model's label order")


def _headless(name: str, architecture: str) -> str:
    give = ("give a transformers model saved with an image classification head for these classes "
            "(...ForImageClassification), or " if name.startswith("hf:") else "")
    return (f"{name} is a {architecture}, which has no classification head: eval and compare measure accuracy from "
            f"logits over the dataset's classes, which it does not give; {give}measure it with bench, vis or "
            f"compare --no-accuracy")


def _check_head(name: str, labels: tuple[str, ...] | None, num_classes: int | None) -> None:
    if num_classes is not None and (labels is None or len(labels) != num_classes):
        head = "no classification head" if labels is None else f"a head of {len(labels)} outputs"
        raise ConfigError(f"--num-classes {num_classes}: {name} has {head}, and leanvit does not give models of "
                          f"other libraries a new head")


@contextlib.contextmanager
def _quiet(transformers: Any = None) -> Iterator[None]:
    """Silence the libraries' logging and progress bars while a model loads (leanvit checks what they would warn
    about, missing weights included, and says it in its own words)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    bars = None
    if transformers is not None:
        tlog = transformers.utils.logging
        bars = tlog.is_progress_bar_enabled()
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        logging.disable(previous)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------------- transformers
def _hf_folder(name: str, ref: str) -> Path | None:
    """The local folder of ``hf:PATH``, checked; None for a hub name."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{name}: {path} is a file; give the folder that save_pretrained wrote")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{name}: folder {path} has no config.json; give a folder written by transformers' "
                              f"save_pretrained")
        return path
    if not _looks_like_hub_id(ref):
        raise ConfigError(f"{name}: folder {path} does not exist")
    return None


def _hf_class(transformers: Any, name: str, config: Any) -> tuple[type, dict[str, Any], bool]:
    """The class to load, the config values it needs from the top level (a tower of a composite model), and whether
    it has a classification head."""
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else None
    if arch is None:  # a config without architectures: the base model of its type
        return transformers.AutoModel, {}, False
    if arch in TOWERS:
        tower, keys = TOWERS[arch]
        return getattr(transformers, tower), {k: getattr(config, k) for k in keys}, False
    cls = getattr(transformers, arch, None)
    if not isinstance(cls, type):
        raise ConfigError(f"{name}: config.json names the architecture {arch}, which transformers "
                          f"{transformers.__version__} does not have (leanvit does not run custom model code)")
    if "ForImageClassification" in arch:  # SiglipForImageClassification too: a composite config, one tower
        return cls, {}, True
    if getattr(config, "vision_config", None) is not None:
        raise ConfigError(f"{name} is a {arch}: leanvit runs the vision tower of {' and '.join(TOWERS)} only; save "
                          f"the vision model on its own (with save_pretrained) and pass that folder")
    if "pixel_values" not in signature(cls.forward).parameters:
        raise ConfigError(f"{name} is a {arch}, which does not take images (no pixel_values)")
    if "For" in arch:  # a head for another task (masked image modelling, segmentation, ...): no class logits
        raise ConfigError(f"{name} is a {arch}: leanvit runs image classifiers (...ForImageClassification) and vision "
                          f"encoders (ViTModel, Dinov2Model, CLIP and SigLIP vision towers, ...)")
    return cls, {}, False


def _hf_labels(config: Any) -> tuple[str, ...]:
    id2label = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", len(id2label)))
    return tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n))


def _create_hf(name: str, ref: str, pretrained: bool | None, weights: str | None, logits: bool,
               num_classes: int | None) -> nn.Module:
    transformers = _library("hf")
    if weights is not None:
        raise ConfigError(f"--weights: {name} brings its weights (the folder's model.safetensors); --weights is for "
                          f"timm and open_clip: models")
    local = _hf_folder(name, ref)
    where = (f"folder {local}" if local is not None
             else f"'{ref}' (not a local folder; looked up on the Hugging Face hub)")
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(ref)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{name}: cannot read the config of {where}: {_first_line(e)}") from None
    cls, top, head = _hf_class(transformers, name, config)
    labels = _hf_labels(config) if head else None
    arch = cls.__name__ if cls is not transformers.AutoModel else f"{type(config).__name__.removesuffix('Config')}Model"
    if logits and not head:
        raise ConfigError(_headless(name, arch))
    _check_head(name, labels, num_classes)
    try:
        with _quiet(transformers):
            model = _load_hf(transformers, cls, ref, config, top, pretrained is not False, name)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{name}: cannot load the model of {where}: {_first_line(e)}") from None
    model.eval()
    if getattr(model.config, "return_dict", True) is False:
        model.config.return_dict = True  # the hooks read named outputs (transformers 5 needs them anyway)
    model.register_forward_hook(_logits_of if head else _features_of)
    cfg, notes = _hf_preprocess(transformers, name, ref, local, model.config)
    model.pretrained_cfg = cfg
    if head:
        model.num_classes = len(labels)
    if pretrained is False:
        notes = (*notes, f"{name} runs with random weights (--no-pretrained)")
    setattr(model, INFO_ATTR, ExternalModel(name, "transformers", type(model).__name__, labels, notes))
    return model


def _load_hf(transformers: Any, cls: type, ref: str, config: Any, top: dict[str, Any], weights: bool,
             name: str) -> nn.Module:
    if cls is transformers.AutoModel:
        if not weights:
            return cls.from_config(config)
        model, info = cls.from_pretrained(ref, config=config, output_loading_info=True)
    else:
        # a tower of a composite model reads its own part of the config (and the top-level values it needs)
        own = config if isinstance(config, cls.config_class) else cls.config_class.from_pretrained(ref, **top)
        if not weights:
            return cls._from_config(own)
        model, info = cls.from_pretrained(ref, config=own, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing and all(k.startswith("pooler.") for k in missing) \
            and "add_pooling_layer" in signature(type(model).__init__).parameters:
        # a ViTModel saved without its pooler (as DINO checkpoints are): run it without one
        model, info = type(model).from_pretrained(ref, config=model.config, add_pooling_layer=False,
                                                  output_loading_info=True)
        missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ConfigError(f"{name}: the saved weights lack {len(missing)} parameters of {type(model).__name__} "
                          f"({shown}), which would run untrained; save the model with save_pretrained from the class "
                          f"its config.json names")
    return model


def _logits_of(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of a transformers classifier: its logits ``(B, num_labels)``."""
    return output.logits


def _features_of(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of a transformers vision encoder: the projected image embeddings (CLIP), else the pooled output
    (SigLIP's attention pooling, DINOv2's normed cls token, ViT's pooler), else the first token, ``(B, D)``."""
    for key in ("image_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    return output.last_hidden_state[:, 0]


def output_tensor(output: Any) -> torch.Tensor | None:
    """The one tensor a model's output stands for: the output itself, a transformers output's logits (a
    classifier), else its image features as :func:`_features_of` picks them (an encoder); None when there is no
    such tensor (a tuple, a text-and-image output)."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if any(getattr(output, k, None) is not None for k in ("image_embeds", "pooler_output", "last_hidden_state")):
        return _features_of(None, None, output)
    return None


def _field(obj: Any, key: str) -> Any:
    """``obj[key]`` of a dict (transformers 4's sizes) or ``obj.key`` (transformers 5's ``SizeDict``)."""
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _interpolation(value: Any, name: str) -> str:
    mode = getattr(value, "value", value)  # a torchvision InterpolationMode gives its name; PIL's enum an int
    if isinstance(mode, str):
        return mode
    try:
        return _RESAMPLE[int(mode)]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{name}: its image processor resamples with {value!r}, which leanvit does not "
                          f"know") from None


def crop_fraction(crop: int, scale: int) -> float:
    """The crop fraction for which timm's eval transform resizes to ``scale`` and crops ``crop``: timm resizes to
    ``floor(crop / fraction)``, so ``crop / scale`` is nudged where floating point would floor one pixel short
    (``crop / (scale + 0.5)`` floors to ``scale`` exactly)."""
    fraction = crop / scale
    return fraction if math.floor(crop / fraction) == scale else crop / (scale + 0.5)


def _hf_preprocess(transformers: Any, name: str, ref: str, local: Path | None, config: Any
                   ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The timm-style data config of a transformers model and where it came from (see the module docstring)."""
    chans = int(getattr(config, "num_channels", 3))
    has_processor = local is None or (local / "preprocessor_config.json").is_file()
    proc = None
    if has_processor:
        try:
            with _quiet(transformers):
                proc = transformers.AutoImageProcessor.from_pretrained(ref)
        except (OSError, ValueError) as e:
            if local is not None:  # a processor file that cannot be read is an error; a hub model may have none
                raise ConfigError(f"{name}: cannot read its preprocessor_config.json: {_first_line(e)}") from None
    if proc is None:
        size = getattr(config, "image_size", None)
        if size is None:
            raise ConfigError(f"{name}: neither a preprocessor_config.json nor an image_size in its config.json says "
                              f"what size of images it takes")
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from timm.data.constants import DEFAULT_CROP_PCT

        cfg = {"input_size": (chans, h, w), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
               "interpolation": "bicubic", "crop_pct": DEFAULT_CROP_PCT, "crop_mode": "center"}
        where = f"folder {local}" if local is not None else "the hub model"
        return cfg, (f"{name}: {where} has no preprocessor_config.json: {describe(cfg)} (its config.json's "
                     f"image_size with timm's ImageNet defaults); save the model's image processor beside it "
                     f"(processor.save_pretrained) to use its own",)
    cfg = _processor_cfg(proc, name, chans)
    return cfg, (f"{name}: preprocessing from its preprocessor_config.json ({type(proc).__name__}): "
                 f"{describe(cfg)}",)


def _processor_cfg(proc: Any, name: str, chans: int) -> dict[str, Any]:
    """A transformers image processor's settings as a timm data config; refuses what timm's transform cannot do."""
    def refuse(why: str) -> None:
        raise ConfigError(f"{name}: its image processor ({type(proc).__name__}) {why}, which leanvit cannot reproduce")

    if not getattr(proc, "do_resize", True):
        refuse("does not resize images")
    if getattr(proc, "do_rescale", True) is False or abs(float(getattr(proc, "rescale_factor", 1 / 255))
                                                          - 1 / 255) > 1e-9:
        refuse("scales pixel values other than by 1/255")
    size, crop = getattr(proc, "size", None), None
    if getattr(proc, "do_center_crop", False):
        crop = (_field(proc.crop_size, "height"), _field(proc.crop_size, "width"))
    h, w, short = _field(size, "height"), _field(size, "width"), _field(size, "shortest_edge")
    if h is not None and w is not None:  # squash to h x w (then crop, scaled alike on both sides)
        if crop is None:
            input_hw, fraction = (int(h), int(w)), 1.0
        elif crop[0] * w != crop[1] * h:
            refuse(f"resizes to {h}x{w} and crops {crop[0]}x{crop[1]}, not the same fraction of both sides")
        else:
            input_hw, fraction = (int(crop[0]), int(crop[1])), crop_fraction(int(crop[0]), int(h))
        mode = "squash"
    elif short is not None:
        if crop is None:
            refuse(f"resizes the shortest edge to {short} without a crop (images of different sizes)")
        if crop[0] != crop[1]:
            refuse(f"crops a non-square {crop[0]}x{crop[1]} after a shortest-edge resize")
        input_hw, fraction, mode = (int(crop[0]), int(crop[1])), crop_fraction(int(crop[0]), int(short)), "center"
    else:
        refuse(f"has a size leanvit does not know ({size})")
    normalize = getattr(proc, "do_normalize", True)
    mean = tuple(float(v) for v in proc.image_mean) if normalize else (0.0,) * chans
    std = tuple(float(v) for v in proc.image_std) if normalize else (1.0,) * chans
    return {"input_size": (chans, *input_hw), "mean": mean, "std": std,
            "interpolation": _interpolation(getattr(proc, "resample", 3), name), "crop_pct": fraction,
            "crop_mode": mode}


def describe(cfg: dict[str, Any]) -> str:
    """A data config in words: ``resize the shortest edge to 256 (bicubic), centre crop 224x224, mean ..., std ...``."""
    _, h, w = cfg["input_size"]
    pct = cfg.get("crop_pct") or 1.0
    scale = (math.floor(h / pct), math.floor(w / pct))
    mode = cfg.get("crop_mode") or "center"
    interp = cfg.get("interpolation", "bicubic")
    if mode == "squash":
        steps = f"resize to {scale[0]}x{scale[1]} ({interp})" + (f", centre crop {h}x{w}" if scale != (h, w) else "")
    elif mode == "border":
        steps = f"resize the longest edge to {max(scale)} ({interp}), pad to {h}x{w}"
    else:
        steps = f"resize the shortest edge to {min(scale)} ({interp}), centre crop {h}x{w}"
    return f"{steps}, mean {_numbers(cfg['mean'])}, std {_numbers(cfg['std'])}"


def _numbers(values: Any) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


# ------------------------------------------------------------------------------------------------- open_clip
_SCHEMAS = ("local-dir:", "hf-hub:")


def _open_clip_arch(open_clip: Any, name: str, ref: str) -> None:
    if ref.startswith("local-dir:"):
        folder = Path(ref[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{name}: folder {folder} does not exist")
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"{name}: folder {folder} has no open_clip_config.json")
        return
    if ref.startswith("hf-hub:"):
        return
    known = open_clip.list_models()
    if ref not in known:
        close = difflib.get_close_matches(ref, known, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"{name}: open_clip {open_clip.__version__} has no architecture '{ref}' (open_clip."
                          f"list_models() lists them; a custom one: open_clip:local-dir:DIR with its "
                          f"open_clip_config.json).{hint}")


def _create_open_clip(name: str, ref: str, pretrained: bool | None, weights: str | None, logits: bool,
                      num_classes: int | None) -> nn.Module:
    open_clip = _library("open_clip")
    if logits:
        raise ConfigError(_headless(name, "CLIP image encoder (open_clip's visual tower)"))
    _check_head(name, None, num_classes)
    schema = ref.startswith(_SCHEMAS)
    if weights is not None:
        if schema:
            raise ConfigError(f"--weights: {name} brings its weights ({ref.split(':')[0]}:); --weights goes with "
                              f"open_clip:ARCH")
        if not Path(weights).is_file():
            raise ConfigError(f"weights file {weights} does not exist (open_clip's pretrained tags are not fetched "
                              f"by name: with hub access, use open_clip:hf-hub:ORG/REPO)")
    elif pretrained and not schema:
        raise ConfigError(f"{name} needs its weights: --weights FILE (a torch or safetensors state dict of the whole "
                          f"CLIP model), or --no-pretrained to run it with random weights")
    load = pretrained is not False or weights is not None
    try:
        with _quiet():
            clip = open_clip.create_model(ref, pretrained=weights if load else None, load_weights=load)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        source = f"weights file {weights}" if weights and load else ref
        raise ConfigError(f"{name}: cannot load {source}: {_first_line(e)}") from None
    visual = clip.visual.eval()
    arch = type(visual).__name__
    pre = open_clip.get_model_preprocess_cfg(clip)
    size = pre.get("size", getattr(visual, "image_size", 224))
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    resize = pre.get("resize_mode", "shortest")
    if resize not in _RESIZE_MODES:
        raise ConfigError(f"{name}: open_clip resize mode '{resize}' is not one leanvit knows")
    cfg = {"input_size": (3, h, w), "mean": tuple(pre.get("mean")), "std": tuple(pre.get("std")),
           "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": 1.0, "crop_mode": _RESIZE_MODES[resize]}
    visual.pretrained_cfg = cfg
    notes = [f"{name}: preprocessing from its open_clip preprocess_cfg: {describe(cfg)}"]
    if resize == "longest" and pre.get("fill_color", 0) != [round(255 * m) for m in cfg["mean"]]:
        notes.append(f"{name}: images are padded with the mean colour, where open_clip pads with fill_color "
                     f"{pre.get('fill_color', 0)}")
    if not load:
        notes.append(f"{name} runs with random weights" + (" (--no-pretrained)" if pretrained is False else ""))
    setattr(visual, INFO_ATTR, ExternalModel(name, "open_clip", arch, None, tuple(notes)))
    return visual
