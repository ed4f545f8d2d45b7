"""Channel-shuffle blocks for tiny ViTs: a wide residual stream of which attention sees only one group of channels.

The block widens a ViT's channels to ``dim`` = C, splits them into an Attended group of ``attn_dim`` = a channels
(self-attention runs on it only) and an Idle group of C - a channels (no attention), and shuffles the channels
ShuffleNetV2-style (Ma et al., 2018: view as ``groups`` x C/groups, transpose, flatten) so that the groups trade
information from block to block. A model built from it is a timm ``VisionTransformer``
(``VisionTransformer(block_fn=partial(ChannelShuffleBlock, attn_dim=...))``), so ``forward_features``,
``forward_head``, ``forward_intermediates``, pretrained configs and state-dict keys (``blocks.N.attn.qkv.weight``,
``blocks.N.mlp.fc1.weight``, ...) are timm's. No public code exists for the method; every choice below is ours and
configurable for the ablation in ``benchmarks/ablate_shuffle.py``.

Defaults and why:

* ``attn_dim = dim // 2`` (expansion 2 over the attended width): with the attended width equal to the vanilla
  model's width, attention (qkv, proj, q @ k^T, attn @ v) costs exactly what it did, and a 2-group shuffle
  interleaves one attended and one idle channel, as in ShuffleNetV2's half split.
* ``mlp_mode="grouped"`` with ``idle_mlp_ratio=0``: the attended group runs a vanilla block (attention + MLP), the
  idle group is carried unchanged (ShuffleNetV2's identity branch). Then only the stem and the head pay for the
  wider stream: +0.029 GMACs on DeiT-Tiny at expansion 2, the "under 0.03 GMACs change" that the paper reports.
  ``shared`` (one MLP over all C channels) mixes the groups without any shuffle, but costs (C/a)^2 times the
  MLP of the attended group; ``grouped`` with ``idle_mlp_ratio > 0`` gives the idle group its own MLP.
* ``shuffle="mlp"``: one shuffle per block, after the MLP, so a block is a vanilla transformer block on the attended
  group followed by the shuffle (ShuffleNetV2's unit with the block as its branch); ``attn`` shuffles between
  attention and MLP, ``both`` does both, ``none`` is the control without exchange. With a shared MLP the position
  only re-labels channels (a shared MLP is equivariant to channel permutations up to its weights).
* ``alternate=False``: with the shuffle, every block already attends a new mix of channels; alternating the
  attended span between the first and the last ``attn_dim`` channels is the shuffle-free alternative, ablated.
* ``shuffle_groups = dim // gcd(dim, attn_dim)``: the finest interleave in which every group lies inside the
  attended or the idle span, so each block's attended channels come from both groups in proportion to their widths.

At inference the shuffles cost (almost) nothing: :func:`fold_shuffle` folds the fixed permutations into the weights
(norm affine parameters, the first linear layer's columns and the last one's rows of every branch) and the indices
that each branch reads, so the stream is never permuted; one gather after the last block restores timm's channel
order for ``forward_features`` and the head.
"""
from __future__ import annotations

from math import gcd
from typing import Literal

import torch
from torch import nn
from timm.layers import Attention, DropPath, LayerNorm, LayerScale, Mlp

from ..errors import ConfigError

__all__ = ["ChannelSelect", "ChannelShuffleBlock", "channel_shuffle", "fold_shuffle", "is_folded", "shuffle_index"]

