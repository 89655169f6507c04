"""Synthetic 16×16 images labelled by a fixed random teacher: learnable, instant, no files."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

SHAPE = (1, 16, 16)
SIZES = {"train": 2048, "test": 512}


def load(split: str = "train", root: str | None = None, seed: int = 0) -> TensorDataset:
    teacher = torch.Generator().manual_seed(99)
    projection = torch.randn(SHAPE[1] * SHAPE[2], 10, generator=teacher)
    gen = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1))
    x = torch.randn(SIZES[split], *SHAPE, generator=gen)
    smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    y = (smooth.flatten(1) @ projection).argmax(dim=1)
    return TensorDataset(smooth / smooth.std(), y)
