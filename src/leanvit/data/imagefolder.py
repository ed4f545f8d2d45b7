"""ImageNet-style class folders (``root/<class>/<image>``) with the model's own pretrained transforms."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DataError


class _ImageLoader:
    """Opens one image in the model's colour mode (``L`` for 1-channel models, ``RGB`` otherwise); an unreadable
    file raises a :class:`DataError` that names it. A class (not a closure) so worker processes can pickle it."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, path: str):
        from PIL import Image, UnidentifiedImageError

        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                return img.convert(self.mode)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); remove it or pass "
                            f"--skip-bad-images to skip unreadable files") from None


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decodes the pixels: verify() alone misses truncated files
        return True
    except Exception:  # noqa: BLE001  (any failure to decode makes the file unusable)
        return False


def build_imagefolder(root: str | os.PathLike, model: nn.Module, train: bool = False, split: str | None = None,
                      skip_bad: bool = False, progress: bool = True) -> Any:
    """A torchvision ``ImageFolder`` whose transform comes from the timm model's pretrained config.

    Input size, channels, mean/std, interpolation and crop fraction are read with ``timm.data.resolve_data_config``
    (corrected by the model's patch embedding, :func:`leanvit.analysis.default_input_size`), so that a DeiT checkpoint
    is evaluated exactly as it was published (resize 248 -> center crop 224 for ``crop_pct`` 0.9) and a grayscale
    model reads grayscale images. If ``root`` holds ``train``/``val`` sub-folders, ``split`` picks one.

    Args:
        skip_bad: decode every image first and leave out the unreadable ones (listed on stderr); otherwise the
            first unreadable image stops the run with an error naming it.
    """
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    from ..analysis.macs import default_input_size

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
    chans, h, w = default_input_size(model)
    cfg["input_size"] = (chans, h, w)
    if len(cfg["mean"]) != chans:
        raise DataError(f"the model's pretrained config has {len(cfg['mean'])} normalisation channels but the model "
                        f"takes {chans}-channel images")
    if chans not in (1, 3):
        raise DataError(f"image folders give 1- or 3-channel images; the model takes {chans} channels")
    transform = create_transform(**cfg, is_training=train)
    try:
        ds = ImageFolder(str(root), transform=transform, loader=_ImageLoader("L" if chans == 1 else "RGB"))
    except FileNotFoundError as e:
        raise DataError(f"image folder {root}: {e}") from None
    if skip_bad:
        import sys

        from ..progress import track

        bad = [p for p, _ in track(ds.samples, desc=f"checking images in {root}", enabled=progress)
               if not _readable(p)]
        if bad:
            unreadable = set(bad)
            ds.samples = [s for s in ds.samples if s[0] not in unreadable]
            ds.imgs, ds.targets = ds.samples, [t for _, t in ds.samples]
            shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            print(f"skipped {len(bad)} unreadable image(s) in {root}:\n  {shown}", file=sys.stderr)
        if not ds.samples:
            raise DataError(f"image folder {root} has no readable images")
    return ds
