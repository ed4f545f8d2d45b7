"""Random images of a model's input size, for speed benchmarks (weights and data do not matter for timing)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticImages(Dataset):
    """``size`` random normal images of shape ``input_size`` with random labels in ``[0, num_classes)``.

    Deterministic: image ``i`` is drawn from a generator seeded with ``seed + i``.
    """

    def __init__(self, input_size: tuple[int, int, int], num_classes: int = 1000, size: int = 256, seed: int = 0):
        self.input_size = tuple(input_size)
        self.num_classes = num_classes
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed + i)
        x = torch.randn(self.input_size, generator=g)
        return x, int(torch.randint(0, self.num_classes, (), generator=g))
