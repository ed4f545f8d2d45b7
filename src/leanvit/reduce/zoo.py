"""The shipped fine-tuned token-reduction models (``leanvit_vit_fm_teacher_idle70`` and the like), registered in
timm here because they are created patched and patching lives in this layer; their architectures, configs and
weights are the reference models' (:mod:`leanvit.models.reference`)."""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ..models.reference import REDUCED_ARCHS, _cfg as fmnist_cfg, create_reference
from .patching import patch

# timm reads the pretrained configs of a module's entry points from its ``default_cfgs``
default_cfgs = generate_default_cfgs({f"{name}.fmnist": fmnist_cfg(name) for name in REDUCED_ARCHS})


def _create_reduced(name: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    _, method, keep = REDUCED_ARCHS[name]
    return patch(create_reference(name, pretrained, **kwargs), method, keep=keep)


@register_model
def leanvit_vit_fm_teacher_idle70(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The reference teacher fine-tuned with IdleViT at keep 0.7, created patched (``idle``, keep 0.7)."""
    return _create_reduced("leanvit_vit_fm_teacher_idle70", pretrained, **kwargs)


@register_model
def leanvit_vit_fm_teacher_idle50(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The reference teacher fine-tuned with IdleViT at keep 0.5, created patched (``idle``, keep 0.5)."""
    return _create_reduced("leanvit_vit_fm_teacher_idle50", pretrained, **kwargs)


@register_model
def leanvit_vit_fm_teacher_evit50(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The reference teacher fine-tuned with EViT at keep 0.5 under IdleViT's recipe, created patched (``evit``,
    keep 0.5): the fair baseline of ``leanvit_vit_fm_teacher_idle50``."""
    return _create_reduced("leanvit_vit_fm_teacher_evit50", pretrained, **kwargs)
