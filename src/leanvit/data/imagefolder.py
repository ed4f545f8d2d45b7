"""ImageNet-style class folders (``root/<class>/<image>``) with the model's own pretrained transforms."""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import DataError


def build_imagefolder(root: str | os.PathLike, model: nn.Module, train: bool = False, split: str | None = None):
    """A torchvision ``ImageFolder`` whose transform comes from the timm model's pretrained config.

    Input size, mean/std, interpolation and crop fraction are read with ``timm.data.resolve_data_config`` so that a
    DeiT checkpoint is evaluated exactly as it was published (resize 248 -> center crop 224 for ``crop_pct`` 0.9).
    If ``root`` holds ``train``/``val`` sub-folders, ``split`` picks one (``val`` for evaluation by default).
    """
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    sub = split or ("train" if train else "val")
    if (root / sub).is_dir():
        root = root / sub
    classes = [d for d in sorted(root.iterdir()) if d.is_dir()]
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    cfg = resolve_data_config(model=model)
    transform = create_transform(**cfg, is_training=train)
    try:
        return ImageFolder(str(root), transform=transform)
    except FileNotFoundError as e:
        raise DataError(f"image folder {root}: {e}") from None
