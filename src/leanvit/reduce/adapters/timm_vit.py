"""timm's ``VisionTransformer`` family (DeiT, ViT/AugReg, registers, LayerScale, q/k norm, distilled DeiT): the one
place that touches timm's ViT internals.

Patching swaps the class of each block for a reducing subclass registered with :func:`register_block` (module-level
classes, so patched models still pickle, keep their state-dict keys and can be restored exactly), and, for
average-pooling models, the model's class for one that pools with token sizes. The block's forward reuses the
block's own sub-modules (norms, LayerScale, drop-path, MLP) and re-implements only the attention call
(:mod:`leanvit.reduce.attention`), to expose the attention map, keys and a size bias; that is the part that depends
on timm's ``Attention`` layout, checked here before anything is patched. Anything not recognised (post-norm blocks,
parallel blocks, RoPE attention, another model family) raises :class:`~leanvit.errors.UnsupportedModelError`
instead of running a silently different forward.
"""
from __future__ import annotations

from copy import deepcopy
from inspect import signature
from typing import Any

import torch
from torch import nn
from timm.layers import Attention as TimmAttention, register_notrace_module
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block as TimmBlock, VisionTransformer

from ...errors import UnsupportedModelError
from ...ops.schedule import BlockShape
from ...ops.select import gather_tokens
from ..base import TokenReducer
from ..types import ViTInfo
from .base import REDUCER_ATTR, ModelAdapter, block_reducer, find_adapter, is_patched, register_adapter

try:  # DeiT's distilled ViT (cls + dist token) is a VisionTransformer subclass with its own head
    from timm.models.deit import VisionTransformerDistilled
except ImportError:  # pragma: no cover - very old timm
    VisionTransformerDistilled = None

def _fail(model: nn.Module, why: str) -> None:
    raise UnsupportedModelError(
        f"leanvit cannot patch {type(model).__name__}: {why}. Supported: timm VisionTransformer models with "
        f"pre-norm Blocks and standard Attention (DeiT, ViT/AugReg, registers, LayerScale, q/k norm).")


# the blocks leanvit can patch -> the classes they are swapped for (an adapter for a block type registers here)
BLOCK_CLASSES: dict[type, type] = {}


def register_block(original: type, reducing: type) -> None:
    """Let timm ViTs whose blocks are ``original`` be patched by swapping each block's class for ``reducing``.

    The reducing block is a leaf of timm's torch.fx tracer (``register_notrace_module``): its forward runs the
    reducer, Python that decides per forward (thread, schedule, selection), which symbolic tracing cannot follow;
    as a leaf it is called as it is by the traced graph, so timm's fx feature extraction works on patched models.
    """
    BLOCK_CLASSES[original] = reducing
    register_notrace_module(reducing)


