"""open_clip's ViT image tower: ``open_clip.transformer.VisionTransformer`` (a CLIP model's ``visual``), and whole
``CLIP`` / ``CustomTextCLIP`` models, whose image tower alone is patched.

Supported: open_clip 2.24 (the ``clip`` extra's lower bound) to 3.3. Tested with 3.3; 2.24's source was read for
every attribute used here. Its blocks run sequence-first (``(N, B, C)``, before open_clip's ``batch_first``), which the
patched blocks handle by transposing around their batch-first forward; that path is tested with 3.3's own
``Transformer(batch_first=False)``, not with 2.24 itself. The tower's blocks may be

* ``ResidualAttentionBlock``: ``x + ls_1(attn(ln_1(x)))`` with ``attn`` an ``nn.MultiheadAttention`` (one packed
  ``in_proj_weight`` for q, k, v, then ``out_proj``), then ``x + ls_2(mlp(ln_2(x)))`` (``c_fc``, GELU or QuickGELU,
  ``c_proj``); LayerScale (``ls_init_value``) or not;
* ``CustomResidualAttentionBlock`` (open_clip's ``Attention``): with ``qk_norm`` (``ln_q``/``ln_k`` on each head,
  timm's ``q_norm``/``k_norm``), ``scale_heads`` (a learnt scale per head on the attention output, applied as a
  per-channel scale before ``ln_inner``), ``scale_attn_inner`` (``ln_inner``, timm's ``norm`` before the output
  projection), ``scale_attn`` (``ln_attn`` after the attention, before LayerScale) and ``scale_fc`` (a norm inside
  the MLP, run by the block's own MLP). Refused: ``scaled_cosine_attn`` (cosine logits with a learnt temperature per
  head, which the shared attention building blocks do not express).

Prefix: the cls token (``class_embedding``), which every open_clip ViT has, whatever its pooling; so every method,
EViT and IdleViT included, runs on every supported tower (none is a model without a cls token). Pooling:

* ``pool_type='tok'``: the cls token, untouched by every method;
* ``pool_type='avg'`` (mean of the image tokens): weighted by token size (how many patches a merged or propagated
  token stands for; ToMe and GTP track sizes) instead of open_clip's plain mean, as timm's adapter does, so that a
  merged token counts as the patches it stands for; ``final_ln_after_pool`` is kept (the norm runs on the pooled
  output either way);
* ``pool_type='none'``: every remaining token is returned (fewer than the grid has, when tokens were removed);
* ``attentional_pool`` (``AttentionalPooler``; CoCa's ``True`` and the ``'parallel'``/``'cascade'`` forms): a pooler
  that reads the tower's tokens adds ``log(size)`` to its attention logits, which is exactly attending to each merged
  token as to the ``size`` identical tokens it replaced (ToMe's proportional attention); the ``'cascade'`` form's
  second pooler reads the first one's outputs and is left alone. Methods that track no sizes leave the poolers as
  they are.

``output_tokens=True`` returns the tokens that are left (fewer than the grid has when tokens were removed).

Patching a ``CLIP`` or ``CustomTextCLIP`` patches its ``visual`` tower only (the text tower is untouched) and
attaches the reducer to the whole model, so ``encode_image``, ``forward(image, text)`` and ``forward_intermediates``
reduce tokens and ``leanvit.unpatch(model)`` undoes it; patching ``model.visual`` instead attaches it to the tower.
Patch one or the other: a tower whose blocks were patched through the other object is refused. With ``budget=`` the
MACs are those of the tower at its own ``image_size`` (for a whole model: solved and measured on its tower), counted
with ``nn.MultiheadAttention``'s fused fast path off, which torch's MAC counter cannot see into. Refused
with a clear error: towers that are a ``TimmModel`` (patch its ``trunk``, a timm ViT, directly) or a
``ModifiedResNet``; text towers; ``CoCa`` as a whole; subclasses of open_clip's classes; ``nn.MultiheadAttention``
with separate q/k/v weights, ``bias_k``/``bias_v`` or ``add_zero_attn``; cross-attention blocks.

What differs from open_clip's code, and how it stays the same model: the blocks compute the attention with
:mod:`leanvit.reduce.attention` from the block's own weights instead of calling ``nn.MultiheadAttention``, so that
the methods can read the map, the keys or the cls row. Patching keeps in each block's ``__dict__`` an
:class:`AttentionView` that presents the attention in timm's ``Attention`` layout (``qkv``, ``q_norm``, ``k_norm``,
``norm``, ``proj``, ``attn_drop``, ``proj_drop``, ``num_heads``, ``scale``); it is not a submodule (state-dict keys do
not change) and reads the block's modules and parameters at every call, so ``.to()``, ``.train()``, loaded weights and
replaced modules reach it. Patching swaps the class of each block, of the tower and of the token-reading poolers for
a reducing subclass made once per original class and published as an attribute of this module (so patched models
pickle, also in a process that has imported only leanvit); unpatching restores the classes and drops every attribute
added. ``open_clip`` is never imported to recognise a model (its classes are recognised by module and name), only to
unpickle a patched model.

Refused while patched (:class:`~leanvit.errors.UnsupportedModelError`): a non-None ``attn_mask`` (the tower passes
none); gradient checkpointing (``set_grad_checkpointing``) while gradients are on (the recomputed forward would run
the reducer again); ``patch_dropout`` in training mode with a reducing schedule (it drops random patches, so the
token count is not the one the schedule was solved for: turn it off, ``model.visual.patch_dropout =
nn.Identity()``, to train a reducing patch); inputs other than the tower's ``image_size`` with a reducing schedule;
``forward_intermediates(output_fmt='NCHW')`` when tokens were removed, unless patched with ``restore=True`` (which
gives every intermediate back on the whole grid; else use ``'NLC'``).
"""
from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UnsupportedModelError
from ...ops.schedule import BlockShape
from ...ops.select import gather_tokens
from ..base import TokenReducer
from ..types import ViTInfo
from .base import REDUCER_ATTR, ModelAdapter, block_reducer, register_adapter

