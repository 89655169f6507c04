"""Datasets that need no download: Fashion-MNIST from IDX files, scikit-learn's digits, synthetic data; and
the user's own (:mod:`structprune.data.files`): ``imagefolder:DIR``, a ``.npz``/``.npy``/``.pt`` file of tensors,
or ``module:function``.

``load(name, split, ...)`` returns a ``TensorDataset`` of (images (N, C, H, W) float32, labels int64);
:func:`source` opens any of them with its shape and number of classes.
"""

from __future__ import annotations

from torch.utils.data import TensorDataset

from ..errors import StructPruneError
from . import digits, fashion_mnist, files, synthetic

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


class _Builtin:
    """One of :data:`DATASETS` with the interface of :class:`structprune.data.files.Source`."""

    def __init__(self, name: str, root: str | None, seed: int):
        self.spec, self.root, self.seed = name, root, seed
        self.shape, self.classes = shape(name), classes(name)
        self.image_size = self.mean = self.std = None  # what only an image folder has

    def load(self, split: str, limit: int | None = None):
        return load(self.spec, split, root=self.root, limit=limit, seed=self.seed)


def source(spec: str, root: str | None = None, seed: int = 0, image_size: int | tuple[int, int] | None = None,
           mean=None, std=None):
    """The dataset ``spec`` names: a name of :data:`DATASETS` (``root``: its files), ``imagefolder:DIR``, a
    ``.npz``/``.npy``/``.pt`` file or ``module:function`` (:mod:`structprune.data.files`; ``image_size``,
    ``mean`` and ``std`` shape an image folder). It has ``load(split, limit)``, ``shape`` (one sample's) and
    ``classes`` (None when it has no labels)."""
    if spec in DATASETS:
        return _Builtin(spec, root, seed)
    return files.Source(spec, image_size=image_size, mean=mean, std=std)
