"""Hugging Face ``transformers`` ViTs: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher``, CLIP's vision tower:
``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` and ``CLIPModel``, and, defined in :mod:`.hf_more` (see
there), SigLIP (``SiglipVisionModel``, ``SiglipModel``'s vision tower, ``SiglipForImageClassification``) and DINOv2
(``Dinov2Model``, ``Dinov2WithRegistersModel`` and their ``...ForImageClassification``), with any
``attn_implementation`` (the patched layers compute the attention themselves, from the layers' own weights).

One adapter serves every family. A family (:class:`HFFamily`, registered with :func:`register_family`) names its
model classes and layer class and says what differs: the reducing mixin of its layer (the forward's signature in
the installed transformers, its norms, LayerScale), what its prefix tokens are, which tower ``budget=`` measures,
and what else patching swaps (a pooling head that weighs token sizes). Everything else (finding the layers, the
attention view, the checks, the refusals) is shared here. :mod:`.hf_more` builds on this module and registers its
families when :mod:`leanvit.reduce.adapters` imports it (as :mod:`.shuffle` registers its blocks with the timm
adapter); this module never imports it, so that the SigLIP and DINOv2 specifics stay out of this file.

CLIP: patching a ``CLIPModel`` patches its vision tower only (``clip.vision_model.encoder.layers``; the text tower's
layers are left alone) and attaches the reducer to the ``CLIPModel``, so ``get_image_features`` and
``forward`` (image side) reduce tokens and ``leanvit.unpatch(clip)`` undoes it. Patching ``clip.vision_model``
(a ``CLIPVisionModel``) instead works as well, with the reducer attached to it; ``get_image_features`` then reduces
too. Patch one or the other: patching a model whose layers are already patched through another model object
(the ``CLIPModel`` and its ``vision_model``, a ``ViTForImageClassification`` and its ``vit``) is refused. With
``budget=`` the MACs of a ``CLIPModel`` are those of its vision tower (``CLIPVisionModel``) at its image size.
A CLIP layer is ``x + out_proj(attn(layer_norm1(x)))`` -> reduce -> ``x + fc2(act(fc1(layer_norm2(x))))`` (no
hidden dropout); ``pre_layrnorm`` before the layers and ``post_layernorm`` on the cls token after them are not
touched. ``CLIPForImageClassification`` (which averages the patch tokens) is not supported. CLIP layers refuse
non-None ``attention_mask``/``causal_attention_mask`` (the vision tower passes none). Tested with transformers 5;
the transformers 4 CLIP layer signature (``causal_attention_mask``, ``output_attentions``) is handled but untested.

What differs from timm (:mod:`.timm_vit`) is only the layout, handled here so that the methods stay the same:

* the layers are ``model[.vit|.deit].layers`` (transformers 5) or ``...encoder.layer`` (transformers 4); CLIP's
  ``[model.vision_model.]encoder.layers``;
* the attention has separate query, key and value projections (``q_proj``/``k_proj``/``v_proj``/``o_proj`` in
  transformers 5, ``attention.attention.query``... and ``attention.output.dense`` in 4). Patching attaches to each
  layer an :class:`AttentionView` that presents them in timm's layout (``qkv``, ``q_norm``, ``k_norm``, ``proj``,
  ``attn_drop``, ``proj_drop``, ``num_heads``, ``scale``), which :mod:`leanvit.reduce.attention` reads. It is a
  plain object kept in the layer's ``__dict__`` (not a submodule), so state-dict keys do not change, and it reads
  the layer's own modules at every call, so ``.to()``, ``.train()`` and loaded weights reach it;
* the prefix tokens, read from the embeddings, are cls (ViT, CLIP), cls + distillation (DeiT), cls + registers
  (DINOv2) or none (SigLIP, ``has_cls=False``); the ViT, DeiT and CLIP heads read the prefix tokens only. A method
  that needs a cls token is refused on a model without one by a :class:`~leanvit.errors.ConfigError` that names
  the model and its family.

Patching swaps each layer's class (``ViTLayer``, ``DeiTLayer``, ``CLIPEncoderLayer``, and the families of
:mod:`.hf_more`) for a reducing subclass (made once per original class and reachable as an attribute of this
module, so patched models pickle) whose forward is HF's; ViT's is
``x + dropout(o_proj(attn(layernorm_before(x))))`` -> reduce -> ``x + dropout(fc2(act(fc1(layernorm_after(x)))))``.
``transformers`` is imported only when one of its models is patched.

Refused while patched (:class:`~leanvit.errors.UnsupportedModelError`): attention masks and ``head_mask``;
``output_attentions`` (the patched layers do not run HF's attention module, so its maps would be missing);
``output_hidden_states`` with a schedule that removes tokens under transformers 5 (the layers' outputs would have
different token counts; transformers 4 collects them outside the layers, where leanvit cannot check, and returns
them with the reduced token counts); gradient checkpointing in training; input sizes other than the model's with a
reducing schedule.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from inspect import signature
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, UnsupportedModelError
from ...ops.schedule import BlockShape
from ...ops.select import gather_tokens
from ..base import TokenReducer
from ..types import ViTInfo
from .base import REDUCER_ATTR, ModelAdapter, block_reducer, builtin_mask_only, register_adapter

VIEW_ATTR = "_leanvit_view"
ORIG_CLASS_ATTR = "_leanvit_orig_class"  # a model whose own class a family swapped (its head): the original class


class HFFamily:
    """One transformers model family: which model classes it has, which layer class is patched, and what a family
    does beyond the layers. The ViT, DeiT and CLIP families are defined here, SigLIP and DINOv2 in :mod:`.hf_more`;
    a family registers itself with :func:`register_family`.

    Class attributes: ``name`` (in messages), ``module`` (``transformers.models.<module>``), ``models`` (model class
    name -> attribute holding the base model that has the embeddings and the encoder; None: the model itself),
    ``layer`` (the layer class name), ``global_pool`` (what the head reads, for :class:`ViTInfo`).
    """

    name = ""
    module = ""
    models: dict[str, str | None] = {}
    layer = ""
    global_pool = "token"

    def mixin(self, original: type) -> type:
        """The reducing mixin for ``original`` (this family's layer class in the installed transformers), chosen
        by its forward's signature: transformers 5 layers take attention_mask; 4.56-4.57 layers a head_mask and
        return a tensor; earlier ones a head_mask and output_attentions and return a tuple."""
        params = signature(original.forward).parameters
        return (_ReducingLayer5 if "attention_mask" in params
                else _ReducingLayer4 if "output_attentions" in params else _ReducingLayer456)

    def prefix(self, base: nn.Module) -> tuple[bool, int]:
        """``(has_cls, num_prefix)`` read from the base model's embeddings: a cls token first (``cls_token``, CLIP's
        ``class_embedding``), then a distillation token (DeiT), then register tokens (``register_tokens``)."""
        emb = base.embeddings
        has_cls = getattr(emb, "cls_token", None) is not None or getattr(emb, "class_embedding", None) is not None
        dist = getattr(emb, "distillation_token", None) is not None
        regs = getattr(emb, "register_tokens", None)
        return has_cls, int(has_cls) + int(dist) + (0 if regs is None else int(regs.shape[1]))

    def tower(self, model: nn.Module) -> nn.Module:
        """The module that takes images as its first argument, whose MACs ``budget=`` counts: the model itself, or
        a dual-tower model's vision tower (its forward takes text first)."""
        return model

    def attach(self, model: nn.Module, base: nn.Module, reducer: TokenReducer) -> None:
        """Patch what reads the layers' output, if the family needs to (a pooling head that weighs token sizes);
        :meth:`detach` undoes it exactly. Default: nothing."""

    def detach(self, model: nn.Module, base: nn.Module) -> None:
        """Undo :meth:`attach`."""


