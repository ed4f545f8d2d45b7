"""A small CNN teacher for Fashion-MNIST, registered in timm as ``leanvit_resnet_fm_teacher``.

It exists for cross-architecture distillation (a CNN teacher into the ViT student, ``benchmarks/distill_fmnist.py``):
a timm ``ResNet`` (BasicBlocks, one per stage, widths 32-64-128-256; 1.24M parameters, 0.061 GMACs), so that
timm's interfaces that :mod:`leanvit.distill` reads (``forward_head(pre_logits=True)``, ``forward_intermediates``)
are timm's own. The only change is the stem (64 channels, as timm's): ImageNet ResNets reduce the input 4x before
the first stage (a 7x7 stride-2 convolution and a max pool), which leaves 7x7 pixels of a 28x28 image; here the
stem is one 3x3 stride-1 convolution (as ResNets for CIFAR do), so the stages run at 28, 14, 7 and 4 pixels.

Weights: like the reference ViTs, ``timm.create_model(name, pretrained=True)`` loads
``leanvit/zoo/weights/<name>.safetensors`` offline once that file exists.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from .reference import _cfg as fmnist_cfg

__all__ = ["CNN_ARCHS", "SmallImageResNet"]

# name -> ResNet arguments
CNN_ARCHS: dict[str, dict] = {
    "leanvit_resnet_fm_teacher": dict(layers=(1, 1, 1, 1), channels=(32, 64, 128, 256)),
}


class SmallImageResNet(ResNet):
    """timm's ResNet with a 3x3 stride-1 stem and no stem pooling, for images of a few dozen pixels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        in_chans, stem_width = self.conv1.in_channels, self.conv1.out_channels
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        # the stem no longer reduces: every feature map is 4x larger than timm's feature_info says
        for info in self.feature_info:
            info["reduction"] = max(1, info["reduction"] // 4)


default_cfgs = generate_default_cfgs(
    {f"{name}.fmnist": fmnist_cfg(name, first_conv="conv1", classifier="fc") for name in CNN_ARCHS})


def _create(name: str, pretrained: bool = False, **kwargs) -> ResNet:
    args = dict(block=BasicBlock, in_chans=1, num_classes=10, **CNN_ARCHS[name])
    args.update(kwargs)
    if pretrained:
        from ..zoo import require_weights

        require_weights(name)
    return build_model_with_cfg(SmallImageResNet, name, pretrained, **args)


@register_model
def leanvit_resnet_fm_teacher(pretrained: bool = False, **kwargs) -> ResNet:
    """Fashion-MNIST CNN teacher: a ResNet with one BasicBlock per stage (widths 32-64-128-256), 3x3 stem."""
    return _create("leanvit_resnet_fm_teacher", pretrained, **kwargs)
