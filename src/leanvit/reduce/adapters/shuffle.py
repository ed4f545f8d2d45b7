"""leanvit's channel-shuffle blocks (:class:`~leanvit.models.shuffle.ChannelShuffleBlock`) inside timm ViTs: the
block registers its reducing class with the timm ViT adapter, so reducers never see the channel groups."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...models.shuffle import ChannelShuffleBlock
from ..base import TokenReducer
from .timm_vit import _Reducing, register_block


class ReducingShuffleBlock(_Reducing, ChannelShuffleBlock):
    """:class:`~leanvit.models.shuffle.ChannelShuffleBlock` whose forward lets a :class:`TokenReducer` act between
    the attention (on the attended group) and the MLP, on every channel of the stream.

    The block's own steps do everything but the attention call: its forward is ``attn_input`` -> attention ->
    ``attn_residual`` -> ``mlp_residual`` by contract, and reducers treat channels alike, so reducing the stream
    whatever its channel order is exact.
    """

    @staticmethod
    def mlp_modules(block: nn.Module) -> list[nn.Module]:
        """The attended MLP and, when the design has one, the idle group's own MLP."""
        return [m for m in (block.mlp, getattr(block, "mlp_idle", None)) if m is not None]

    @staticmethod
    def refuses(reducer: TokenReducer) -> str | None:
        if reducer.selects_subsets:
            return (f"'{reducer.name}' does not support channel-shuffle blocks (their attention and MLP run on "
                    f"different channel groups, and '{reducer.name}' computes a subset of the tokens in both); use a "
                    f"method that removes tokens (gtp, tome, evit)")
        return None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                **kwargs: Any) -> torch.Tensor:
        red = self._begin(x, attn_mask, is_causal)
        i = self._leanvit_index
        x = red.before_attn(i, x)
        a = red.attend(i, self.attn, self.attn_input(x))  # on the attended group, (B, N, a)
        x = self.attn_residual(x, a.x)  # (B, N, C)
        x = red.reduce(i, x, a)
        return self._finish(red, self.mlp_residual(x))


register_block(ChannelShuffleBlock, ReducingShuffleBlock)