FAMILIES: dict[str, HFFamily] = {}  # transformers module name (``vit``, ``clip``, ...) -> family
SUPPORTED: dict[str, str | None] = {}  # every family's model class name -> attribute holding its base model


def register_family(cls: type[HFFamily]) -> type[HFFamily]:
    """Class decorator: let the adapter patch the family's models (a model class name belongs to one family)."""
    family = cls()
    taken = [m for m in family.models if m in SUPPORTED]
    if family.module in FAMILIES or taken:
        raise ValueError(f"transformers family '{family.module}' or models {taken} are already registered")
    FAMILIES[family.module] = family
    SUPPORTED.update(family.models)
    return cls


def _fail(model: nn.Module, why: str) -> None:
    raise UnsupportedModelError(
        f"leanvit cannot patch {own_class(model).__name__}: {why}. Supported from transformers: "
        f"{', '.join(SUPPORTED)} (other transformers models are not supported).")


def own_class(model: nn.Module) -> type:
    """The model's own class: its class, or the original of one a family swapped (a classifier's head)."""
    return model.__dict__.get(ORIG_CLASS_ATTR, type(model))


def _module_family(cls: type) -> HFFamily | None:
    """The family of the transformers module that defines ``cls`` (``transformers.models.<module>.modeling_...``)."""
    parts = cls.__module__.split(".")
    return FAMILIES.get(parts[2]) if len(parts) > 3 and parts[:2] == ["transformers", "models"] else None