def inspect_vit(model: nn.Module) -> ViTInfo:
    """Check that ``model`` is a ViT leanvit can patch and describe it; raise UnsupportedModelError if not."""
    if not isinstance(model, VisionTransformer):
        _fail(model, "it is not a timm VisionTransformer")
    if not isinstance(model.blocks, nn.Sequential) or len(model.blocks) == 0:
        _fail(model, "model.blocks is not a non-empty nn.Sequential")
    shapes = []
    for i, blk in enumerate(model.blocks):
        reducing = BLOCK_CLASSES.get(type(blk), type(blk))
        if reducing not in BLOCK_CLASSES.values():
            _fail(model, f"block {i} is a {type(blk).__name__}, not timm's pre-norm Block")
        attn = blk.attn
        if type(attn) is not TimmAttention:
            _fail(model, f"block {i} uses {type(attn).__name__}, not timm's Attention")
        for name in ("qkv", "q_norm", "k_norm", "proj", "num_heads", "scale"):
            if not hasattr(attn, name):
                _fail(model, f"block {i} attention has no '{name}' (unknown timm version)")
        head_dim = getattr(attn, "head_dim", attn.qkv.out_features // 3 // attn.num_heads)
        linears = [m for mlp in reducing.mlp_modules(blk) for m in mlp.modules() if isinstance(m, nn.Linear)]
        if not linears:
            _fail(model, f"block {i} MLP has no Linear layers")
        # attention's MACs follow the channels qkv reads: all of them, or a channel-shuffle block's attended group
        shapes.append(BlockShape(attn.qkv.in_features, attn.num_heads * head_dim,
                                 sum(m.in_features * m.out_features for m in linears)))
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    num_prefix = int(model.num_prefix_tokens)
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    return ViTInfo(
        depth=len(model.blocks), dim=int(model.embed_dim), num_prefix=num_prefix, has_cls=has_cls, grid=grid,
        num_image=grid[0] * grid[1], global_pool=str(model.global_pool), blocks=tuple(shapes))


class _Reducing:
    """What every patched block does around its own layout: start the reducer at block 0, and run the attention
    with what the reducer asks for.

    Never constructed: patching swaps the class of an existing block and sets ``_leanvit_reducer`` and
    ``_leanvit_index``.
    """

    _leanvit_reducer: TokenReducer
    _leanvit_index: int

    def __prepare_scriptable__(self) -> nn.Module:
        return not_scriptable(self)

    @staticmethod
    def mlp_modules(block: nn.Module) -> list[nn.Module]:
        """The block's MLPs, whose Linear layers the MACs model counts."""
        return [block.mlp]

    @staticmethod
    def refuses(reducer: TokenReducer) -> str | None:
        """Why this kind of block cannot run ``reducer`` (None: it can)."""
        return None

    def _begin(self, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> TokenReducer:
        if attn_mask is not None or is_causal:
            raise UnsupportedModelError("token reduction cannot be combined with attention masks")
        return block_reducer(self, x)

    def _finish(self, red: TokenReducer, x: torch.Tensor) -> torch.Tensor:
        i = self._leanvit_index
        x = red.after_mlp(i, x)
        return red.end(x) if i == red.info.depth - 1 else x


class ReducingBlock(_Reducing, TimmBlock):
    """timm ``Block`` whose forward lets a :class:`TokenReducer` act between attention and MLP."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                **kwargs: Any) -> torch.Tensor:
        red = self._begin(x, attn_mask, is_causal)
        i = self._leanvit_index
        x = red.before_attn(i, x)
        a = red.attend(i, self.attn, self.norm1(x))
        if a.index is not None:  # the attention computed a subset: so does the rest of the block
            x = gather_tokens(x, a.index)
        x = x + self.drop_path1(self.ls1(a.x))
        x = red.reduce(i, x, a)
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = x + (y if a.gate is None else y * a.gate)
        return self._finish(red, x)


register_block(TimmBlock, ReducingBlock)


def _symbolic_tracing() -> bool:
    """Whether torch.fx symbolic tracing runs (not torch.export, which traces real sizes)."""
    fx = torch.fx._symbolic_trace
    check = getattr(fx, "is_fx_symbolic_tracing", None)  # torch 2.14 has it; older ones only the flag below
    return check() if check is not None else fx.is_fx_tracing()


def refuse_fx_sizes(red: TokenReducer) -> bool:
    """Under torch.fx symbolic tracing (True: it runs), refuse a pooling that reads token sizes, which exist only
    at run time; the traced graph would bake in the unweighted pooling."""
    if not _symbolic_tracing():
        return False
    if red.tracks_sizes and not red.restore:
        raise UnsupportedModelError(
            f"torch.fx cannot trace the size-weighted pooling of a ViT reduced by '{red.name}' (the token sizes "
            f"exist only at run time); trace it with torch.export or torch.compile, or patch with restore=True "
            f"(pooled over the whole grid)")
    return True


def _weighted_pool(model: VisionTransformer, x: torch.Tensor, pool_type: str | None) -> torch.Tensor | None:
    """Size-weighted pooling over the tokens when the reducer tracked token sizes (ToMe, GTP): the average, or the
    attention pool's latent query with proportional attention (a token of size s counts as s identical tokens)."""
    pool_type = model.global_pool if pool_type is None else pool_type
    red = model.__dict__.get(REDUCER_ATTR)
    attn_pool = model.attn_pool is not None and getattr(model.attn_pool, "pos_embed", None) is None
    if red is None or not (attn_pool or (model.attn_pool is None and pool_type in ("avg", "avgmax"))):
        return None
    if refuse_fx_sizes(red):
        return None
    size = red.for_thread().current_sizes()  # the sizes this thread's forward left
    if size is None or size.shape[1] != x.shape[1]:
        return None
    p = 0 if model.pool_include_prefix else model.num_prefix_tokens
    if attn_pool:  # the latent query's attention, proportional: + log(size_j) on its logits
        return model.attn_pool(x[:, p:], attn_mask=size[:, None, None, p:].log().to(x.dtype))
    xs, w = x[:, p:], size[:, p:, None].to(x.dtype)
    mean = (xs * w).sum(1) / w.sum(1)
    return mean if pool_type == "avg" else 0.5 * (xs.amax(dim=1) + mean)


def not_scriptable(module: nn.Module) -> nn.Module:
    """``torch.jit.script`` of a patched model: its dense equivalent when it removes nothing (the same output,
    leanvit's equivalence tests), else one clear error: the reducers are Python that TorchScript cannot compile."""
    owner = module.__dict__.get(REDUCER_ATTR)
    if owner is not None and not owner.reducing and is_patched(module):
        dense = deepcopy(module)
        find_adapter(dense).remove(dense)
        return dense
    raise UnsupportedModelError(
        "TorchScript cannot compile a token-reduced model (its reducer is Python code TorchScript does not support); "
        "use torch.export, torch.compile or `leanvit export` (ONNX), or script the unpatched model")


class _ReducedMixin:
    """Behaviour shared by patched model classes."""

    def __prepare_scriptable__(self) -> nn.Module:
        return not_scriptable(self)

    def forward_intermediates(self, *args: Any, **kwargs: Any):
        """timm's ``forward_intermediates``; with a patch made with ``restore=True``, every intermediate is given
        back on the whole grid (:meth:`TokenReducer.restore_grid`), so ``output_fmt='NCHW'`` works as on the dense
        model. Without ``restore``, NCHW is refused once tokens are removed (NLC gives the tokens as they are)."""
        red = self.__dict__.get(REDUCER_ATTR)
        if red is None or not red.reducing or red.keeps_all_tokens:
            return super().forward_intermediates(*args, **kwargs)
        bound = signature(super().forward_intermediates).bind(*args, **kwargs)
        fmt = bound.arguments.get("output_fmt", "NCHW")
        if not red.restore:
            if fmt == "NCHW":
                raise UnsupportedModelError(
                    "a token-reduced ViT has fewer tokens than grid cells, so its intermediates cannot be reshaped "
                    "to NCHW; patch with restore=True to get the whole grid back, or call "
                    "forward_intermediates(..., output_fmt='NLC')")
            return super().forward_intermediates(*args, **kwargs)
        bound.arguments["output_fmt"] = "NLC"
        out = super().forward_intermediates(*bound.args, **bound.kwargs)
        take, _ = feature_take_indices(len(self.blocks), bound.arguments.get("indices"))
        norm = self.norm if bound.arguments.get("norm", False) else None
        mine = red.for_thread()  # this thread's forward, which just ran
        H, W = red.info.grid

        def restore(feats: list[Any]) -> list[Any]:
            done = []
            for i, y in zip(sorted(take), feats):
                prefix = None
                if isinstance(y, tuple):  # (image tokens, prefix tokens) with return_prefix_tokens
                    y, prefix = y
                y = mine.restore_image(y, i, norm)  # (B, H*W, C)
                if fmt == "NCHW":
                    y = y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous()
                done.append(y if prefix is None else (y, prefix))
            return done

        if isinstance(out, dict):
            out["image_intermediates"] = restore(out["image_intermediates"])
            return out
        if isinstance(out, tuple):
            return out[0], restore(out[1])
        return restore(out)


class ReducedVisionTransformer(_ReducedMixin, VisionTransformer):
    """VisionTransformer whose average pooling weights tokens by their size (how many patches they stand for)."""

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        out = _weighted_pool(self, x, pool_type)
        return super().pool(x, pool_type) if out is None else out


MODEL_CLASSES: dict[type, type] = {VisionTransformer: ReducedVisionTransformer}
if VisionTransformerDistilled is not None:
    class ReducedVisionTransformerDistilled(_ReducedMixin, VisionTransformerDistilled):
        """Distilled DeiT: its head reads the cls and dist tokens, so only the blocks change."""

    MODEL_CLASSES[VisionTransformerDistilled] = ReducedVisionTransformerDistilled



@register_adapter
class TimmViTAdapter(ModelAdapter):
    """timm ``VisionTransformer`` and subclasses whose blocks are registered (:func:`register_block`)."""

    describes = ("timm VisionTransformer models with pre-norm Blocks and standard Attention (DeiT, ViT/AugReg, "
                 "registers, LayerScale, q/k norm)")

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def inspect(self, model: nn.Module) -> ViTInfo:
        return inspect_vit(model)

    def apply(self, model: nn.Module, reducer: TokenReducer) -> None:
        """Swap block (and model) classes and attach ``reducer``; :meth:`remove` undoes it exactly."""
        reducer = reducer.shared()  # patch() may hand back the calling thread's copy (get_reducer) on a failure
        orig_model_cls = type(model)
        if orig_model_cls not in MODEL_CLASSES and orig_model_cls not in MODEL_CLASSES.values():
            if model.global_pool in ("avg", "avgmax"):
                _fail(model, "average pooling on a VisionTransformer subclass leanvit does not know")
        for blk in model.blocks:
            why = BLOCK_CLASSES.get(type(blk), type(blk)).refuses(reducer)
            if why:
                raise UnsupportedModelError(why)
        model.__dict__[REDUCER_ATTR] = reducer
        model.__dict__["_leanvit_orig_class"] = orig_model_cls
        model.__class__ = MODEL_CLASSES.get(orig_model_cls, orig_model_cls)
        for i, blk in enumerate(model.blocks):
            blk.__class__ = BLOCK_CLASSES.get(type(blk), type(blk))
            blk.__dict__[REDUCER_ATTR] = reducer
            blk.__dict__["_leanvit_index"] = i

    def remove(self, model: nn.Module) -> None:
        original = {reducing: block for block, reducing in BLOCK_CLASSES.items()}
        for blk in model.blocks:
            blk.__class__ = original.get(type(blk), type(blk))
            blk.__dict__.pop(REDUCER_ATTR, None)
            blk.__dict__.pop("_leanvit_index", None)
        model.__class__ = model.__dict__.pop("_leanvit_orig_class")
        del model.__dict__[REDUCER_ATTR]