ShufflePosition = Literal["attn", "mlp", "both", "none"]
MlpMode = Literal["shared", "grouped"]
SHUFFLE_POSITIONS: tuple[str, ...] = ("attn", "mlp", "both", "none")
MLP_MODES: tuple[str, ...] = ("shared", "grouped")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNetV2's channel shuffle of the last dimension: ``(..., g * k)`` viewed as ``(g, k)``, transposed.

    Output channel ``j`` is input channel ``(j % g) * k + j // g``: the groups interleave.
    """
    return x.unflatten(-1, (groups, x.shape[-1] // groups)).transpose(-1, -2).flatten(-2)  # (..., C)


def shuffle_index(dim: int, groups: int) -> torch.Tensor:
    """The gather index of :func:`channel_shuffle`: ``x[..., shuffle_index(C, g)] == channel_shuffle(x, g)``."""
    if groups < 1 or dim % groups:
        raise ConfigError(f"shuffle groups must divide the width: {dim} channels cannot form {groups} groups")
    j = torch.arange(dim)
    return (j % groups) * (dim // groups) + j // groups  # (C,)


class ChannelSelect(nn.Module):
    """The channels of the residual stream that one branch of a block reads and adds its output to.

    A contiguous span ``[start, stop)`` (sliced), or after folding any sorted set of channels (gathered with
    ``index_select`` and written back with ``index_add``); a folded set that happens to be contiguous stays a span.
    The index is a non-persistent buffer: it moves with the model and stays out of the state dict.
    """

    index: torch.Tensor | None

    def __init__(self, dim: int, start: int, stop: int):
        super().__init__()
        self.dim, self.start, self.stop = dim, start, stop
        self.register_buffer("index", None, persistent=False)

    @property
    def width(self) -> int:
        return self.stop - self.start if self.index is None else int(self.index.numel())

    def channels(self) -> torch.Tensor:
        """The selected channels, ascending."""
        return torch.arange(self.start, self.stop) if self.index is None else self.index.cpu()

    def set_channels(self, channels: torch.Tensor) -> None:
        """Select ``channels`` (ascending, unique, on the model's device): a span when contiguous, else an index."""
        lo, n = int(channels[0]), int(channels.numel())
        if torch.equal(channels.cpu(), torch.arange(lo, lo + n)):
            self.start, self.stop, self.index = lo, lo + n, None
        else:
            self.index = channels.long()

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, dim)`` -> ``(B, N, width)``, the selected channels."""
        if self.index is not None:
            return x.index_select(-1, self.index)
        return x if self.stop - self.start == self.dim else x[..., self.start:self.stop]

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, dim) with ``y`` (B, N, width) added to the selected channels (out of place)."""
        if self.index is not None:
            return x.index_add(-1, self.index, y)
        if self.stop - self.start == self.dim:
            return x + y
        return torch.cat([x[..., :self.start], x[..., self.start:self.stop] + y, x[..., self.stop:]], dim=-1)

    def extra_repr(self) -> str:
        return f"{self.width} of {self.dim}" + (", gathered" if self.index is not None else
                                                f", [{self.start}:{self.stop})")


