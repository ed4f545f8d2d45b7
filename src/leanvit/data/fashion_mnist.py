"""Fashion-MNIST read straight from its idx files (Xiao et al. 2017).

No library reads these files without downloading them first (torchvision's ``FashionMNIST`` insists on its own
folder layout and a download step), so the few lines of idx parsing are written here.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The last VAL_SIZE training images form a held-out validation split used for early stopping and for tuning
# method hyper-parameters; the reference models are trained on the first 55,000 only.
VAL_SIZE = 5000
SPLITS = ("train", "val", "trainval", "test")


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        p = root / name
        if p.is_file():
            return p
    raise DataError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in {root}. Install the dataset with `{INSTALL_HINT}`, "
        f"or point to a folder holding the idx files with --data fmnist:PATH (or the LEANVIT_FMNIST env var)."
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise DataError(f"{path} is truncated or corrupt: header says {dims}, payload has {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_arrays(root: str | os.PathLike | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split."""
    if split not in SPLITS:
        raise DataError(f"unknown Fashion-MNIST split '{split}'; choose one of {', '.join(SPLITS)}")
    root = Path(root or os.environ.get("LEANVIT_FMNIST") or DEFAULT_ROOT)
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST folder {root} does not exist. Install the dataset with `{INSTALL_HINT}`, "
            f"or point to a folder holding the idx files with --data fmnist:PATH (or the LEANVIT_FMNIST env var)."
        )
    files = _FILES["test" if split == "test" else "train"]
    images = read_idx(_find(root, files[0]))
    labels = read_idx(_find(root, files[1])).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST files in {root} disagree: images {images.shape}, labels {labels.shape}")
    if split == "train":
        images, labels = images[:-VAL_SIZE], labels[:-VAL_SIZE]
    elif split == "val":
        images, labels = images[-VAL_SIZE:], labels[-VAL_SIZE:]
    return images, labels


class FashionMNIST(Dataset):
    """Fashion-MNIST as normalised float tensors ``(1, 28, 28)``.

    Args:
        root: folder with the four idx files (plain or ``.gz``); default ``/usr/share/datasets/fashion-mnist``.
        split: ``train`` (first 55k training images), ``val`` (last 5k), ``trainval`` (all 60k) or ``test`` (10k).
        train_aug: random 2-pixel-padded crop and horizontal flip, applied per sample with torch's global RNG
            (so a run is reproducible from its seed and its saved RNG state).
        mean, std: normalisation; defaults to the training-set statistics.
        limit: keep only the first ``limit`` images (for quick runs and tests).
    """

    classes = CLASSES

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        train_aug: bool = False,
        mean: tuple[float, ...] = (0.2860,),
        std: tuple[float, ...] = (0.3530,),
        limit: int | None = None,
    ):
        images, labels = load_arrays(root, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        self.targets = torch.from_numpy(labels.copy())
        self.train_aug = train_aug
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.split = split

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255.0)
        if self.train_aug:
            pad = 2
            x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, dy: dy + 28, dx: dx + 28]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.targets[i])
