"""ImageNet-style class folders (``root/<class>/<image>``) with the model's own pretrained transforms.

Splits map to folders so that a held-out split never holds training images:

* ``root/train/<class>/...`` and ``root/val/<class>/...`` (``root/test/...`` optional): ``train`` and ``val`` read
  their folders, ``trainval`` reads both, ``test`` reads ``test/`` (``val/`` when there is no ``test/``).
* ``root/train/`` without ``val/``, or class folders directly in ``root``: a seeded, per-class
  :data:`VAL_FRACTION` of the images is held out as ``val`` and ``train`` is the rest, so training never selects
  its best checkpoint on its own images; ``trainval`` is all of them. ``test`` of a plain class folder is the
  whole folder (a folder given to evaluate a model on); ``test`` of a ``train/``-only folder is refused.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DataError

SPLITS = ("train", "val", "trainval", "test")
SPLIT_FOLDERS = ("train", "val", "test")
VAL_FRACTION = 0.1  # of each class's images, held out as ``val`` when the folder has no val/ folder
HOLDOUT_SEED = 0  # fixed: train and val, built in separate calls (or processes, DDP ranks), must stay complementary

_noted: set[str] = set()  # folders whose held-out split was already announced on stderr in this process


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


def _class_names(folder: Path) -> list[str]:
    """Class-folder names as torchvision's ``ImageFolder`` finds them (every sub-directory, sorted)."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir())


def _layout_hint(root: Path) -> str:
    return f"lay it out as {root}/train/<class>/<image> and {root}/val/<class>/<image>"


def _check_same_classes(root: Path, present: dict[str, Path]) -> None:
    """Every split folder must have the same class folders: ``ImageFolder`` numbers classes by their sorted names,
    so differing sets would give the same label to different classes (and a class count that fits one split's
    head but not the other's)."""
    def listed(only: set[str]) -> str:
        shown = sorted(only)
        return ", ".join(shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "")

    names = {s: set(_class_names(p)) for s, p in present.items()}
    ref = next(iter(present))
    for s in present:
        if s == ref or names[s] == names[ref]:
            continue
        parts = [f"only in {split}/: {listed(only)}" for split, only in
                 ((ref, names[ref] - names[s]), (s, names[s] - names[ref])) if only]
        raise DataError(f"imagefolder {root}: {ref}/ and {s}/ have different classes: {'; '.join(parts)}")


def _split_folders(root: Path, split: str) -> tuple[list[Path], str | None]:
    """The folders that ``split`` reads, and whether it is the kept (``"train"``) or held-out (``"val"``) part of a
    folder without a val/ folder (None: the folders' images as they are)."""
    present = {s: root / s for s in SPLIT_FOLDERS if (root / s).is_dir()}
    if not present:  # class folders directly in root
        return [root], (split if split in ("train", "val") else None)
    _check_same_classes(root, present)
    if split == "test":
        if "test" in present or "val" in present:
            return [present.get("test", present.get("val"))], None
        raise DataError(f"imagefolder {root} has a train/ folder but no test/ or val/ folder, and the test split "
                        f"must not be training images; {_layout_hint(root)} (or add {root}/test/<class>/<image>)")
    if "train" not in present:
        if split == "val" and "val" in present:
            return [present["val"]], None
        raise DataError(f"imagefolder {root} has no train/ folder for the {split} split; {_layout_hint(root)}")
    if "val" in present:
        return ([present["train"], present["val"]] if split == "trainval" else [present[split]]), None
    return [present["train"]], (None if split == "trainval" else split)