def family_of(model: nn.Module) -> HFFamily | None:
    """The family of a transformers model class leanvit knows, or None."""
    cls = own_class(model)
    family = _module_family(cls)
    return family if family is not None and cls.__name__ in family.models else None


def _layer_family(cls: type) -> HFFamily | None:
    """The family whose layer class is ``cls`` (a transformers class, not a reducing subclass), or None."""
    family = _module_family(cls)
    return family if family is not None and cls.__name__ == family.layer else None


def is_transformers_model(model: nn.Module) -> bool:
    return own_class(model).__module__.startswith("transformers.")


# ----------------------------------------------------------------------------------------------- layouts
class _Layout:
    """Where one HF layer keeps its pieces (transformers 5 or 4): the attention's projections, heads, scale and
    dropout probability, the dropout after its output projection (``proj_drop``) and the MLP's Linear layers."""

    def __init__(self, layer: nn.Module):
        self.clip = hasattr(layer, "self_attn")
        if self.clip:  # CLIP/SigLIP encoder layer: self_attn (q/k/v/out_proj, scale, dropout probability), mlp
            att = layer.self_attn
            self.new = True
            self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.out_proj
            self.num_heads = int(att.num_heads)
            self.head_dim = int(att.head_dim)
            self.attn_p = float(att.dropout)
            self.scale = float(att.scale)
            self.proj_drop = _identity  # no dropout after out_proj
            mlps = [layer.mlp]
        else:
            att = layer.attention
            if hasattr(att, "q_proj"):  # transformers 5: ViT/DINOv2 attention with q/k/v/o projections
                self.new = True
                self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
                self.num_heads = int(att.num_attention_heads)
                self.head_dim = int(att.head_dim)
                self.attn_p = float(att.attention_dropout)
                self.scale = float(att.scaling)
                # ViT's layer applies its hidden dropout to the attention output; DINOv2's layer has none
                self.proj_drop = getattr(layer, "dropout", _identity)
            else:  # transformers 4: attention.attention (self-attention) + attention.output (dense, dropout)
                self.new = False
                sa = att.attention
                self.q, self.k, self.v, self.o = sa.query, sa.key, sa.value, att.output.dense
                self.num_heads = int(sa.num_attention_heads)
                self.head_dim = int(sa.attention_head_size)
                # 4.48+ keeps the probability and the scaling; earlier versions an nn.Dropout and no scaling
                self.attn_p = float(sa.dropout_prob if hasattr(sa, "dropout_prob") else sa.dropout.p)
                self.scale = float(getattr(sa, "scaling", self.head_dim ** -0.5))
                self.proj_drop = att.output.dropout
            # the MLP: ``mlp`` (transformers 5 ViT, DINOv2's MLP or SwiGLU) or ViT 4's intermediate + output
            mlps = [layer.mlp] if hasattr(layer, "mlp") else [layer.intermediate, layer.output]
        self.mlp_linears = [m for mlp in mlps for m in mlp.modules() if isinstance(m, nn.Linear)]


class _Dropout:
    """Dropout of probability ``p`` that follows ``owner``'s training flag (timm's ``attn_drop`` reads ``.p``)."""

    def __init__(self, owner: nn.Module, p: float):
        self.owner, self.p = owner, p

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return F.dropout(t, self.p, self.owner.training) if self.p > 0 else t


