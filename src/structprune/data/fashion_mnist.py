"""Fashion-MNIST (Xiao et al. 2017) from IDX files, gzipped or not.

On Debian: ``apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import StructPruneError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# per-pixel statistics of the training set, so inputs are roughly zero-mean, unit-variance
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dims, then big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise StructPruneError(f"data: cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise StructPruneError(f"data: {path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise StructPruneError(f"data: {path} is truncated ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise StructPruneError(f"data: {stem}[.gz] not found in {root}; install Debian's dataset-fashion-mnist "
                           f"or pass --data-dir with the IDX files")


def load(split: str = "train", root: str | None = None, seed: int = 0) -> TensorDataset:
    root_path = Path(root or DEFAULT_ROOT)
    if not root_path.is_dir():
        raise StructPruneError(f"data: directory {root_path} does not exist; install Debian's "
                               f"dataset-fashion-mnist or pass --data-dir")
    images_file, labels_file = _FILES[split]
    images = read_idx(_find(root_path, images_file))
    labels = read_idx(_find(root_path, labels_file))
    if len(images) != len(labels):
        raise StructPruneError(f"data: {len(images)} images but {len(labels)} labels in {root_path}")
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - MEAN) / STD
    return TensorDataset(x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
