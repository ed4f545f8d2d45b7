"""The SigLIP and DINOv2 families of transformers models, patched by the adapter of :mod:`.hf_vit`, whose layer
machinery they reuse (only what differs is here); importing this module registers them there
(:func:`.hf_vit.register_family`), which :mod:`leanvit.reduce.adapters` does.

SigLIP: ``SiglipVisionModel``, ``SiglipModel`` (its vision tower; ``get_image_features`` and the image side of
``forward`` reduce, the text tower is untouched) and ``SiglipForImageClassification``. A SigLIP layer is CLIP's
(``layer_norm1`` -> ``self_attn`` -> residual -> ``layer_norm2`` -> ``mlp`` -> residual) and runs the same reducing
forward. What differs:

* No prefix token: every token is an image token (``has_cls=False``, ``num_prefix=0``), so ToMe matches as on timm
  models without a cls token and GTP scores by the attention map. The methods that select by the cls token are
  refused naming the model (:class:`~leanvit.errors.ConfigError`): ``evit``, ``gtp`` with ``score="cls"`` and
  ``idle`` (``idle`` with ``keep=1``, which idles nothing, is allowed). SigLIP's pooling head has a learned query
  that attends over the tokens, but it reads the final tokens through the head's own projections after the last
  layer: it says nothing about which tokens a layer could spare, so it is no cls-token equivalent.
* The pooling head (``SiglipMultiheadAttentionPoolingHead``: a learned probe attending over the last layer's tokens
  with an ``nn.MultiheadAttention``, then a LayerNorm + MLP residual) attends over the tokens that are left. Where
  the method tracked token sizes (ToMe; GTP with ``prop_attn``; ``reducer.current_sizes()``, ``(B, N)``), the head's
  attention adds ``log(size_j)`` to the logit of key j (proportional attention, ToMe's rule for the layers), as
  timm's adapter weighs average pooling by size (:func:`.timm_vit._weighted_pool`): a token standing for s patches
  weighs as s identical keys would, so a merge of identical tokens leaves the pooled output unchanged. It applies
  whatever ``prop_attn`` says about the layers, as timm's pooling does. Patching swaps the class of
  ``head.attention`` for :class:`SizedPoolingAttention`, which passes the log sizes as the float
  ``key_padding_mask`` that ``nn.MultiheadAttention`` adds to the logits (``(B, N)``, one row per image, the same
  for every head); the head's own forward is not replaced.
* ``SiglipForImageClassification`` averages all tokens: the mean is weighted by token size likewise (its class is
  swapped for one whose forward is the same with that mean; transformers 5 only).
* ``budget=`` on a ``SiglipModel`` is solved and measured on its vision tower. The budget counts the pooling head
  as a fixed cost, but its key/value projections shrink with the tokens, so the measured MACs are a little below
  what the solver assumed (the budget holds with a margin).

DINOv2: ``Dinov2Model``, ``Dinov2WithRegistersModel`` and their ``...ForImageClassification``. The prefix tokens are
the cls token and the register tokens (``num_prefix = 1 + num_register_tokens``), never reduced. A DINOv2 layer is
``x + drop_path(layer_scale1(o_proj(attn(norm1(x)))))`` -> reduce ->
``x + drop_path(layer_scale2(mlp(norm2(x))))``, with the MLP or SwiGLU FFN (LayerScale and drop path are the
layer's own modules; no dropout after ``o_proj`` in transformers 5, ``attention.output.dropout`` in 4). The native
grid is the config's ``image_size``: the embeddings interpolate position encodings for any other size, which runs
at zero reduction and is refused with a reducing schedule (the schedule and its MACs hold at the native grid).
The classifiers read ``cat(cls, mean of the patch tokens)``; patched, the mean is weighted by token size (the class
is swapped for one whose forward is transformers 5's with that mean; refused on transformers 4).

Refused while patched, as for ViT (:mod:`.hf_vit`): attention masks, ``output_attentions``, ``output_hidden_states``
with a schedule that removes tokens, gradient checkpointing in training, other input sizes with a reducing schedule.
Transformers 4 layouts are mapped (SigLIP layers like CLIP's, DINOv2's ``attention.attention.query``...) but
untested; only transformers 5 is tested.
"""
from __future__ import annotations

import importlib
import sys
from inspect import signature
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..base import TokenReducer
from .base import REDUCER_ATTR
from .hf_vit import (ORIG_CLASS_ATTR, FAMILIES, HFFamily, _ReducingCLIPLayer4, _ReducingCLIPLayer5, _ReducingLayer4,
                     _ReducingLayer5, _ReducingLayer456, register_family)


# ----------------------------------------------------------------------------------------------- token sizes
def _sizes(owner: nn.Module, n: int) -> torch.Tensor | None:
    """The token sizes ``(B, n)`` the calling thread's last forward left (None: untracked, or not ``n`` tokens)."""
    size = owner.__dict__[REDUCER_ATTR].for_thread().current_sizes()
    return size if size is not None and size.shape[1] == n else None