class _QKV:
    """timm's fused ``qkv`` Linear from three separate projections: ``(B, N, 3 * A)`` in q, k, v order; ``weight``
    and ``bias`` are the concatenated parameters (read by the subset attention of idling)."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
        self.q, self.k, self.v = q, k, v
        self.in_features = q.in_features
        self.out_features = q.out_features + k.out_features + v.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.q(x), self.k(x), self.v(x)), dim=-1)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat((self.q.weight, self.k.weight, self.v.weight))

    @property
    def bias(self) -> torch.Tensor | None:
        if self.q.bias is None:
            return None
        return torch.cat((self.q.bias, self.k.bias, self.v.bias))


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class AttentionView:
    """One HF layer's attention in timm's ``Attention`` layout, for :mod:`leanvit.reduce.attention`."""

    def __init__(self, layer: nn.Module):
        lay = _Layout(layer)
        self.layer = layer
        self.qkv = _QKV(lay.q, lay.k, lay.v)
        self.projections = (lay.q, lay.k, lay.v)  # used one at a time (attention._project): no concatenation
        self.q_norm = self.k_norm = _identity
        self.proj = lay.o
        self.num_heads = lay.num_heads
        self.head_dim = lay.head_dim
        self.scale = lay.scale
        self.attn_drop = _Dropout(layer, lay.attn_p)
        self.proj_drop = lay.proj_drop  # the layer's dropout after the output projection (identity if none)

    @property
    def training(self) -> bool:
        return self.layer.training


# ----------------------------------------------------------------------------------------------- layers
class _ReducingHFLayer:
    """The forward every patched HF layer runs; mixed into a subclass of the layer's own class."""

    _leanvit_reducer: TokenReducer
    _leanvit_index: int

    def _norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm_before(x)

    def _norm2(self, x: torch.Tensor) -> torch.Tensor:
        return self.layernorm_after(x)

    def _attn_residual(self, y: torch.Tensor) -> torch.Tensor:
        """What the attention adds to the residual stream (DINOv2: LayerScale and drop path); default as is."""
        return y

    def _refuse_outputs(self, config: Any, kwargs: dict[str, Any]) -> None:
        """transformers 5: refuse output_attentions, and output_hidden_states where token counts change."""
        if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
            raise UnsupportedModelError("output_attentions is not supported on a token-reduced model: its layers do "
                                        "not run the attention module whose maps transformers records")
        if kwargs.get("output_hidden_states", getattr(config, "output_hidden_states", False)):
            red = self._leanvit_reducer
            if red.reducing and not red.keeps_all_tokens:
                raise UnsupportedModelError("output_hidden_states is not supported on a token-reduced model: its "
                                            "layers return different token counts (patch with r=0 to get them)")

    def _begin(self, x: torch.Tensor) -> TokenReducer:
        if self.training and getattr(self, "gradient_checkpointing", False):
            raise UnsupportedModelError("token reduction cannot be combined with gradient checkpointing (the "
                                        "recomputed forward would run the reducer twice)")
        return block_reducer(self, x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        red = self._begin(x)
        i = self._leanvit_index
        view: AttentionView = self.__dict__[VIEW_ATTR]
        x = red.before_attn(i, x)
        a = red.attend(i, view, self._norm1(x))  # proj_drop applies the layer's attention dropout
        if a.index is not None:  # the attention computed a subset: so does the rest of the layer
            x = gather_tokens(x, a.index)
        x = x + self._attn_residual(a.x)
        x = red.reduce(i, x, a)
        y = self._mlp(self._norm2(x))
        x = x + (y if a.gate is None else y * a.gate)
        x = red.after_mlp(i, x)
        return red.end(x) if i == red.info.depth - 1 else x


class _ReducingLayer5(_ReducingHFLayer):
    """transformers 5: ``forward(hidden_states, attention_mask=None, **kwargs) -> Tensor``."""

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mlp(x))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None and not builtin_mask_only():
            raise UnsupportedModelError("token reduction cannot be combined with attention masks")
        self._refuse_outputs(self.attention.config, kwargs)
        return self._run(hidden_states)


class _ReducingCLIPLayer(_ReducingHFLayer):
    """CLIP's ``CLIPEncoderLayer``: ``layer_norm1``/``layer_norm2``, an MLP without dropout."""

    def _norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm1(x)

    def _norm2(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm2(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)

    @staticmethod
    def _refuse_masks(attention_mask: torch.Tensor | None, causal_attention_mask: torch.Tensor | None) -> None:
        if (attention_mask is not None or causal_attention_mask is not None) and not builtin_mask_only():
            raise UnsupportedModelError("token reduction cannot be combined with attention masks (CLIP's and "
                                        "SigLIP's vision towers pass none)")


class _ReducingCLIPLayer5(_ReducingCLIPLayer):
    """transformers 5: ``forward(hidden_states, attention_mask, **kwargs) -> Tensor``."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        self._refuse_masks(attention_mask, kwargs.get("causal_attention_mask"))
        self._refuse_outputs(self.self_attn.config, kwargs)
        return self._run(hidden_states)


class _ReducingCLIPLayer4(_ReducingCLIPLayer):
    """transformers 4: ``forward(hidden_states, attention_mask, causal_attention_mask, output_attentions=False)
    -> (Tensor,)`` (hidden states are collected outside the layers, as for ViT under 4)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                causal_attention_mask: torch.Tensor | None = None, output_attentions: bool = False,
                **kwargs: Any) -> tuple[torch.Tensor]:
        self._refuse_masks(attention_mask, causal_attention_mask)
        if output_attentions:
            raise UnsupportedModelError("output_attentions is not supported on a token-reduced model: its layers do "
                                        "not return attention maps")
        return (self._run(hidden_states),)