class ChannelShuffleBlock(nn.Module):
    """Pre-norm transformer block on a widened stream: attention on the Attended group only, then channel shuffle.

    Layout for a stream ``x`` of ``dim`` = C channels, attended span ``[s, s + a)`` (``s = 0``, or ``C - a`` on odd
    blocks with ``alternate``)::

        x[s:s+a] += ls1(attn(norm1(x[s:s+a])))            # attention on the attended group only
        x = shuffle(x)                                    # shuffle in ("attn", "both")
        shared:  x += ls2(mlp(norm2(x)))                  # one MLP over all C channels
        grouped: x[s:s+a] += ls2(mlp(norm2(x[s:s+a])))    # the attended group's MLP ...
                 x[idle] += ls2_idle(mlp_idle(norm2_idle(x[idle])))   # ... and the idle group's (if its ratio > 0)
        x = shuffle(x)                                    # shuffle in ("mlp", "both")

    The constructor takes every argument timm's ``VisionTransformer`` passes to ``block_fn`` (``dim`` is the total
    width, ``depth`` the block's index); the shuffle options come through ``functools.partial``. Token-reduction
    patches call the three steps of the forward (:meth:`attn_input`, :meth:`attn_residual`, :meth:`mlp_residual`)
    with the reduction between attention and MLP (see ``leanvit.reduce.compat``).

    Args:
        dim: total width C of the residual stream.
        num_heads: attention heads (on the attended group).
        mlp_ratio: hidden width of the MLP over its input width: the attended group's MLP (``grouped``) or the
            one over all C channels (``shared``).
        attn_dim: attended width a (default ``dim // 2``); the attention's cost is that of a ViT of width a.
        shuffle: where the channel shuffle sits: ``"attn"`` (after attention), ``"mlp"`` (after the MLP),
            ``"both"`` or ``"none"``.
        mlp_mode: ``"shared"`` (one MLP over all channels) or ``"grouped"`` (one MLP per group).
        idle_mlp_ratio: hidden ratio of the idle group's MLP (``grouped`` only; 0 = the idle group is carried
            unchanged).
        alternate: odd blocks attend the last ``attn_dim`` channels instead of the first.
        shuffle_groups: groups of the shuffle (default ``dim // gcd(dim, attn_dim)``).
        others: as timm's ``Block``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        attn_layer: type[nn.Module] = Attention,
        depth: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        attn_dim: int | None = None,
        shuffle: ShufflePosition = "mlp",
        mlp_mode: MlpMode = "grouped",
        idle_mlp_ratio: float = 0.0,
        alternate: bool = False,
        shuffle_groups: int | None = None,
    ) -> None:
        super().__init__()
        a = dim // 2 if attn_dim is None else int(attn_dim)
        if not 0 < a < dim:
            raise ConfigError(f"the attended width must be between 0 and the width {dim} (exclusive), got {a}")
        if shuffle not in SHUFFLE_POSITIONS:
            raise ConfigError(f"shuffle must be one of {', '.join(SHUFFLE_POSITIONS)}, got '{shuffle}'")
        if mlp_mode not in MLP_MODES:
            raise ConfigError(f"mlp_mode must be one of {', '.join(MLP_MODES)}, got '{mlp_mode}'")
        if idle_mlp_ratio < 0 or (idle_mlp_ratio > 0 and mlp_mode == "shared"):
            raise ConfigError(f"idle_mlp_ratio must be >= 0 and needs mlp_mode='grouped', got {idle_mlp_ratio} "
                              f"with mlp_mode='{mlp_mode}'")
        dd = {"device": device, "dtype": dtype}
        groups = dim // gcd(dim, a) if shuffle_groups is None else int(shuffle_groups)
        self.dim, self.attn_dim, self.groups = dim, a, groups
        self.shuffle, self.mlp_mode, self.alternate = shuffle, mlp_mode, alternate
        self.folded = False
        start = dim - a if alternate and depth % 2 else 0
        idle = (0, start) if start else (a, dim)

        self.attn_channels = ChannelSelect(dim, start, start + a)
        self.norm1 = norm_layer(a, **dd)
        self.attn = attn_layer(a, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm,
                               proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer,
                               **dd)
        self.ls1 = LayerScale(a, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        def mlp(width: int, ratio: float) -> nn.Module:
            return mlp_layer(in_features=width, hidden_features=int(width * ratio), act_layer=act_layer,
                             norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias, drop=proj_drop, **dd)

        w = dim if mlp_mode == "shared" else a
        self.mlp_channels = ChannelSelect(dim, 0, dim) if mlp_mode == "shared" else ChannelSelect(dim, start, start + a)
        self.norm2 = norm_layer(w, **dd)
        self.mlp = mlp(w, mlp_ratio)
        self.ls2 = LayerScale(w, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if idle_mlp_ratio > 0:
            self.idle_channels = ChannelSelect(dim, *idle)
            self.norm2_idle = norm_layer(dim - a, **dd)
            self.mlp_idle = mlp(dim - a, idle_mlp_ratio)
            self.ls2_idle = LayerScale(dim - a, init_values=init_values, **dd) if init_values else nn.Identity()
        else:
            self.idle_channels = self.norm2_idle = self.mlp_idle = self.ls2_idle = None
        self.register_buffer("shuffle_index", shuffle_index(dim, groups), persistent=False)
        # set by fold_shuffle on the last block: the gather that restores timm's channel order, or None
        self.register_buffer("restore_index", None, persistent=False)

    # --------------------------------------------------------------- the three steps of the forward
    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` -> the normalised attended group ``(B, N, a)``, the attention's input."""
        return self.norm1(self.attn_channels.read(x))

    def attn_residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The stream ``(B, N, C)`` after adding the attention output ``out`` (B, N, a) and the post-attention
        shuffle."""
        x = self.attn_channels.add(x, self.drop_path1(self.ls1(out)))
        return self._shuffle(x, ("attn", "both"))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The stream ``(B, N, C)`` after the MLP branch(es) and the post-MLP shuffle."""
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(self.mlp_channels.read(x)))))  # (B, N, a or C)
        out = self.mlp_channels.add(x, y)
        if self.mlp_idle is not None:
            y_idle = self.drop_path2(self.ls2_idle(self.mlp_idle(self.norm2_idle(self.idle_channels.read(x)))))
            out = self.idle_channels.add(out, y_idle)  # (B, N, C)
        out = self._shuffle(out, ("mlp", "both"))
        return out if self.restore_index is None else out.index_select(-1, self.restore_index)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        out = self.attn(self.attn_input(x), attn_mask=attn_mask, is_causal=is_causal)  # (B, N, a)
        return self.mlp_residual(self.attn_residual(x, out))

    def _shuffle(self, x: torch.Tensor, positions: tuple[str, ...]) -> torch.Tensor:
        if self.folded or self.shuffle not in positions:
            return x
        return channel_shuffle(x, self.groups)

    # --------------------------------------------------------------- folding
    @torch.no_grad()
    def fold(self, perm: torch.Tensor) -> torch.Tensor:
        """Fold this block's shuffles into its weights; returns the stream layout after the block.

        Args:
            perm: ``(C,)``, channel c of the unfolded stream entering the block sits at ``perm[c]`` of the folded one.
        """
        if self.folded:
            raise ConfigError("this block's shuffles are folded already")
        _fold_branch(self.attn_channels, perm, self.norm1, self.attn.qkv, self.attn.proj, self.ls1)
        if self.shuffle in ("attn", "both"):
            perm = perm[self.shuffle_index.cpu()]
        _fold_branch(self.mlp_channels, perm, self.norm2, self.mlp.fc1, self.mlp.fc2, self.ls2)
        if self.mlp_idle is not None:
            _fold_branch(self.idle_channels, perm, self.norm2_idle, self.mlp_idle.fc1, self.mlp_idle.fc2,
                         self.ls2_idle)
        if self.shuffle in ("mlp", "both"):
            perm = perm[self.shuffle_index.cpu()]
        self.folded = True
        return perm

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, attn_dim={self.attn_dim}, shuffle={self.shuffle}, groups={self.groups}, "
                f"mlp_mode={self.mlp_mode}, alternate={self.alternate}, folded={self.folded}")


