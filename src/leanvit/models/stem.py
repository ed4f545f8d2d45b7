"""A small convolutional stem that ends on a ViT token grid, usable as timm's ``embed_layer``.

ViTs trained from scratch on small data learn slowly with a plain linear patch embedding; two 3x3 convolutions
before the tokeniser give the locality prior that makes a 28x28 Fashion-MNIST ViT train in a few CPU hours
(Xiao et al., "Early Convolutions Help Transformers See Better", 2021). The stem ends on the same token grid that a
patch embedding of ``patch_size`` would give, so everything downstream (token counts, MACs of the blocks, token
reduction schedules) is that of a plain ViT on a 14x14 = 196 token grid.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import to_2tuple


class ConvStemEmbed(nn.Module):
    """Conv-BN-GELU stem followed by a strided conv that produces the token grid.

    Duck-types timm's ``PatchEmbed`` (``grid_size``, ``num_patches``, ``patch_size``, ``feat_ratio``,
    ``dynamic_feat_size``), so timm's ``VisionTransformer`` accepts it as ``embed_layer``.

    Layout: conv3x3 (in -> dim/2, stride 1) -> BN -> GELU -> conv (dim/2 -> dim, kernel = stride = patch_size
    rounded up to odd: 3x3 stride 2 for patch 2). Output ``(B, N, C)`` with N = grid_h * grid_w.

    ``hidden_dim`` sets the first convolution's width (default ``embed_dim // 2``); a widened model (the
    channel-shuffle ViTs) keeps its vanilla partner's, so that the stem's MACs grow linearly with the width.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 28,
        patch_size: int | tuple[int, int] = 2,
        in_chans: int = 1,
        embed_dim: int = 96,
        norm_layer=None,
        flatten: bool = True,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        hidden_dim: int | None = None,
        **kwargs,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.output_fmt = "NLC"
        self.dynamic_img_pad = dynamic_img_pad
        self.strict_img_size = True
        self.in_chans = in_chans
        hidden = hidden_dim or max(embed_dim // 2, 8)
        self.conv1 = nn.Conv2d(in_chans, hidden, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        # kernel covers the stride window plus a one-pixel halo, so neighbouring tokens overlap
        k = tuple(p + 1 if p > 1 else 1 for p in self.patch_size)
        pad = tuple((kk - 1) // 2 for kk in k)
        self.proj = nn.Conv2d(hidden, embed_dim, kernel_size=k, stride=self.patch_size, padding=pad, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                f"got {tuple(x.shape)}"
            )
        x = self.proj(self.act(self.bn1(self.conv1(x))))  # (B, C, H', W')
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return self.norm(x)