TRANSFORMER_MODULE = "open_clip.transformer"
TOWER = "VisionTransformer"
BLOCKS = ("ResidualAttentionBlock", "CustomResidualAttentionBlock")
POOLER = "AttentionalPooler"
WHOLE_MODELS = ("CLIP", "CustomTextCLIP")  # in open_clip.model, with the tower as ``visual``
VIEW_ATTR = "_leanvit_view"
INDEX_ATTR = "_leanvit_index"
SIZES_ATTR = "_leanvit_sizes_from"  # on the tower and the token-reading poolers: the reducer whose sizes they read
POOLS = {"tok": "token", "avg": "avg", "none": ""}  # open_clip pool_type -> ViTInfo.global_pool (timm's names)


def _fail(model: nn.Module, why: str) -> None:
    raise UnsupportedModelError(
        f"leanvit cannot patch {type(model).__name__}: {why}. Supported from open_clip: the ViT image tower "
        f"(VisionTransformer with ResidualAttentionBlock, or CustomResidualAttentionBlock without scaled cosine "
        f"attention) and CLIP / CustomTextCLIP models built on one (their image tower is patched).")


def is_open_clip_model(model: nn.Module) -> bool:
    """Whether ``model``'s class (or one it derives from: a patched tower's) comes from ``open_clip``."""
    return any(c.__module__ == "open_clip" or c.__module__.startswith("open_clip.") for c in type(model).__mro__)


_REDUCING: dict[type, type] = {}  # original open_clip class -> its reducing subclass
_ORIGINAL: dict[type, type] = {}  # the reverse


def _open_clip_class(obj: Any) -> tuple[str, str]:
    """``(module, name)`` of the open_clip class ``obj`` is, or was before patching."""
    cls = type(obj)
    cls = _ORIGINAL.get(cls, cls)
    return cls.__module__, cls.__name__


def _is(obj: Any, name: str, module: str = TRANSFORMER_MODULE) -> bool:
    return _open_clip_class(obj) == (module, name)


# ----------------------------------------------------------------------------------------------- the attention view
def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _is_mha(attn: nn.Module) -> bool:
    return isinstance(attn, nn.MultiheadAttention)


class _InProj:
    """timm's fused ``qkv`` Linear from the attention's packed ``in_proj_weight`` ``(3 * C, C)`` (q, k, v rows) and
    ``in_proj_bias``: ``(B, N, 3 * C)``; ``weight`` and ``bias`` are read by the subset attention of idling."""

    def __init__(self, block: nn.Module):
        self.block = block

    @property
    def weight(self) -> torch.Tensor:
        return self.block.attn.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.block.attn.in_proj_bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _MHADropout:
    """``nn.MultiheadAttention``'s dropout on the attention probabilities (its ``dropout`` probability and its
    training flag), as timm's ``attn_drop`` (whose ``.p`` the fused attention reads)."""

    def __init__(self, block: nn.Module):
        self.block = block

    @property
    def p(self) -> float:
        return float(self.block.attn.dropout)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        attn = self.block.attn
        return F.dropout(t, self.p, attn.training) if self.p > 0 else t


