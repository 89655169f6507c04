"""Datasets that need no download: Fashion-MNIST from IDX files, scikit-learn's digits, synthetic data.

``load(name, split, ...)`` returns a ``TensorDataset`` of (images (N, C, H, W) float32, labels int64).
"""

from __future__ import annotations

from torch.utils.data import TensorDataset

from ..errors import StructPruneError
from . import digits, fashion_mnist, synthetic

DATASETS = {
    "fashion-mnist": fashion_mnist.load,
    "digits": digits.load,
    "synthetic": synthetic.load,
}


def load(name: str, split: str = "train", root: str | None = None, limit: int | None = None,
         seed: int = 0) -> TensorDataset:
    """Load dataset ``name`` ("fashion-mnist", "digits" or "synthetic").

    split: "train" or "test". root: directory of the files (Fashion-MNIST: the IDX files; default
    ``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist``). limit: keep the
    first ``limit`` samples.
    """
    if name not in DATASETS:
        raise StructPruneError(f"data must be one of {', '.join(DATASETS)}; got {name!r}")
    if split not in ("train", "test"):
        raise StructPruneError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise StructPruneError(f"limit must be a positive number of samples, got {limit}")
    dataset = DATASETS[name](split=split, root=root, seed=seed)
    if limit is not None:
        dataset = TensorDataset(*(t[:limit] for t in dataset.tensors))
    return dataset


def shape(name: str) -> tuple[int, int, int]:
    """(channels, height, width) of one image of the dataset."""
    return {"fashion-mnist": (1, 28, 28), "digits": (1, 8, 8), "synthetic": synthetic.SHAPE}[name]


def classes(name: str) -> int:
    """Number of classes of the dataset (all three have 10)."""
    return 10
