"""Datasets behind one ``--data`` option.

Specs:
    ``fmnist`` or ``fmnist:PATH``      Fashion-MNIST idx files (default folder ``/usr/share/datasets/fashion-mnist``)
    ``imagefolder:PATH``               ImageNet-style class folders, transforms from the model's pretrained config
    ``synthetic`` or ``synthetic:N``   N random images of the model's input size (speed benchmarks)
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.utils.data import Dataset, Subset

from ..errors import DataError
from .fashion_mnist import CLASSES as FMNIST_CLASSES, FashionMNIST, read_idx
from .imagefolder import build_imagefolder
from .synthetic import SyntheticImages

__all__ = ["DataSpec", "parse_data_spec", "build_dataset", "FashionMNIST", "SyntheticImages", "read_idx",
           "FMNIST_CLASSES", "DATA_KINDS", "num_classes_of"]

DATA_KINDS = ("fmnist", "imagefolder", "synthetic")


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: str | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(spec: str) -> DataSpec:
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in DATA_KINDS:
        raise DataError(f"unknown data source '{spec}'; use one of fmnist[:PATH], imagefolder:PATH, synthetic[:N]")
    if kind == "imagefolder" and not path:
        raise DataError("imagefolder needs a path: --data imagefolder:PATH")
    if kind == "synthetic" and path and not path.isdigit():
        raise DataError(f"synthetic takes a number of images (synthetic:N), got '{path}'")
    return DataSpec(kind, path or None)


def _model_input(model: nn.Module) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    return tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"])


def num_classes_of(ds: Dataset) -> int | None:
    """Classes of a dataset built by :func:`build_dataset` (through a ``Subset`` too), or None if unknown."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    classes = getattr(base, "classes", None)
    return len(classes) if classes is not None else getattr(base, "num_classes", None)


def build_dataset(
    spec: str | DataSpec, split: str, model: nn.Module, train: bool = False, limit: int | None = None,
    skip_bad: bool = False, progress: bool = True,
) -> Dataset:
    """Build the dataset named by ``spec`` for ``split`` (train / val / trainval / test), shaped for ``model``.

    Checks that the data matches what the model expects (channels, image size, number of classes) and fails with a
    clear message if it does not.

    Args:
        limit: keep only the first ``limit`` images (must be at least 1).
        skip_bad: image folders: leave out unreadable images (listed on stderr) instead of stopping at the first.
        progress: show progress while ``skip_bad`` checks the images.
    """
    from ..analysis.macs import default_input_size

    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive number of images, got {limit!r}")
    _, mean, std = _model_input(model)
    input_size = default_input_size(model)
    if spec.kind == "fmnist":
        if input_size != (1, 28, 28):
            raise DataError(
                f"Fashion-MNIST images are 1x28x28 but the model expects {input_size[0]}x{input_size[1]}x"
                f"{input_size[2]}; use a leanvit_*_fm_* model or --data imagefolder:PATH"
            )
        ds = FashionMNIST(spec.path, split=split, train_aug=train, mean=mean, std=std, limit=limit)
    elif spec.kind == "imagefolder":
        ds = build_imagefolder(spec.path, model, train=train, split=split, skip_bad=skip_bad, progress=progress)
        if limit is not None:
            ds = Subset(ds, range(min(limit, len(ds))))
    else:
        n = int(spec.path) if spec.path else 256
        num_classes = getattr(model, "num_classes", 1000) or 1000
        ds = SyntheticImages(input_size, num_classes, size=n if limit is None else min(n, limit))
    if len(ds) == 0:
        raise DataError(f"data source '{spec}' ({split}) is empty")
    _check_classes(model, num_classes_of(ds), spec)
    return ds


def _check_classes(model: nn.Module, data_classes: int | None, spec: DataSpec) -> None:
    """The model's head must have one output per class of the data, or the labels do not line up with it."""
    head = getattr(model, "num_classes", None)
    if data_classes is None or head is None:
        return
    if head == 0:
        raise DataError(f"the model has no classifier head (num_classes=0); it cannot be evaluated or trained on "
                        f"'{spec}' ({data_classes} classes)")
    if head != data_classes:
        raise DataError(f"'{spec}' has {data_classes} classes but the model's head has {head} outputs; labels would "
                        f"not line up with the head. Give --num-classes {data_classes} to train a new head, or use "
                        f"data with the model's classes")
