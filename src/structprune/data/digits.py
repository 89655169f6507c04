"""scikit-learn's bundled 8×8 handwritten digits (1,797 images); needs scikit-learn installed."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from ..errors import StructPruneError


def load(split: str = "train", root: str | None = None, seed: int = 0) -> TensorDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise StructPruneError("data 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # fixed split
    cut = int(0.8 * len(y))
    idx = order[:cut] if split == "train" else order[cut:]
    return TensorDataset((x[idx] - 0.3) / 0.4, y[idx])
