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
           "FMNIST_CLASSES", "DATA_KINDS"]

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


def build_dataset(
    spec: str | DataSpec, split: str, model: nn.Module, train: bool = False, limit: int | None = None
) -> Dataset:
    """Build the dataset named by ``spec`` for ``split`` (train / val / trainval / test), shaped for ``model``.

    Checks that the data matches what the model expects (channels, image size) and fails with a clear message
    if it does not.
    """
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    input_size, mean, std = _model_input(model)
    if spec.kind == "fmnist":
        if input_size != (1, 28, 28):
            raise DataError(
                f"Fashion-MNIST images are 1x28x28 but the model expects {input_size[0]}x{input_size[1]}x"
                f"{input_size[2]}; use a leanvit_*_fm_* model or --data imagefolder:PATH"
            )
        ds = FashionMNIST(spec.path, split=split, train_aug=train, mean=mean, std=std, limit=limit)
    elif spec.kind == "imagefolder":
        sub = "train" if split in ("train", "trainval") else "val"
        ds = build_imagefolder(spec.path, model, train=train, split=sub)
        if limit is not None:
            ds = Subset(ds, range(min(limit, len(ds))))
    else:
        n = int(spec.path) if spec.path else 256
        num_classes = getattr(model, "num_classes", 1000) or 1000
        ds = SyntheticImages(input_size, num_classes, size=n if limit is None else min(n, limit))
    if len(ds) == 0:
        raise DataError(f"data source '{spec}' ({split}) is empty")
    return ds