def weighted_mean(owner: nn.Module, tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``(B, C)``: the mean of the image tokens ``tokens`` ``(B, n, C)`` (the prefix cut off), each weighted by its
    size where the reducer tracked sizes (a merged token counts for the patches it stands for); else the plain
    mean, as transformers computes it."""
    size = _sizes(owner, num_prefix + tokens.shape[1])
    if size is None:
        return tokens.mean(dim=1)
    w = size[:, num_prefix:, None].to(tokens.dtype)  # (B, n, 1)
    return (tokens * w).sum(1) / w.sum(1)


class SizedPoolingAttention(nn.MultiheadAttention):
    """The ``nn.MultiheadAttention`` of an attention-pooling head (SigLIP's) with proportional attention: where the
    reducer tracked token sizes, ``log(size_j)`` is added to every query's logit for key j, passed as the float
    ``key_padding_mask`` ``(B, N)`` that ``nn.MultiheadAttention`` adds to the logits of every head. Never
    constructed: patching swaps the class of the head's module and sets ``_leanvit_reducer``."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = key.shape[1] if self.batch_first else key.shape[0]
        size = _sizes(self, n)  # (B, N)
        if size is not None:
            if key_padding_mask is not None or attn_mask is not None:
                raise UnsupportedModelError("a pooling head with token sizes cannot take attention masks")
            key_padding_mask = size.log().to(query.dtype)  # (B, N): + log(size_j) on the logits of key j
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)


# ----------------------------------------------------------------------------------------------- classifier heads
class _ReducingClassifier:
    """The forward of a classifier whose head averages the image tokens, with the mean weighted by token size
    (:func:`weighted_mean`): transformers 5's forward otherwise (the same calls, so at zero reduction the same
    output). ``return_dict`` is handled as transformers' ``can_return_tuple`` does."""

    _leanvit_base: ClassVar[str]  # the attribute holding the base model
    _leanvit_output: ClassVar[type]  # transformers' ImageClassifierOutput

    def _finish(self, outputs: Any, features: torch.Tensor, labels: torch.Tensor | None, return_dict: bool | None,
                kwargs: dict[str, Any]) -> Any:
        logits = self.classifier(features)
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        out = self._leanvit_output(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                   attentions=outputs.attentions)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return out if return_dict is not False else out.to_tuple()


class _ReducingSiglipClassifier(_ReducingClassifier):
    """``SiglipForImageClassification``: the classifier reads the mean of all tokens (no prefix)."""

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                interpolate_pos_encoding: bool = False, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", None)
        outputs = getattr(self, self._leanvit_base)(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                                    **kwargs)
        seq = outputs.last_hidden_state  # (B, N, C)
        return self._finish(outputs, weighted_mean(self, seq, 0), labels, return_dict, kwargs)


class _ReducingDinov2Classifier(_ReducingClassifier):
    """``Dinov2[WithRegisters]ForImageClassification``: the classifier reads the cls token and the mean of the
    patch tokens (after the cls and register tokens)."""

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", None)
        outputs = getattr(self, self._leanvit_base)(pixel_values, attention_mask=attention_mask, **kwargs)
        seq = outputs.last_hidden_state  # (B, P + n, C)
        P = self.__dict__[REDUCER_ATTR].info.num_prefix
        features = torch.cat([seq[:, 0], weighted_mean(self, seq[:, P:], P)], dim=1)  # (B, 2C)
        return self._finish(outputs, features, labels, return_dict, kwargs)


_MODEL_CLASSES: dict[type, type] = {}  # original classifier class -> reducing subclass


def reducing_model_class(original: type, mixin: type, base_attr: str) -> type:
    """The reducing subclass of a transformers classifier class, made once and published as an attribute of this
    module (so that pickle finds it by name)."""
    cls = _MODEL_CLASSES.get(original)
    if cls is None:
        name = f"Reducing{original.__name__}"
        output = sys.modules[original.__module__].ImageClassifierOutput
        cls = type(name, (mixin, original), {"__module__": __name__, "__qualname__": name,
                                              "_leanvit_base": base_attr, "_leanvit_output": output})
        _MODEL_CLASSES[original] = cls
        setattr(sys.modules[__name__], name, cls)
    return cls


def __getattr__(name: str) -> type:
    """Unpickling a patched classifier in a new process: make the reducing class it names."""
    model = name[len("Reducing"):] if name.startswith("Reducing") else ""
    family = next((f for f in FAMILIES.values() if model in f.models and isinstance(f, _ClassifierFamily)), None)
    if family is not None and model in family.classifiers:
        mod = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
        return reducing_model_class(getattr(mod, model), family.classifier_mixin, family.models[model])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


class _ClassifierFamily(HFFamily):
    """A family whose classifiers average the image tokens: patching swaps their class (:class:`_ReducingClassifier`)
    so that the mean is weighted by token size."""

    classifiers: ClassVar[tuple[str, ...]] = ()
    classifier_mixin: ClassVar[type] = _ReducingClassifier

    def attach(self, model: nn.Module, base: nn.Module, reducer: TokenReducer) -> None:
        if type(model).__name__ not in self.classifiers:
            return
        if _transformers_major() < 5:
            raise UnsupportedModelError(
                f"leanvit cannot patch {type(model).__name__} under transformers 4: its head averages the tokens, "
                f"which leanvit weighs by token size on transformers 5 only; patch its "
                f"{self.models[type(model).__name__]} instead")
        model.__dict__[ORIG_CLASS_ATTR] = type(model)
        model.__class__ = reducing_model_class(type(model), self.classifier_mixin, self.models[type(model).__name__])

    def detach(self, model: nn.Module, base: nn.Module) -> None:
        if ORIG_CLASS_ATTR in model.__dict__:
            model.__class__ = model.__dict__.pop(ORIG_CLASS_ATTR)


# ----------------------------------------------------------------------------------------------- SigLIP
@register_family
class SiglipFamily(_ClassifierFamily):
    name, module, layer = "SigLIP", "siglip", "SiglipEncoderLayer"
    models = {"SiglipVisionModel": None, "SiglipModel": "vision_model", "SiglipForImageClassification": "vision_model"}
    classifiers = ("SiglipForImageClassification",)
    classifier_mixin = _ReducingSiglipClassifier
    global_pool = "map"  # the attention-pooling head (timm's name for it)

    def mixin(self, original: type) -> type:
        # transformers 4: forward(hidden_states, attention_mask, output_attentions=False) -> (Tensor,), called with
        # output_attentions by keyword, which CLIP's transformers 4 mixin takes; 5: CLIP's transformers 5 forward
        params = signature(original.forward).parameters
        return _ReducingCLIPLayer4 if "output_attentions" in params else _ReducingCLIPLayer5

    def tower(self, model: nn.Module) -> nn.Module:
        return model.vision_model if type(model).__name__ == "SiglipModel" else model  # SiglipModel takes text first

    def attach(self, model: nn.Module, base: nn.Module, reducer: TokenReducer) -> None:
        head = getattr(base, "head", None) if getattr(base, "use_head", True) else None
        if head is not None:
            attn = getattr(head, "attention", None)
            if type(attn) not in (nn.MultiheadAttention, SizedPoolingAttention) or not attn.batch_first:
                raise UnsupportedModelError(
                    f"leanvit cannot patch {type(model).__name__}: its pooling head's attention is a "
                    f"{type(attn).__name__}, not the batch-first nn.MultiheadAttention leanvit knows")
        super().attach(model, base, reducer)
        if head is not None:
            head.attention.__class__ = SizedPoolingAttention
            head.attention.__dict__[REDUCER_ATTR] = reducer

    def detach(self, model: nn.Module, base: nn.Module) -> None:
        super().detach(model, base)
        head = getattr(base, "head", None)
        attn = getattr(head, "attention", None)
        if type(attn) is SizedPoolingAttention:
            attn.__class__ = nn.MultiheadAttention
            attn.__dict__.pop(REDUCER_ATTR, None)


# ----------------------------------------------------------------------------------------------- DINOv2
class _Dinov2Parts:
    """A DINOv2 layer's own modules around the attention and the MLP: ``norm1``/``norm2``, LayerScale
    (``layer_scale1``/``layer_scale2``) and drop path (one ``drop_path`` module for both residuals)."""

    def _norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm1(x)

    def _norm2(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(x)

    def _attn_residual(self, y: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.layer_scale1(y))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.layer_scale2(self.mlp(x)))  # mlp: Dinov2MLP or the SwiGLU FFN


class _ReducingDinov2Layer5(_Dinov2Parts, _ReducingLayer5):
    """transformers 5: ``forward(hidden_states, attention_mask=None, **kwargs) -> Tensor``."""


class _ReducingDinov2Layer4(_Dinov2Parts, _ReducingLayer4):
    """transformers 4 before 4.56: ``forward(hidden_states, head_mask=None, output_attentions=False) -> (Tensor,)``."""


class _ReducingDinov2Layer456(_Dinov2Parts, _ReducingLayer456):
    """transformers 4.56 to 4.57: ``forward(hidden_states, head_mask=None) -> Tensor``."""


_DINOV2_MIXINS = {_ReducingLayer5: _ReducingDinov2Layer5, _ReducingLayer4: _ReducingDinov2Layer4,
                  _ReducingLayer456: _ReducingDinov2Layer456}


@register_family
class Dinov2Family(_ClassifierFamily):
    name, module, layer = "DINOv2", "dinov2", "Dinov2Layer"
    models = {"Dinov2Model": None, "Dinov2ForImageClassification": "dinov2"}
    classifiers = ("Dinov2ForImageClassification",)
    classifier_mixin = _ReducingDinov2Classifier

    def mixin(self, original: type) -> type:
        return _DINOV2_MIXINS[super().mixin(original)]  # the ViT layer's forward signatures, DINOv2's parts


@register_family
class Dinov2RegistersFamily(Dinov2Family):
    name, module, layer = "DINOv2 with registers", "dinov2_with_registers", "Dinov2WithRegistersLayer"
    models = {"Dinov2WithRegistersModel": None,
              "Dinov2WithRegistersForImageClassification": "dinov2_with_registers"}
    classifiers = ("Dinov2WithRegistersForImageClassification",)