class _ReducingLayer4(_ReducingHFLayer):
    """transformers 4: ``forward(hidden_states, head_mask=None, output_attentions=False) -> (Tensor,)``."""

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dropout(self.output.dense(self.intermediate(x)))

    def forward(self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None,
                output_attentions: bool = False, **kwargs: Any) -> tuple[torch.Tensor]:
        if head_mask is not None:
            raise UnsupportedModelError("token reduction cannot be combined with head_mask")
        if output_attentions:
            raise UnsupportedModelError("output_attentions is not supported on a token-reduced model: its layers do "
                                        "not return attention maps")
        return (self._run(hidden_states),)


def _recording(module: nn.Module) -> bool:
    """Whether transformers 4.56-4.57 has replaced ``module.forward`` by its output-recording wrapper (after the call
    it puts back the original as a bound method of the module, which does not count).

    Those versions put the original back only when the forward returns: after a forward that raised (a refusal
    here included) the wrappers stay, and the model keeps recording (and being refused) until the next forward
    that asks for the outputs succeeds on the unpatched model, or the wrappers are deleted from the modules'
    ``__dict__``."""
    f = module.__dict__.get("forward")
    return f is not None and getattr(f, "__self__", None) is not module


class _ReducingLayer456(_ReducingHFLayer):
    """transformers 4.56 to 4.57: ``forward(hidden_states, head_mask=None) -> Tensor``; ``output_attentions`` and
    ``output_hidden_states`` are collected by replacing the ``forward`` of the recorded modules' instances for the
    call, which is how they are detected here."""

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dropout(self.output.dense(self.intermediate(x)))

    def forward(self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if head_mask is not None:
            raise UnsupportedModelError("token reduction cannot be combined with head_mask")
        if any(_recording(m) for m in self.attention.modules()):
            raise UnsupportedModelError("output_attentions is not supported on a token-reduced model: its layers do "
                                        "not run the attention module whose maps transformers records")
        red = self._leanvit_reducer
        if _recording(self) and red.reducing and not red.keeps_all_tokens:
            raise UnsupportedModelError("output_hidden_states is not supported on a token-reduced model: its "
                                        "layers return different token counts (patch with r=0 to get them)")
        return self._run(hidden_states)


_REDUCING: dict[type, type] = {}  # original layer class -> reducing subclass


def _reducing_name(original: type) -> str:
    return f"Reducing{original.__name__}"


def reducing_class(original: type) -> type:
    """The reducing subclass of an HF layer class (its family's :meth:`HFFamily.mixin` first), made once and
    published as an attribute of this module (so that pickle finds it by name)."""
    cls = _REDUCING.get(original)
    if cls is None:
        family = _layer_family(original)
        if family is None:
            raise UnsupportedModelError(f"leanvit does not know the transformers layer class {original.__name__}")
        cls = type(_reducing_name(original), (family.mixin(original), original),
                   {"__module__": __name__, "__qualname__": _reducing_name(original)})
        _REDUCING[original] = cls
        setattr(sys.modules[__name__], cls.__name__, cls)
    return cls


def __getattr__(name: str) -> type:
    """Unpickling a patched model in a new process: make the reducing class it names (``Reducing<Layer>``)."""
    layer = name[len("Reducing"):] if name.startswith("Reducing") else ""
    family = next((f for f in FAMILIES.values() if f.layer == layer), None)
    if family is not None:
        mod = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
        return reducing_class(getattr(mod, layer))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------- the adapter
def _family(model: nn.Module) -> HFFamily:
    family = family_of(model)
    if family is None:
        _fail(model, "this transformers model class is not one leanvit knows")
    return family


def _base_model(model: nn.Module) -> nn.Module:
    """The module with the embeddings and the encoder: the model's base-model attribute (its family's ``models``),
    and below it transformers 4's inner vision transformer (``CLIPVisionModel.vision_model``,
    ``SiglipVisionModel.vision_model``) where the embeddings are there."""
    attr = _family(model).models[own_class(model).__name__]
    base = model if attr is None else getattr(model, attr)
    while not hasattr(base, "embeddings") and isinstance(getattr(base, "vision_model", None), nn.Module):
        base = base.vision_model
    return base


def hf_layers(model: nn.Module) -> nn.ModuleList:
    base = _base_model(model)
    layers = getattr(base, "layers", None)
    if layers is None:  # ViT/DeiT 4 and DINOv2: encoder.layer; CLIP, SigLIP: encoder.layers
        enc = getattr(base, "encoder", None)
        layers = getattr(enc, "layer", None) or getattr(enc, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        _fail(model, "its encoder layers were not found (unknown transformers version)")
    return layers


def _original_layer(layer: nn.Module) -> type | None:
    """The transformers layer class of a layer, patched or not (None: not a layer class leanvit knows)."""
    original = next((c for c in type(layer).__mro__ if _layer_family(c) is not None), None)
    return original if original is not None and type(layer) in (original, _REDUCING.get(original)) else None


def inspect_hf(model: nn.Module) -> ViTInfo:
    """Check that ``model`` is an HF model leanvit can patch and describe it."""
    family = _family(model)
    layers = hf_layers(model)
    base = _base_model(model)
    shapes = []
    for i, layer in enumerate(layers):
        original = _original_layer(layer)
        if original is None or original.__name__ != family.layer:
            _fail(model, f"layer {i} is a {type(layer).__name__}, not transformers' {family.layer}")
        try:
            lay = _Layout(layer)
        except AttributeError as e:
            _fail(model, f"layer {i} has an unknown layout ({e}; unknown transformers version)")
        attn_dim = lay.num_heads * lay.head_dim
        if lay.q.out_features != attn_dim:
            _fail(model, f"layer {i} attention width {lay.q.out_features} != heads x head_dim {attn_dim}")
        shapes.append(BlockShape(lay.q.in_features, attn_dim,
                                 sum(m.in_features * m.out_features for m in lay.mlp_linears)))
    emb = base.embeddings
    _, h, w = hf_input_size(model)
    patch = _pair(emb.patch_size if hasattr(emb, "patch_embedding") else emb.patch_embeddings.patch_size)
    grid = (h // patch[0], w // patch[1])
    has_cls, num_prefix = family.prefix(base)
    return ViTInfo(depth=len(layers), dim=int(base.config.hidden_size), num_prefix=num_prefix, has_cls=has_cls,
                   grid=grid, num_image=grid[0] * grid[1], global_pool=family.global_pool, blocks=tuple(shapes))


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def hf_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of the model's own image size (the config's): its position embeddings' native grid."""
    emb = _base_model(model).embeddings
    if hasattr(emb, "patch_embedding"):  # CLIP, SigLIP: a Conv2d and the config's (square) image size
        h, w = _pair(emb.image_size)
        return int(emb.patch_embedding.in_channels), h, w
    pe = emb.patch_embeddings
    h, w = _pair(pe.image_size)
    return int(pe.num_channels), h, w


def _refuses_without_cls(cls: type[TokenReducer], info: ViTInfo, options: dict[str, Any]) -> bool:
    """Whether the method refuses a model only because it has no cls token: its reducer cannot be built for this
    model with a reducing schedule, and can be for the same model with one (EViT, GTP's cls score, IdleViT)."""
    schedule = [1] * info.depth
    try:
        cls(info, schedule, **options)
    except ConfigError:
        try:
            cls(replace(info, has_cls=True, num_prefix=info.num_prefix + 1), schedule, **options)
        except ConfigError:
            return False
        return True
    return False


# ----------------------------------------------------------------------------------------------- ViT, DeiT, CLIP
@register_family
class ViTFamily(HFFamily):
    name, module, layer = "ViT", "vit", "ViTLayer"
    models = {"ViTModel": None, "ViTForImageClassification": "vit"}


@register_family
class DeiTFamily(HFFamily):
    name, module, layer = "DeiT", "deit", "DeiTLayer"
    models = {"DeiTModel": None, "DeiTForImageClassification": "deit", "DeiTForImageClassificationWithTeacher": "deit"}


@register_family
class CLIPFamily(HFFamily):
    name, module, layer = "CLIP", "clip", "CLIPEncoderLayer"
    models = {"CLIPVisionModel": None, "CLIPVisionModelWithProjection": "vision_model", "CLIPModel": "vision_model"}

    def mixin(self, original: type) -> type:
        params = signature(original.forward).parameters
        old = "causal_attention_mask" in params  # 4: a causal mask and output_attentions; 5: neither
        if old and "output_attentions" not in params:
            raise UnsupportedModelError("leanvit does not know this transformers version's CLIPEncoderLayer")
        return _ReducingCLIPLayer4 if old else _ReducingCLIPLayer5

    def tower(self, model: nn.Module) -> nn.Module:
        return model.vision_model if type(model).__name__ == "CLIPModel" else model  # CLIPModel takes text first


@register_adapter
class HFViTAdapter(ModelAdapter):
    """transformers' models of the registered families (:class:`HFFamily`; the ``hf`` extra)."""

    describes = ("transformers ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification"
                 "[WithTeacher], CLIPVisionModel[WithProjection], CLIPModel (its vision tower), SiglipVisionModel, "
                 "SiglipModel (its vision tower), SiglipForImageClassification, Dinov2Model, "
                 "Dinov2ForImageClassification, Dinov2WithRegistersModel, Dinov2WithRegistersForImageClassification")

    def claims(self, model: nn.Module) -> bool:
        # every transformers model: the ones leanvit does not know are refused by inspect() with a clear reason
        return is_transformers_model(model)

    def inspect(self, model: nn.Module) -> ViTInfo:
        return inspect_hf(model)

    def patch(self, model: nn.Module, cls: type[TokenReducer], r: Any, budget: float | None, keep: Any,
              measure: bool, options: dict[str, Any], restore: bool = False) -> nn.Module:
        """The shared patching; a method refused because the model has no cls token (SigLIP) is refused naming
        the model and its family."""
        try:
            return super().patch(model, cls, r, budget, keep, measure, options, restore=restore)
        except ConfigError as e:
            info = inspect_hf(model)
            if info.has_cls or not _refuses_without_cls(cls, info, options):
                raise
            raise ConfigError(f"leanvit cannot apply '{cls.name}' to {own_class(model).__name__}: "
                              f"{_family(model).name} models have no cls token, and {e}") from e

    def apply(self, model: nn.Module, reducer: TokenReducer) -> None:
        reducer = reducer.shared()
        family = _family(model)
        layers = hf_layers(model)
        inspect_hf(model)
        if any(type(layer) in _REDUCING.values() for layer in layers):
            _fail(model, "its layers are already patched through another model object (a CLIPModel and its "
                         "vision_model, a classifier and its base model): unpatch that one first")
        model.__dict__[REDUCER_ATTR] = reducer
        for i, layer in enumerate(layers):
            layer.__class__ = reducing_class(_original_layer(layer))
            layer.__dict__[REDUCER_ATTR] = reducer
            layer.__dict__["_leanvit_index"] = i
            layer.__dict__[VIEW_ATTR] = AttentionView(layer)
        try:
            family.attach(model, _base_model(model), reducer)
        except BaseException:
            self.remove(model)  # never leave a half-patched model
            raise

    def remove(self, model: nn.Module) -> None:
        _family(model).detach(model, _base_model(model))
        original = {red: orig for orig, red in _REDUCING.items()}
        for layer in hf_layers(model):
            layer.__class__ = original.get(type(layer), type(layer))
            for key in (REDUCER_ATTR, "_leanvit_index", VIEW_ATTR):
                layer.__dict__.pop(key, None)
        del model.__dict__[REDUCER_ATTR]

    def _patch_budget(self, model: nn.Module, cls: type[TokenReducer], info: ViTInfo, budget: float, measure: bool,
                      options: dict[str, Any], report: dict[str, Any]) -> nn.Module:
        tower = _family(model).tower(model)
        if tower is model:
            return super()._patch_budget(model, cls, info, budget, measure, options, report)
        # a dual-tower model takes text first: solve and measure on its vision tower, then attach to the model
        super()._patch_budget(tower, cls, info, budget, measure, options, report)
        model.__dict__[REDUCER_ATTR] = tower.__dict__.pop(REDUCER_ATTR)
        return model

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return hf_input_size(model)  # count_macs' default reads timm's pretrained config, which HF models lack