def _held_out(samples: list[tuple[str, int]], folder: Path, root: Path) -> set[str]:
    """Paths of the seeded held-out part: :data:`VAL_FRACTION` of each class (at least one image).

    Each class's images are ordered by a hash of the seed and their path inside ``folder``, so the choice is the
    same in every call, process and machine (and wherever the folder is moved), independent of the other classes.
    """
    prefix = os.path.join(str(folder), "")

    def key(path: str) -> str:
        rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, folder)
        return hashlib.sha256(f"{HOLDOUT_SEED}:{rel.replace(os.sep, '/')}".encode()).hexdigest()

    by_class: dict[int, list[str]] = {}
    for path, target in samples:
        by_class.setdefault(target, []).append(path)
    held: set[str] = set()
    for paths in by_class.values():
        if len(paths) < 2:
            raise DataError(f"imagefolder {root}: class folder {Path(paths[0]).parent} has only {len(paths)} image, "
                            f"too few to hold out a validation image; {_layout_hint(root)}")
        k = max(1, round(len(paths) * VAL_FRACTION))  # <= len - 1 for len >= 2: train keeps every class
        held.update(sorted(paths, key=key)[:k])
    return held


def build_imagefolder(root: str | os.PathLike, model: nn.Module, train: bool = False, split: str | None = None,
                      skip_bad: bool = False, progress: bool = True) -> Any:
    """A torchvision ``ImageFolder`` whose transform comes from the timm model's pretrained config.

    Input size, channels, mean/std, interpolation and crop fraction are read with ``timm.data.resolve_data_config``
    (corrected by the model's patch embedding, :func:`leanvit.analysis.default_input_size`), so that a DeiT checkpoint
    is evaluated exactly as it was published (resize 248 -> center crop 224 for ``crop_pct`` 0.9) and a grayscale
    model reads grayscale images. ``split`` (train / val / trainval / test; default train if ``train`` else val)
    picks the images as the module docstring describes.

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
    split = split or ("train" if train else "val")
    if split not in SPLITS:
        raise DataError(f"unknown image folder split '{split}'; choose one of {', '.join(SPLITS)}")
    folders, part = _split_folders(root, split)
    for folder in folders:
        if not _class_names(folder):
            raise DataError(f"image folder {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    cfg = resolve_data_config(model=model)
    chans, h, w = default_input_size(model)
    cfg["input_size"] = (chans, h, w)
    if len(cfg["mean"]) != chans:
        raise DataError(f"the model's pretrained config has {len(cfg['mean'])} normalisation channels but the model "
                        f"takes {chans}-channel images")
    if chans not in (1, 3):
        raise DataError(f"image folders give 1- or 3-channel images; the model takes {chans} channels")
    transform = create_transform(**cfg, is_training=train)
    loader = _ImageLoader("L" if chans == 1 else "RGB")
    try:
        ds = ImageFolder(str(folders[0]), transform=transform, loader=loader)
        for extra in folders[1:]:  # trainval: same classes (checked), so the labels agree
            ds.samples = ds.samples + ImageFolder(str(extra), loader=loader).samples
    except FileNotFoundError as e:
        raise DataError(f"image folder {root}: {e}") from None
    if part is not None:
        # chosen from every file, before --skip-bad-images drops any, so train and val stay disjoint either way
        held = _held_out(ds.samples, folders[0], root)
        ds.samples = [s for s in ds.samples if (s[0] in held) == (part == "val")]
        where = "its" if folders[0] == root else "its train/"
        if str(root) not in _noted:
            _noted.add(str(root))
            print(f"note: {root} has no val/ folder; holding out {VAL_FRACTION:.0%} of {where} images (seeded) as "
                  f"the validation split (trainval uses all of them)", file=sys.stderr)
    ds.imgs, ds.targets = ds.samples, [t for _, t in ds.samples]
    shown_root = root if len(folders) > 1 else folders[0]
    if skip_bad:
        from ..progress import track

        bad = [p for p, _ in track(ds.samples, desc=f"checking images in {shown_root}", enabled=progress)
               if not _readable(p)]
        if bad:
            unreadable = set(bad)
            ds.samples = [s for s in ds.samples if s[0] not in unreadable]
            ds.imgs, ds.targets = ds.samples, [t for _, t in ds.samples]
            shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            print(f"skipped {len(bad)} unreadable image(s) in {shown_root}:\n  {shown}", file=sys.stderr)
        if not ds.samples:
            raise DataError(f"image folder {shown_root} has no readable images")
    return ds
