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
  wider stream (on DeiT-Tiny at expansion 2, within the "under 0.03 GMACs change" that the paper reports;
  BENCHMARKS.md, "Design measurements behind code defaults").
  ``shared`` (one MLP over all C channels) mixes the groups without any shuffle, but costs (C/a)^2 times the
  MLP of the attended group; ``grouped`` with ``idle_mlp_ratio > 0`` gives the idle group its own MLP. At equal
  MACs the ablation measured that split (half the attended MLP's hidden width moved to an idle MLP) best on
  Fashion-MNIST: the shipped model uses it, the block's default stays the cheapest form of the design.
* ``shuffle="mlp"``: one shuffle per block, after the MLP, so a block is a vanilla transformer block on the attended
  group followed by the shuffle (ShuffleNetV2's unit with the block as its branch); ``attn`` shuffles between
  attention and MLP, ``both`` does both, ``none`` is the control without exchange. With a shared MLP the position
  only re-labels channels (a shared MLP is equivariant to channel permutations up to its weights).
* ``alternate=False``: with the shuffle, every block already attends a new mix of channels; alternating the
  attended span between the first and the last ``attn_dim`` channels is the shuffle-free alternative, ablated.
* ``shuffle_groups = dim // gcd(dim, attn_dim)``: the finest interleave in which every group lies inside the
  attended or the idle span, so each block's attended channels come from both groups in proportion to their widths.

The shuffle is free at inference and in training, without folding it into weights: every branch's residual
addition writes the whole stream anyway (out of place), and :func:`write_channels` writes it directly in shuffled
order (one ``torch.stack`` of the shuffle's groups instead of one ``torch.cat``), and a block whose MLP reads only
the attended group writes the stream once, after its MLP. Folding the permutation into the next layers' weights
instead leaves the identity path permuted, so every later branch must gather its channels and scatter its output
(``index_select`` / ``index_add``, which measured slower on CPU than the slices they replace) and the last block
must gather them back; shuffling through a transposed view after the write costs far more than the write (see
:func:`write_channels`; figures in BENCHMARKS.md, "Design measurements behind code defaults").
"""
from __future__ import annotations

from math import gcd
from typing import Literal, Sequence

import torch
from torch import nn
from timm.layers import Attention, DropPath, LayerNorm, LayerScale, Mlp

from ..errors import ConfigError

__all__ = ["ChannelShuffleBlock", "channel_shuffle", "shuffle_index", "write_channels"]

ShufflePosition = Literal["attn", "mlp", "both", "none"]
MlpMode = Literal["shared", "grouped"]
SHUFFLE_POSITIONS: tuple[str, ...] = ("attn", "mlp", "both", "none")
MLP_MODES: tuple[str, ...] = ("shared", "grouped")
Span = tuple[int, int]  # channels [start, stop) of the stream


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNetV2's channel shuffle of the last dimension: ``(..., g * k)`` viewed as ``(g, k)``, transposed.

    Output channel ``j`` is input channel ``(j % g) * k + j // g``: the groups interleave. The shuffle with
    ``C // groups`` groups inverts it.
    """
    return x.unflatten(-1, (groups, x.shape[-1] // groups)).transpose(-1, -2).flatten(-2)  # (..., C)


def shuffle_index(dim: int, groups: int) -> torch.Tensor:
    """The gather index of :func:`channel_shuffle`: ``x[..., shuffle_index(C, g)] == channel_shuffle(x, g)``."""
    if groups < 1 or dim % groups:
        raise ConfigError(f"shuffle groups must divide the width: {dim} channels cannot form {groups} groups")
    j = torch.arange(dim)
    return (j % groups) * (dim // groups) + j // groups  # (C,)


def write_channels(x: torch.Tensor, updates: Sequence[tuple[Span, torch.Tensor]],
                   groups: int | None = None) -> torch.Tensor:
    """``x`` with spans of channels replaced, then channel-shuffled with ``groups``, in one write.

    Equals ``channel_shuffle(x')`` with ``x'[..., start:stop] = new`` for each update, but the output is written in
    shuffled order by ``torch.stack`` of the shuffle's groups, so the shuffle costs nothing over the residual write
    itself; shuffling afterwards (``channel_shuffle`` copies through a transposed view) costs several times the
    write (BENCHMARKS.md, "Design measurements behind code defaults"). The stack needs every span edge on a group
    boundary (true for the default groups), else it falls back to that copy.

    Args:
        x: ``(B, N, C)`` stream.
        updates: ``((start, stop), new)`` pairs with ``new`` of shape ``(B, N, stop - start)``, disjoint spans.
        groups: shuffle groups, or None for no shuffle.
    """
    C = x.shape[-1]
    pieces, pos = [], 0
    for (start, stop), new in sorted(updates, key=lambda u: u[0]):
        if start > pos:
            pieces.append(x[..., pos:start])
        pieces.append(new)
        pos = stop
    if pos < C:
        pieces.append(x[..., pos:])
    if groups is None:
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)  # (B, N, C)
    k = C // groups
    if any(p.shape[-1] % k for p in pieces):  # a group straddles two pieces
        return channel_shuffle(torch.cat(pieces, dim=-1), groups)
    chunks = [c for p in pieces for c in (p.split(k, dim=-1) if p.shape[-1] > k else (p,))]  # groups x (B, N, k)
    return torch.stack(chunks, dim=-1).flatten(-2)  # (B, N, k, groups) -> (B, N, C), interleaved


class ChannelShuffleBlock(nn.Module):
    """Pre-norm transformer block on a widened stream: attention on the Attended group only, then channel shuffle.

    Layout for a stream ``x`` of ``dim`` = C channels, attended span ``[s, s + a)`` (``s = 0``, or ``C - a`` on odd
    blocks with ``alternate``) and idle span the rest::

        x[s:s+a] += ls1(attn(norm1(x[s:s+a])))              # attention on the attended group only
        x = shuffle(x)                                      # if shuffle in ("attn", "both")
        shared:  x += ls2(mlp(norm2(x)))                    # one MLP over all C channels
        grouped: x[s:s+a] += ls2(mlp(norm2(x[s:s+a])))      # the attended group's MLP, and the idle group's
                 x[idle] += ls2_idle(mlp_idle(norm2_idle(x[idle])))   # if idle_mlp_ratio > 0
        x = shuffle(x)                                      # if shuffle in ("mlp", "both")

    The constructor takes every argument timm's ``VisionTransformer`` passes to ``block_fn`` (``dim`` is the total
    width, ``depth`` the block's index); the shuffle options come through ``functools.partial``. Token-reduction
    patches run the forward's three steps (:meth:`attn_input`, :meth:`attn_residual`, :meth:`mlp_residual`) with
    the reduction between attention and MLP (``leanvit.reduce.adapters.shuffle``).

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
        others: as timm's ``Block``; ``attn_layer`` and ``mlp_layer`` are classes.
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
        groups = dim // gcd(dim, a) if shuffle_groups is None else int(shuffle_groups)
        shuffle_index(dim, groups)  # validates the groups
        dd = {"device": device, "dtype": dtype}
        self.dim, self.attn_dim, self.groups = dim, a, groups
        self.shuffle, self.mlp_mode, self.alternate = shuffle, mlp_mode, alternate
        start = dim - a if alternate and depth % 2 else 0
        self.attn_span: Span = (start, start + a)
        self.idle_span: Span = (0, start) if start else (a, dim)
        self.mlp_span: Span = (0, dim) if mlp_mode == "shared" else self.attn_span

        self.norm1 = norm_layer(a, **dd)
        self.attn = attn_layer(a, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_attn_norm,
                               proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer,
                               **dd)
        self.ls1 = LayerScale(a, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        def mlp(width: int, ratio: float) -> nn.Module:
            return mlp_layer(in_features=width, hidden_features=int(width * ratio), act_layer=act_layer,
                             norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias, drop=proj_drop, **dd)

        w = self.mlp_span[1] - self.mlp_span[0]
        self.norm2 = norm_layer(w, **dd)
        self.mlp = mlp(w, mlp_ratio)
        self.ls2 = LayerScale(w, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if idle_mlp_ratio > 0:
            self.norm2_idle = norm_layer(dim - a, **dd)
            self.mlp_idle = mlp(dim - a, idle_mlp_ratio)
            self.ls2_idle = LayerScale(dim - a, init_values=init_values, **dd) if init_values else nn.Identity()
        else:
            self.norm2_idle = self.mlp_idle = self.ls2_idle = None

    # --------------------------------------------------------------- the three steps of the forward
    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` -> the normalised attended group ``(B, N, a)``, the attention's input."""
        return self.norm1(self._read(x, self.attn_span))

    def attn_residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The stream ``(B, N, C)`` after adding the attention output ``out`` (B, N, a) to the attended group, and
        the post-attention shuffle."""
        new = self._read(x, self.attn_span) + self.drop_path1(self.ls1(out))  # (B, N, a)
        return write_channels(x, [(self.attn_span, new)], self._groups("attn"))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The stream ``(B, N, C)`` after the MLP branch(es) and the post-MLP shuffle."""
        xm = self._read(x, self.mlp_span)  # (B, N, a), or (B, N, C) when shared
        updates = [(self.mlp_span, xm + self.drop_path2(self.ls2(self.mlp(self.norm2(xm)))))]
        return write_channels(x, updates + self._idle_update(x), self._groups("mlp"))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.mlp_span != self.attn_span or self.shuffle in ("attn", "both"):
            out = self.attn(self.attn_input(x), attn_mask=attn_mask, is_causal=is_causal)  # (B, N, a)
            return self.mlp_residual(self.attn_residual(x, out))
        # the MLP reads only what the attention wrote: the attended group runs a whole vanilla block before the
        # stream is written, once per block instead of once per step
        xa = self._read(x, self.attn_span)  # (B, N, a)
        xa = xa + self.drop_path1(self.ls1(self.attn(self.norm1(xa), attn_mask=attn_mask, is_causal=is_causal)))
        xa = xa + self.drop_path2(self.ls2(self.mlp(self.norm2(xa))))
        return write_channels(x, [(self.attn_span, xa)] + self._idle_update(x), self._groups("mlp"))

    def _idle_update(self, x: torch.Tensor) -> list[tuple[Span, torch.Tensor]]:
        if self.mlp_idle is None:
            return []
        xi = self._read(x, self.idle_span)  # (B, N, C - a)
        return [(self.idle_span, xi + self.drop_path2(self.ls2_idle(self.mlp_idle(self.norm2_idle(xi)))))]

    @staticmethod
    def _read(x: torch.Tensor, span: Span) -> torch.Tensor:
        return x[..., span[0]:span[1]]

    def _groups(self, step: str) -> int | None:
        return self.groups if self.shuffle in (step, "both") else None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, attn_dim={self.attn_dim}, shuffle={self.shuffle}, groups={self.groups}, "
                f"mlp_mode={self.mlp_mode}, attn_span={self.attn_span}")