def _fold_branch(sel: ChannelSelect, perm: torch.Tensor, norm: nn.Module, first: nn.Linear, last: nn.Linear,
                 ls: nn.Module) -> None:
    """Re-point one branch at the folded stream: it reads its channels where they now sit, in ascending order, and
    its per-channel weights are permuted to match, so that it computes exactly what it did before."""
    if not isinstance(norm, nn.LayerNorm) or not isinstance(first, nn.Linear) or not isinstance(last, nn.Linear):
        raise ConfigError(f"cannot fold a branch with {type(norm).__name__} / {type(first).__name__} / "
                          f"{type(last).__name__}: folding permutes LayerNorm and Linear weights only")
    phys = perm[sel.channels()]  # (k,) where the branch's channels sit in the folded stream, in branch order
    order = phys.argsort()  # (k,) branch channel read at the k-th smallest position
    dev = norm.weight.device
    sel.set_channels(phys[order].to(dev))
    o = order.to(dev)
    for p in (norm.weight, norm.bias):
        if p is not None:
            p.copy_(p[o])
    first.weight.copy_(first.weight[:, o])  # (hidden, k): input columns follow the new channel order
    last.weight.copy_(last.weight[o])  # (k, hidden): output rows too
    if last.bias is not None:
        last.bias.copy_(last.bias[o])
    if isinstance(ls, LayerScale):
        ls.gamma.copy_(ls.gamma[o])


def is_folded(model: nn.Module) -> bool:
    """Whether :func:`fold_shuffle` has run on ``model``."""
    return any(getattr(b, "folded", False) for b in getattr(model, "blocks", ()))


@torch.no_grad()
def fold_shuffle(model: nn.Module) -> nn.Module:
    """Fold every channel shuffle of a channel-shuffle ViT into its weights, in place, for inference; returns it.

    The stream is never permuted any more: each branch reads and writes its channels where the unfolded model's
    permutations would have put them (a slice when they are contiguous, else one gather of the branch's own
    channels, which replaces the copy that slicing them for the norm already made), with its norm affine
    parameters, its first linear layer's columns and its last layer's rows permuted to match. One gather after the
    last block puts the channels back in the unfolded order, so ``forward``, ``forward_features`` and
    ``forward_head`` give the unfolded model's outputs; ``forward_intermediates`` of earlier blocks return their
    channels in the folded order.

    Fold after loading weights: the folded model keeps its state-dict keys but holds permuted values, so its state
    dict is for this folded model only.

    Raises:
        ConfigError: the model has blocks that are not :class:`ChannelShuffleBlock`, or is folded already.
    """
    blocks = list(getattr(model, "blocks", ()))
    if not blocks or not all(isinstance(b, ChannelShuffleBlock) for b in blocks):
        raise ConfigError(f"fold_shuffle needs a model whose blocks are all ChannelShuffleBlock, got "
                          f"{type(model).__name__}")
    if is_folded(model):
        raise ConfigError("the model's shuffles are folded already")
    perm = torch.arange(blocks[0].dim)
    for blk in blocks:
        perm = blk.fold(perm)
    if not torch.equal(perm, torch.arange(perm.numel())):
        blocks[-1].restore_index = perm.to(blocks[-1].shuffle_index.device)
    return model
