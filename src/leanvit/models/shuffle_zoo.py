"""Channel-shuffle ViTs registered in timm under the ``leanvit_shuffle_`` prefix, with their vanilla partners.

Two geometries:

* Fashion-MNIST (``leanvit_shuffle_fm_*``): the reference student's input (28x28, one channel, conv stem ending on
  the 14x14 = 196-token grid, depth 4, 2 heads), widened. Every variant's MACs are within 3% of the shipped student
  ``leanvit_vit_fm_student`` (0.062 GMACs), its vanilla partner. ``leanvit_shuffle_fm_student`` is the default
  design (:mod:`leanvit.models.shuffle`); each other variant changes one ablation axis (expansion, attended width,
  shuffle position, MLP mode, alternating split) and pays for what it adds with a smaller MLP, so that all stay
  matched. The stem keeps the student's hidden width (32), so it costs linearly more with the width. The ablation
  (``benchmarks/ablate_shuffle.py``, BENCHMARKS.md) chose ``leanvit_shuffle_fm_mlp_grouped`` (the default design
  with an MLP for each group, both at ratio 1.75): it is the one trained on the full recipe and shipped.
* ImageNet geometry (224, patch 16, random init, for speed): ``leanvit_shuffle_tiny_patch16_224`` widens DeiT-Tiny
  (width 192, partner ``deit_tiny_patch16_224``) and ``leanvit_shuffle_nano_patch16_224`` a width-128 ViT (partner
  ``leanvit_vit_nano_patch16_224``, registered here: timm has no ViT that small at 224);
  ``leanvit_shuffle_tiny_grouped_patch16_224`` is DeiT-Tiny in the design chosen on Fashion-MNIST.

Weights: like the reference models, ``timm.create_model(name, pretrained=True)`` loads
``leanvit/zoo/weights/<name>.safetensors`` offline once that file exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..errors import ConfigError
from ..zoo import require_weights, weight_file
from .reference import _cfg as fmnist_cfg
from .shuffle import ChannelShuffleBlock
from .stem import ConvStemEmbed

__all__ = ["SHUFFLE_ARCHS", "VANILLA_ARCHS", "ShuffleArch"]

FM_STUDENT = "leanvit_vit_fm_student"


@dataclass(frozen=True)
class ShuffleArch:
    """One registered channel-shuffle ViT.

    Attributes:
        geometry: ``"fm"`` (Fashion-MNIST, conv stem) or ``"in224"`` (ImageNet, 16x16 patches).
        embed_dim: total width C of the stream.
        attn_dim: attended width a (heads split it).
        depth, num_heads, mlp_ratio: as timm's ViT (``mlp_ratio``: the attended group's MLP, or the shared one).
        shuffle, mlp_mode, idle_mlp_ratio, alternate: :class:`~leanvit.models.shuffle.ChannelShuffleBlock` options.
        partner: the vanilla model whose MACs this one matches within 3%.
        axis: the ablation axis this variant moves along (``"default"`` for the default design).
    """

    geometry: str
    embed_dim: int
    attn_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    partner: str
    axis: str
    shuffle: str = "mlp"
    mlp_mode: str = "grouped"
    idle_mlp_ratio: float = 0.0
    alternate: bool = False

    def block_options(self) -> dict:
        return dict(attn_dim=self.attn_dim, shuffle=self.shuffle, mlp_mode=self.mlp_mode,
                    idle_mlp_ratio=self.idle_mlp_ratio, alternate=self.alternate)


_FM = dict(geometry="fm", depth=4, num_heads=2, partner=FM_STUDENT)
# The student spends 41.6k MACs per token on attention and 32.8k on its MLP in each block. Widening the stream to
# C costs 9 * 32 * (C - 64) * 196 MACs more in the stem (2.3k per token and block at C = 96, 4.6k at 128, 9.2k at
# 192); each variant gives that back, and spends what a narrower attention saves, through its MLP ratios.
SHUFFLE_ARCHS: dict[str, ShuffleArch] = {
    # default: expansion 2, attention at the student's width, attended-group MLP only, shuffle after the MLP
    "leanvit_shuffle_fm_student": ShuffleArch(embed_dim=128, attn_dim=64, mlp_ratio=3.5, axis="default", **_FM),
    # expansion ratio (attended width 64)
    "leanvit_shuffle_fm_e1p5": ShuffleArch(embed_dim=96, attn_dim=64, mlp_ratio=3.75, axis="expansion", **_FM),
    "leanvit_shuffle_fm_e3": ShuffleArch(embed_dim=192, attn_dim=64, mlp_ratio=2.875, axis="expansion", **_FM),
    # attended width (expansion 2 of the student's width): cheaper attention buys an MLP for the idle group
    "leanvit_shuffle_fm_a32": ShuffleArch(embed_dim=128, attn_dim=32, mlp_ratio=4.0, idle_mlp_ratio=2.5,
                                          axis="attended width", **_FM),
    "leanvit_shuffle_fm_a48": ShuffleArch(embed_dim=128, attn_dim=48, mlp_ratio=4.0, idle_mlp_ratio=1.8,
                                          axis="attended width", **_FM),
    # where the shuffle sits
    "leanvit_shuffle_fm_pos_attn": ShuffleArch(embed_dim=128, attn_dim=64, mlp_ratio=3.5, shuffle="attn",
                                               axis="shuffle position", **_FM),
    "leanvit_shuffle_fm_pos_both": ShuffleArch(embed_dim=128, attn_dim=64, mlp_ratio=3.5, shuffle="both",
                                               axis="shuffle position", **_FM),
    "leanvit_shuffle_fm_pos_none": ShuffleArch(embed_dim=128, attn_dim=64, mlp_ratio=3.5, shuffle="none",
                                               axis="shuffle position", **_FM),
    # how the MLP treats the groups: one shared MLP (hidden 112 over 128 channels), or one per group (112 each)
    "leanvit_shuffle_fm_mlp_shared": ShuffleArch(embed_dim=128, attn_dim=64, mlp_ratio=0.875, mlp_mode="shared",
                                                 axis="mlp", **_FM),
    "leanvit_shuffle_fm_mlp_grouped": ShuffleArch(embed_dim=128, attn_dim=64, mlp_ratio=1.75, idle_mlp_ratio=1.75,
                                                  axis="mlp", **_FM),
    # alternating split between blocks, with and without the shuffle
    "leanvit_shuffle_fm_alt": ShuffleArch(embed_dim=128, attn_dim=64, mlp_ratio=3.5, alternate=True,
                                          axis="alternating split", **_FM),
    "leanvit_shuffle_fm_alt_noshuffle": ShuffleArch(embed_dim=128, attn_dim=64, mlp_ratio=3.5, alternate=True,
                                                    shuffle="none", axis="alternating split", **_FM),
    # ImageNet geometry, random init: the default design on DeiT-Tiny (the wider patch embedding adds 0.029 GMACs)
    # and on a width-128 ViT (attended MLP ratio 3.75 gives back its wider patch embedding)
    "leanvit_shuffle_tiny_patch16_224": ShuffleArch(geometry="in224", embed_dim=384, attn_dim=192, depth=12,
                                                    num_heads=3, mlp_ratio=4.0, partner="deit_tiny_patch16_224",
                                                    axis="default"),
    "leanvit_shuffle_nano_patch16_224": ShuffleArch(geometry="in224", embed_dim=256, attn_dim=128, depth=12,
                                                    num_heads=2, mlp_ratio=3.75,
                                                    partner="leanvit_vit_nano_patch16_224", axis="default"),
    # the design the Fashion-MNIST ablation chose (an MLP per group, half DeiT-Tiny's hidden width each), for speed
    "leanvit_shuffle_tiny_grouped_patch16_224": ShuffleArch(geometry="in224", embed_dim=384, attn_dim=192, depth=12,
                                                            num_heads=3, mlp_ratio=2.0, idle_mlp_ratio=2.0,
                                                            partner="deit_tiny_patch16_224", axis="mlp"),
}

# vanilla partners that timm does not have
VANILLA_ARCHS: dict[str, dict] = {
    "leanvit_vit_nano_patch16_224": dict(embed_dim=128, depth=12, num_heads=2, mlp_ratio=4.0),
}

# the student's stem: hidden width 32 (ConvStemEmbed's default for width 64), kept by every widened FM variant
FM_STEM_HIDDEN = 32


def _cfg(name: str, geometry: str) -> dict:
    if geometry == "fm":
        return fmnist_cfg(name)  # the reference models' config: same input, classes and weights folder
    return {"file": weight_file(name), "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0"}


def _tag(geometry: str) -> str:
    return "fmnist" if geometry == "fm" else "in1k"


default_cfgs = generate_default_cfgs({
    **{f"{name}.{_tag(a.geometry)}": _cfg(name, a.geometry) for name, a in SHUFFLE_ARCHS.items()},
    **{f"{name}.in1k": _cfg(name, "in224") for name in VANILLA_ARCHS},
})


def _build(name: str, pretrained: bool, args: dict) -> VisionTransformer:
    if pretrained:
        require_weights(name)
    return build_model_with_cfg(VisionTransformer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **args)


def _create_shuffle(name: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    a = SHUFFLE_ARCHS[name]
    args = dict(embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads, mlp_ratio=a.mlp_ratio,
                block_fn=partial(ChannelShuffleBlock, **a.block_options()))
    if a.geometry == "fm":
        args.update(img_size=28, patch_size=2, in_chans=1, num_classes=10,
                    embed_layer=partial(ConvStemEmbed, hidden_dim=FM_STEM_HIDDEN))
    args.update(kwargs)
    model = _build(name, pretrained, args)
    if a.alternate and model.blocks[1].attn_span[0] == 0:  # timm passes each block its index as depth=
        raise ConfigError(f"{name} alternates its attended channels by block index, which this timm version "
                          f"does not pass to its blocks; upgrade timm")
    return model


def _create_vanilla(name: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _build(name, pretrained, {**VANILLA_ARCHS[name], **kwargs})


@register_model
def leanvit_shuffle_fm_student(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Fashion-MNIST channel-shuffle student (default design): width 128, attention on 64, MACs of the student."""
    return _create_shuffle("leanvit_shuffle_fm_student", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_e1p5(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, expansion 1.5: width 96, attention on 64."""
    return _create_shuffle("leanvit_shuffle_fm_e1p5", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_e3(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, expansion 3: width 192, attention on 64."""
    return _create_shuffle("leanvit_shuffle_fm_e3", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_a32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, attended width 32 of 128; the idle group gets an MLP (ratio 2.5)."""
    return _create_shuffle("leanvit_shuffle_fm_a32", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_a48(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, attended width 48 of 128; the idle group gets an MLP (ratio 1.8)."""
    return _create_shuffle("leanvit_shuffle_fm_a48", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_pos_attn(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, shuffle between attention and MLP."""
    return _create_shuffle("leanvit_shuffle_fm_pos_attn", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_pos_both(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, shuffle after attention and after the MLP."""
    return _create_shuffle("leanvit_shuffle_fm_pos_both", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_pos_none(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation control, no shuffle: the idle channels go from the stem to the head untouched."""
    return _create_shuffle("leanvit_shuffle_fm_pos_none", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_mlp_shared(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, one MLP over all 128 channels (ratio 0.875)."""
    return _create_shuffle("leanvit_shuffle_fm_mlp_shared", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_mlp_grouped(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, one MLP per group (ratio 1.75 each)."""
    return _create_shuffle("leanvit_shuffle_fm_mlp_grouped", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_alt(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, odd blocks attend the last 64 channels."""
    return _create_shuffle("leanvit_shuffle_fm_alt", pretrained, **kwargs)


@register_model
def leanvit_shuffle_fm_alt_noshuffle(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Ablation, alternating split instead of the shuffle."""
    return _create_shuffle("leanvit_shuffle_fm_alt_noshuffle", pretrained, **kwargs)


@register_model
def leanvit_shuffle_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Tiny widened to 384 channels, attention on 192 (random init; partner ``deit_tiny_patch16_224``)."""
    return _create_shuffle("leanvit_shuffle_tiny_patch16_224", pretrained, **kwargs)


@register_model
def leanvit_shuffle_nano_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Width-128 ViT widened to 256 channels, attention on 128 (random init; partner
    ``leanvit_vit_nano_patch16_224``)."""
    return _create_shuffle("leanvit_shuffle_nano_patch16_224", pretrained, **kwargs)


@register_model
def leanvit_shuffle_tiny_grouped_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Tiny widened to 384 channels, attention on 192, an MLP per group of hidden width 384 (the design
    chosen on Fashion-MNIST; random init, partner ``deit_tiny_patch16_224``)."""
    return _create_shuffle("leanvit_shuffle_tiny_grouped_patch16_224", pretrained, **kwargs)


@register_model
def leanvit_vit_nano_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Vanilla ViT at 224, width 128, depth 12, 2 heads (random init): the partner of the nano shuffle ViT."""
    return _create_vanilla("leanvit_vit_nano_patch16_224", pretrained, **kwargs)
