"""Reference ViTs for 28x28 grayscale images (Fashion-MNIST), registered in timm under the ``leanvit_`` prefix.

They are timm ``VisionTransformer`` models (cls token, pre-norm blocks, token pooling) whose token grid is DeiT's
14x14 = 196 image tokens plus the cls token, so token-reduction schedules written for DeiT at 224 carry over.
The tokeniser is a small convolutional stem (:class:`leanvit.models.stem.ConvStemEmbed`) instead of a linear
patch embedding; see that module for why.

Shipped weights live in ``leanvit/zoo/weights`` and load offline with
``timm.create_model(name, pretrained=True)`` once ``leanvit`` is imported.
"""
from __future__ import annotations

from functools import partial

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .stem import ConvStemEmbed
from ..zoo import weight_file

# Fashion-MNIST training-set statistics (pixel mean / std on [0, 1]), computed over the 60k training images.
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)

__all__ = ["DISTILLED_ARCHS", "REFERENCE_ARCHS", "REDUCED_ARCHS", "FMNIST_MEAN", "FMNIST_STD"]

# name -> VisionTransformer kwargs. The student has about a third of the teacher's MACs.
REFERENCE_ARCHS: dict[str, dict] = {
    "leanvit_vit_fm_teacher": dict(embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0),
    "leanvit_vit_fm_student": dict(embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0),
}


def _cfg(name: str, **kwargs) -> dict:
    return {
        "file": weight_file(name),
        "num_classes": 10,
        "input_size": (1, 28, 28),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": FMNIST_MEAN,
        "std": FMNIST_STD,
        "first_conv": "patch_embed.conv1",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# Fine-tuned token-reduction models: name -> (architecture, method, keep). They are created already patched
# (``leanvit.get_reducer(model)`` gives the method and its keep rate): their entry points are registered by
# :mod:`leanvit.reduce.zoo`, the layer that can patch; their weights are the fine-tuned ones (``leanvit finetune``;
# run, log and evaluation in ``leanvit/zoo/runs/<name>``).
REDUCED_ARCHS: dict[str, tuple[str, str, float]] = {
    "leanvit_vit_fm_teacher_idle70": ("leanvit_vit_fm_teacher", "idle", 0.7),
    "leanvit_vit_fm_teacher_idle50": ("leanvit_vit_fm_teacher", "idle", 0.5),
    "leanvit_vit_fm_teacher_evit50": ("leanvit_vit_fm_teacher", "evit", 0.5),
}

# Distilled students: name -> (architecture, distillation method). The student's architecture, trained with
# ``leanvit distill`` from the reference teacher (run, log and evaluation in ``leanvit/zoo/runs/<name>``).
DISTILLED_ARCHS: dict[str, tuple[str, str]] = {
    "leanvit_vit_fm_student_pefd": ("leanvit_vit_fm_student", "pefd"),
    "leanvit_vit_fm_student_proj": ("leanvit_vit_fm_student", "proj"),
}

default_cfgs = generate_default_cfgs(
    {f"{name}.fmnist": _cfg(name) for name in [*REFERENCE_ARCHS, *DISTILLED_ARCHS]})


def create_reference(name: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    arch = {**REDUCED_ARCHS, **DISTILLED_ARCHS}.get(name, (name,))[0]
    args = dict(
        img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_layer=ConvStemEmbed, **REFERENCE_ARCHS[arch]
    )
    args.update(kwargs)
    if pretrained:
        from ..zoo import require_weights

        require_weights(name)
    return build_model_with_cfg(
        VisionTransformer,
        name,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn),
        **args,
    )


@register_model
def leanvit_vit_fm_teacher(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Fashion-MNIST reference teacher: width 96, depth 6, 3 heads, 196 + 1 tokens."""
    return create_reference("leanvit_vit_fm_teacher", pretrained, **kwargs)


@register_model
def leanvit_vit_fm_student(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Fashion-MNIST reference student: width 64, depth 4, 2 heads, 196 + 1 tokens (~1/3 of the teacher's MACs)."""
    return create_reference("leanvit_vit_fm_student", pretrained, **kwargs)


@register_model
def leanvit_vit_fm_student_pefd(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The reference student distilled from the reference teacher with PEFD (3 projectors)."""
    return create_reference("leanvit_vit_fm_student_pefd", pretrained, **kwargs)


@register_model
def leanvit_vit_fm_student_proj(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The reference student distilled from the reference teacher with one Linear projector (FitNet-style)."""
    return create_reference("leanvit_vit_fm_student_proj", pretrained, **kwargs)