class AttentionView:
    """One block's attention in timm's ``Attention`` layout, for :mod:`leanvit.reduce.attention`.

    ``nn.MultiheadAttention``: ``qkv`` is the packed input projection, ``proj`` its ``out_proj``, ``attn_drop`` its
    attention dropout; it has no q/k norm and no output dropout. open_clip's ``Attention``: the same projections,
    ``ln_q``/``ln_k`` as ``q_norm``/``k_norm``, ``attn_drop``, ``out_drop`` as ``proj_drop``, and ``norm`` (on the
    ``(B, N, H * Dh)`` attention output before the projection) the head scale, one scale per head's channels, then
    ``ln_inner``; None when it has neither, so the common path adds no op.
    """

    def __init__(self, block: nn.Module, seq_first: bool):
        self.block = block
        self.seq_first = seq_first  # the block receives and returns (N, B, C) (open_clip before batch_first)

    @property
    def _attn(self) -> nn.Module:
        return self.block.attn

    @property
    def num_heads(self) -> int:
        return int(self._attn.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self._attn.head_dim)

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5  # both attentions' scale (fused attention takes it by default)

    @property
    def qkv(self) -> _InProj:
        return _InProj(self.block)

    @property
    def q_norm(self) -> Callable[[torch.Tensor], torch.Tensor]:
        norm = getattr(self._attn, "ln_q", None)  # (B, H, N, Dh) -> same, on each head's Dh
        return _identity if norm is None else norm

    @property
    def k_norm(self) -> Callable[[torch.Tensor], torch.Tensor]:
        norm = getattr(self._attn, "ln_k", None)
        return _identity if norm is None else norm

    @property
    def norm(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        attn = self._attn
        if _is_mha(attn):
            return None
        head_scale = getattr(attn, "head_scale", None)  # (H, 1, 1)
        inner = getattr(attn, "ln_inner", None)
        inner = None if inner is None or isinstance(inner, nn.Identity) else inner
        if head_scale is None and inner is None:
            return None

        def norm(out: torch.Tensor) -> torch.Tensor:  # (B, N, H * Dh)
            if head_scale is not None:  # head h's channels h*Dh..(h+1)*Dh times head_scale[h]
                out = out * head_scale.reshape(-1).repeat_interleave(self.head_dim).to(out.dtype)
            return out if inner is None else inner(out)

        return norm

    @property
    def proj(self) -> nn.Module:
        return self._attn.out_proj

    @property
    def attn_drop(self) -> Any:
        attn = self._attn
        return _MHADropout(self.block) if _is_mha(attn) else attn.attn_drop

    @property
    def proj_drop(self) -> Callable[[torch.Tensor], torch.Tensor]:
        attn = self._attn
        return _identity if _is_mha(attn) else attn.out_drop

    @property
    def training(self) -> bool:
        return self._attn.training


# ----------------------------------------------------------------------------------------------- blocks
class _ReducingBlock:
    """The forward every patched block runs; mixed into a subclass of the block's own class. Never constructed:
    patching swaps the class of an existing block and sets ``_leanvit_reducer``, ``_leanvit_index`` and the view."""

    _leanvit_reducer: TokenReducer
    _leanvit_index: int

    def _post_attn(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """Run on ``(B, N, C)``; a sequence-first block (open_clip before ``batch_first``) gets and returns
        ``(N, B, C)``, transposed around the batch-first forward."""
        if self.__dict__[VIEW_ATTR].seq_first:
            return self._run(x.transpose(0, 1)).transpose(0, 1)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        red = block_reducer(self, x)
        i = self._leanvit_index
        view: AttentionView = self.__dict__[VIEW_ATTR]
        x = red.before_attn(i, x)
        a = red.attend(i, view, self.ln_1(x))
        if a.index is not None:  # the attention computed a subset: so does the rest of the block
            x = gather_tokens(x, a.index)
        # the custom block's ln_attn (not zero on a zero input) comes before the gate of idling's masked path
        y = self.ls_1(self._post_attn(a.x))
        x = x + (y if a.gate is None else y * a.gate)
        x = red.reduce(i, x, a)
        y = self.ls_2(self.mlp(self.ln_2(x)))
        x = x + (y if a.gate is None else y * a.gate)
        x = red.after_mlp(i, x)
        return red.end(x) if i == red.info.depth - 1 else x


def _refuse_mask(attn_mask: torch.Tensor | None) -> None:
    if attn_mask is not None:
        raise UnsupportedModelError("token reduction cannot be combined with an attention mask (open_clip's image "
                                    "tower passes none)")


class _ReducingResidualBlock(_ReducingBlock):
    """``ResidualAttentionBlock.forward(q_x, k_x=None, v_x=None, attn_mask=None)``: self-attention only."""

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise UnsupportedModelError("token reduction cannot be combined with cross-attention (k_x, v_x)")
        _refuse_mask(attn_mask)
        return self._layout(q_x)


class _ReducingCustomBlock(_ReducingBlock):
    """``CustomResidualAttentionBlock.forward(x, attn_mask=None)``, with ``ln_attn`` after the attention."""

    def _post_attn(self, y: torch.Tensor) -> torch.Tensor:
        return self.ln_attn(y)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        _refuse_mask(attn_mask)
        return self._layout(x)


# ----------------------------------------------------------------------------------------------- tower and pooler
def _sizes(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``(B, N)`` sizes of the tokens ``x`` ``(B, N, C)`` from this thread's forward (None: all ones, or the
    method tracks none)."""
    red = module.__dict__.get(SIZES_ATTR)
    if red is None:
        return None
    size = red.for_thread().current_sizes()
    if size is None or size.shape[1] != x.shape[1]:
        return None
    return size


class _ReducingTower:
    """The image tower: size-weighted average pooling, and the refusals that need the tower's state."""

    def _leanvit_check(self) -> None:
        red = self.__dict__.get(SIZES_ATTR)
        if red is None:
            return
        if getattr(self.transformer, "grad_checkpointing", False) and torch.is_grad_enabled():
            raise UnsupportedModelError("token reduction cannot be combined with gradient checkpointing (the "
                                        "recomputed forward would run the reducer twice); set_grad_checkpointing("
                                        "False) or run without gradients")
        if self.training and float(getattr(self.patch_dropout, "prob", 0.0)) > 0 and red.reducing:
            raise UnsupportedModelError("token reduction cannot be combined with patch_dropout in training: it drops "
                                        "random patches, so the token count is not the one the schedule was solved "
                                        "for (set model.visual.patch_dropout = nn.Identity(), or eval())")

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pool_type='avg'``: the image tokens' mean weighted by their sizes (open_clip: plain mean)."""
        if self.pool_type == "avg" and self.attn_pool is None:
            size = _sizes(self, x)
            if size is not None:
                tokens = x[:, 1:]  # (B, N - 1, C): the cls token is not pooled
                w = size[:, 1:, None].to(x.dtype)  # (B, N - 1, 1)
                return (tokens * w).sum(1) / w.sum(1), tokens
        return super()._global_pool(x)

    def forward(self, x: torch.Tensor) -> Any:
        self._leanvit_check()
        return super().forward(x)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._leanvit_check()
        bound = inspect.signature(super().forward_intermediates).bind(x, *args, **kwargs)
        bound.apply_defaults()
        red = self.__dict__.get(SIZES_ATTR)
        if red is None or not red.reducing or red.keeps_all_tokens:
            return super().forward_intermediates(x, *args, **kwargs)
        fmt = bound.arguments.get("output_fmt")
        if not red.restore:
            if fmt == "NCHW":
                raise UnsupportedModelError(
                    "a token-reduced ViT has fewer tokens than grid cells, so its intermediates cannot be reshaped "
                    "to NCHW; patch with restore=True to get the whole grid back, or call "
                    "forward_intermediates(..., output_fmt='NLC')")
            return super().forward_intermediates(x, *args, **kwargs)
        # restore=True: every intermediate on the whole grid (TokenReducer.restore_grid), then open_clip's format
        bound.arguments["output_fmt"] = "NLC"
        out = super().forward_intermediates(*bound.args, **bound.kwargs)
        from timm.models._features import feature_take_indices  # noqa: PLC0415  (open_clip uses timm's rule too)
        take, _ = feature_take_indices(len(self.transformer.resblocks), bound.arguments.get("indices"))
        norm = self.ln_post if bound.arguments.get("normalize_intermediates") else None
        mine, (H, W) = red.for_thread(), red.info.grid
        done = []
        for i, y in zip(sorted(take), out["image_intermediates"]):
            y = mine.restore_image(y, i, norm)  # (B, H*W, C)
            done.append(y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous() if fmt == "NCHW" else y)
        out["image_intermediates"] = done
        return out


class _ReducingPooler:
    """``AttentionalPooler`` on the tower's tokens: ``log(size)`` added to the logits of every key (the pooler
    attends to a token of size s as to s identical tokens); without sizes it is open_clip's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = _sizes(self, x)
        if size is None:
            return super().forward(x)
        B, N, _ = x.shape
        heads, Q = self.attn.num_heads, self.query.shape[0]
        # additive mask (B * H, Q, N), batch-major as nn.MultiheadAttention reads a 3-d mask
        bias = size.log().to(x.dtype)[:, None, None, :].expand(B, heads, Q, N).reshape(B * heads, Q, N)
        k = self.ln_k(x)  # (B, N, C)
        q = self.ln_q(self.query)  # (Q, D)
        if self.attn.batch_first:
            return self.attn(q.unsqueeze(0).expand(B, -1, -1), k, k, need_weights=False, attn_mask=bias)[0]
        k = k.transpose(0, 1)  # open_clip before batch_first: (N, B, C)
        out = self.attn(q.unsqueeze(1).expand(-1, B, -1), k, k, need_weights=False, attn_mask=bias)[0]
        return out.transpose(0, 1)  # (B, Q, D)


MIXINS: dict[str, type] = {"ResidualAttentionBlock": _ReducingResidualBlock,
                           "CustomResidualAttentionBlock": _ReducingCustomBlock,
                           TOWER: _ReducingTower, POOLER: _ReducingPooler}


def _reducing_name(original: type) -> str:
    return f"Reducing{original.__name__}"


def reducing_class(original: type) -> type:
    """The reducing subclass of an open_clip class, made once and published as an attribute of this module (so
    that pickle finds it by name)."""
    cls = _REDUCING.get(original)
    if cls is None:
        name = _reducing_name(original)
        cls = type(name, (MIXINS[original.__name__], original), {"__module__": __name__, "__qualname__": name})
        _REDUCING[original] = cls
        _ORIGINAL[cls] = original
        setattr(sys.modules[__name__], name, cls)
    return cls


def __getattr__(name: str) -> type:
    """Unpickling a patched model in a new process: make the reducing class it names (``Reducing<Class>``)."""
    if name.startswith("Reducing") and name[len("Reducing"):] in MIXINS:
        return reducing_class(getattr(importlib.import_module(TRANSFORMER_MODULE), name[len("Reducing"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _swap(module: nn.Module) -> None:
    module.__class__ = reducing_class(type(module))


def _restore(module: nn.Module) -> None:
    module.__class__ = _ORIGINAL.get(type(module), type(module))


# ----------------------------------------------------------------------------------------------- the adapter
def image_tower(model: nn.Module) -> nn.Module:
    """The ``VisionTransformer`` that patching ``model`` patches: the model itself or a CLIP model's ``visual``."""
    module, name = _open_clip_class(model)
    if (module, name) == (TRANSFORMER_MODULE, TOWER):  # exactly open_clip's class (or its reducing subclass)
        return model
    if type(model).__name__ == "TimmModel":
        _fail(model, "it wraps a timm model; patch its trunk (model.trunk, a timm VisionTransformer) directly")
    if module == "open_clip.model" and name in WHOLE_MODELS:
        visual = getattr(model, "visual", None)
        if visual is not None and _is(visual, TOWER):
            return visual
        vname = type(visual).__name__
        if vname == "TimmModel":
            _fail(model, "its image tower is a TimmModel; patch model.visual.trunk (a timm VisionTransformer) "
                         "directly")
        _fail(model, f"its image tower is a {vname}, not open_clip's {TOWER}")
    if name == "CoCa":
        _fail(model, "CoCa is not supported as a whole (its text decoder cross-attends to the image tokens)")
    if name in ("TextTransformer", "Transformer", "HFTextEncoder"):
        _fail(model, "it is not an image tower (patch the CLIP model or its .visual)")
    _fail(model, "this open_clip class is not one leanvit knows")


def _tower_blocks(model: nn.Module, tower: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        _fail(model, "its image tower has no transformer.resblocks (unknown open_clip version)")
    return blocks


def _check_block(model: nn.Module, i: int, blk: nn.Module) -> None:
    module, name = _open_clip_class(blk)
    if module != TRANSFORMER_MODULE or name not in BLOCKS:
        _fail(model, f"block {i} is a {type(blk).__name__}, not open_clip's ResidualAttentionBlock or "
                     f"CustomResidualAttentionBlock")
    attn = getattr(blk, "attn", None)
    for part in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"):
        if not hasattr(blk, part):
            _fail(model, f"block {i} has no '{part}' (unknown open_clip version)")
    if name == "ResidualAttentionBlock":
        if not _is_mha(attn):
            _fail(model, f"block {i} attention is a {type(attn).__name__}, not nn.MultiheadAttention")
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            _fail(model, f"block {i} attention has separate q/k/v projection weights")
        if attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
            _fail(model, f"block {i} attention has bias_k/bias_v or add_zero_attn")
        if hasattr(blk, "ln_1_kv"):
            _fail(model, f"block {i} is a cross-attention block")
    else:
        if type(attn).__name__ != "Attention" or not hasattr(attn, "in_proj_weight"):
            _fail(model, f"block {i} attention is a {type(attn).__name__}, not open_clip's Attention")
        if getattr(attn, "logit_scale", None) is not None:
            _fail(model, f"block {i} uses scaled cosine attention (scaled_cosine_attn), which leanvit's attention "
                         f"does not express")
        if not hasattr(blk, "ln_attn"):
            _fail(model, f"block {i} has no 'ln_attn' (unknown open_clip version)")
    if int(attn.num_heads) * int(attn.head_dim) != attn.in_proj_weight.shape[0] // 3:
        _fail(model, f"block {i} attention width is not heads x head_dim")


def _seq_first(tower: nn.Module, blk: nn.Module) -> bool:
    """Whether the block runs on ``(N, B, C)``: an ``nn.MultiheadAttention`` says so itself; open_clip's
    ``Attention`` is batch-first where the tower's transformer has ``batch_first`` (not in 2.24)."""
    if _is_mha(blk.attn):
        return not blk.attn.batch_first
    return not getattr(tower.transformer, "batch_first", False)


def _token_poolers(tower: nn.Module) -> list[nn.Module]:
    """The attentional poolers that read the tower's tokens (not the ``'cascade'`` form's second one, which reads
    the first one's outputs)."""
    pools = []
    if getattr(tower, "attn_pool", None) is not None:
        pools.append(tower.attn_pool)
        second = getattr(tower, "attn_pool_contrastive", None)
        if second is not None and getattr(tower, "attn_pool_type", "") == "parallel":
            pools.append(second)
    return pools


def inspect_open_clip(model: nn.Module) -> ViTInfo:
    """Check that ``model`` is an open_clip image tower (or a CLIP model with one) leanvit can patch; describe it."""
    tower = image_tower(model)
    blocks = _tower_blocks(model, tower)
    for name in ("conv1", "class_embedding", "grid_size", "image_size", "patch_dropout", "pool_type", "attn_pool"):
        if not hasattr(tower, name):
            _fail(model, f"its image tower has no '{name}' (unknown open_clip version)")
    if tower.class_embedding is None:
        _fail(model, "its image tower has no class token (unknown open_clip version)")
    shapes = []
    for i, blk in enumerate(blocks):
        _check_block(model, i, blk)
        attn = blk.attn
        linears = [m for m in blk.mlp.modules() if isinstance(m, nn.Linear)]
        if not linears:
            _fail(model, f"block {i} MLP has no Linear layers")
        shapes.append(BlockShape(attn.in_proj_weight.shape[1], int(attn.num_heads) * int(attn.head_dim),
                                 sum(m.in_features * m.out_features for m in linears)))
    for pooler in (getattr(tower, "attn_pool", None), getattr(tower, "attn_pool_contrastive", None)):
        if pooler is not None and not _is(pooler, POOLER):
            _fail(model, f"its attentional pooler is a {type(pooler).__name__}, not open_clip's {POOLER}")
    if tower.attn_pool is not None and getattr(tower, "attn_pool_type", "") not in ("", "parallel", "cascade"):
        _fail(model, f"its attentional pooling '{tower.attn_pool_type}' is not one leanvit knows")
    grid = (int(tower.grid_size[0]), int(tower.grid_size[1]))
    pool = "map" if tower.attn_pool is not None else POOLS.get(str(tower.pool_type))
    if pool is None:
        _fail(model, f"its pool_type '{tower.pool_type}' is not one leanvit knows")
    return ViTInfo(depth=len(blocks), dim=int(tower.conv1.out_channels), num_prefix=1, has_cls=True, grid=grid,
                   num_image=grid[0] * grid[1], global_pool=pool, blocks=tuple(shapes))


def open_clip_input_size(model: nn.Module) -> tuple[int, int, int]:
    tower = image_tower(model)
    h, w = (tower.image_size, tower.image_size) if isinstance(tower.image_size, int) else tower.image_size
    return int(tower.conv1.in_channels), int(h), int(w)


@register_adapter
class OpenCLIPAdapter(ModelAdapter):
    """open_clip's ViT image tower and the CLIP models built on one (the ``clip`` extra)."""

    describes = ("open_clip VisionTransformer image towers, CLIP and CustomTextCLIP models (their image tower; "
                 "ResidualAttentionBlock or CustomResidualAttentionBlock without scaled cosine attention)")

    def claims(self, model: nn.Module) -> bool:
        # every open_clip model: the ones leanvit does not know are refused by inspect() with a clear reason
        return is_open_clip_model(model)

    def inspect(self, model: nn.Module) -> ViTInfo:
        return inspect_open_clip(model)

    def apply(self, model: nn.Module, reducer: TokenReducer) -> None:
        reducer = reducer.shared()
        inspect_open_clip(model)
        tower = image_tower(model)
        blocks = _tower_blocks(model, tower)
        if any(type(b) in _ORIGINAL for b in blocks):
            _fail(model, "its image tower is already patched through another model object (a CLIP model and its "
                         "visual tower): unpatch that one first")
        model.__dict__[REDUCER_ATTR] = reducer
        _swap(tower)
        tower.__dict__[SIZES_ATTR] = reducer
        for pooler in _token_poolers(tower):
            _swap(pooler)
            pooler.__dict__[SIZES_ATTR] = reducer
        for i, blk in enumerate(blocks):
            seq_first = _seq_first(tower, blk)
            _swap(blk)
            blk.__dict__[REDUCER_ATTR] = reducer
            blk.__dict__[INDEX_ATTR] = i
            blk.__dict__[VIEW_ATTR] = AttentionView(blk, seq_first)

    def remove(self, model: nn.Module) -> None:
        tower = image_tower(model)
        for blk in _tower_blocks(model, tower):
            _restore(blk)
            for key in (REDUCER_ATTR, INDEX_ATTR, VIEW_ATTR):
                blk.__dict__.pop(key, None)
        for pooler in (getattr(tower, "attn_pool", None), getattr(tower, "attn_pool_contrastive", None)):
            if pooler is not None:
                _restore(pooler)
                pooler.__dict__.pop(SIZES_ATTR, None)
        _restore(tower)
        tower.__dict__.pop(SIZES_ATTR, None)
        del model.__dict__[REDUCER_ATTR]

    def _patch_budget(self, model: nn.Module, cls: type[TokenReducer], info: ViTInfo, budget: float, measure: bool,
                      options: dict[str, Any], report: dict[str, Any]) -> nn.Module:
        """Solve and measure on the image tower (a CLIP model's MACs are its tower's; the reducer is then attached
        to the whole model), with ``nn.MultiheadAttention``'s fast path off: in eval mode without gradients (how
        MACs are counted) the unpatched blocks run it as one fused op that torch's counter has no formula for, so
        the dense tower would count no attention MACs at all; its reference path counts the same MACs as the
        patched blocks do at a zero schedule."""
        tower = image_tower(model)
        try:  # torch 2.3+; before it the dense tower's attention goes uncounted, too small a reference
            mha = importlib.import_module("torch.backends.mha")
        except ImportError:  # pragma: no cover - torch < 2.3
            mha = None
        fastpath = mha.get_fastpath_enabled() if mha is not None else None
        if mha is not None:
            mha.set_fastpath_enabled(False)
        try:
            super()._patch_budget(tower, cls, info, budget, measure, options, report)
        finally:
            if mha is not None:
                mha.set_fastpath_enabled(fastpath)
        if tower is not model:
            model.__dict__[REDUCER_ATTR] = tower.__dict__.pop(REDUCER_ATTR)
        return model

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return open_clip_input_size(model)  # count_macs' default reads timm's pretrained config
