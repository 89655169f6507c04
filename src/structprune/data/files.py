"""Calibration and evaluation data from the user's own files: an image folder, tensors in a file, or a
``module:function`` that returns a dataset.

* ``imagefolder:DIR``: one sub-folder per class (sorted names are the labels), images of any size read with
  Pillow, converted to RGB, resized to ``image_size`` × ``image_size`` and normalised with ``mean``/``std``
  (default: ImageNet's, what torchvision's and timm's pretrained models expect). ``DIR/train`` and ``DIR/test``
  (or ``DIR/val``) are the two splits when they exist; otherwise one seeded 80/20 split of ``DIR``.
* ``.npz``, ``.npy`` or ``.pt`` file: inputs ``x`` (N, ...) and labels ``y`` (N,) — ``.npz`` arrays / a ``.pt``
  dict (read with ``weights_only=True``) with keys ``x``/``y`` or ``x_train``, ``y_train``, ``x_test``,
  ``y_test``; a bare ``.npy`` array or ``.pt`` tensor is inputs without labels. Without ``*_test`` keys the
  samples are split 80/20 by a seeded shuffle.
* ``module:function``: ``function(split="train"|"test")`` (or ``function()`` when it takes no ``split``)
  returning a ``Dataset`` of ``(input, label)`` or inputs, or tensors ``x`` / ``(x, y)``. This runs the user's
  own code: it is named on the command line, never read from a file.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import StructPruneError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TENSOR_SUFFIXES = (".npz", ".npy", ".pt")
HELD_OUT = 0.2


class Inputs(Dataset):
    """Unlabelled inputs: each item is the input alone (a calibration batch is then just ``x``)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def _split(dataset: Dataset, split: str, seed: int) -> Dataset:
    """The ``split`` part of a seeded 80/20 shuffle (the same seed gives the same parts)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = len(order) - max(1, int(round(HELD_OUT * len(order)))) if len(order) > 1 else len(order)
    return Subset(dataset, order[:cut] if split == "train" else order[cut:])


class ImageFolder(Dataset):
    """Images under ``root/<class>/``, read when indexed: ((3, size, size) float tensor, class index)."""

    def __init__(self, root: Path, classes: list[str], image_size: int, mean, std):
        self.files = [(path, label) for label, name in enumerate(classes)
                      for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise StructPruneError(f"--data imagefolder:{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                   f"in its class folders")
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image  # a dependency of matplotlib, which structprune requires

        path, label = self.files[i]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
                pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        except (OSError, ValueError) as exc:
            raise StructPruneError(f"--data: {path} is not a readable image ({first_line(exc)})") from None
        return (pixels.permute(2, 0, 1) / 255 - self.mean) / self.std, label


class Source:
    """A dataset named by the user: its two splits, one sample's shape and its number of classes."""

    def __init__(self, spec: str, image_size: int | None = None, mean=None, std=None):
        self.spec = spec
        self.image_size = 224 if image_size is None else image_size
        self.mean, self.std = tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)
        if self.image_size < 1:
            raise StructPruneError(f"--image-size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise StructPruneError(f"--mean and --std need three values (RGB), std positive; got {self.mean}, "
                                   f"{self.std}")
        self._splits: dict[str, Dataset] = {}
        self.classes: int | None = None
        self._open()

    def _open(self) -> None:
        spec = self.spec
        if spec.startswith("imagefolder:"):
            self._image_folder(Path(spec.partition(":")[2]))
        elif spec.endswith(TENSOR_SUFFIXES):
            self._tensors(Path(spec))
        elif ":" in spec:
            self._function(spec)
        else:
            raise StructPruneError(f"--data {spec!r}: not a dataset name, imagefolder:DIR, a .npz/.npy/.pt file "
                                   f"or module:function")

    def load(self, split: str, limit: int | None = None) -> Dataset:
        dataset = self._splits[split]
        return Subset(dataset, range(min(limit, len(dataset)))) if limit is not None else dataset

    @property
    def shape(self) -> tuple[int, ...]:
        sample = self._splits["train"][0]
        x = sample[0] if isinstance(sample, (tuple, list)) else sample
        return tuple(torch.as_tensor(x).shape)

    def _image_folder(self, root: Path) -> None:
        if not root.is_dir():
            raise StructPruneError(f"--data imagefolder:{root}: no such directory")
        parts = {split: root / name for split, names in (("train", ("train",)), ("test", ("test", "val")))
                 for name in names if (root / name).is_dir()}
        if len(parts) == 2:
            classes = sorted(p.name for p in parts["train"].iterdir() if p.is_dir())
            self._splits = {s: ImageFolder(d, classes, self.image_size, self.mean, self.std) for s, d in parts.items()}
        else:
            classes = sorted(p.name for p in root.iterdir() if p.is_dir())
            whole = ImageFolder(root, classes, self.image_size, self.mean, self.std)
            self._splits = {s: _split(whole, s, seed=0) for s in ("train", "test")}
        if not classes:
            raise StructPruneError(f"--data imagefolder:{root}: no class sub-folders (one folder per class)")
        self.classes = len(classes)

    def _tensors(self, path: Path) -> None:
        if not path.is_file():
            raise StructPruneError(f"--data {path}: no such file")
        try:
            if path.suffix == ".pt":
                raw = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never code
            elif path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as arrays:
                    raw = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
            else:
                raw = torch.from_numpy(np.load(path, allow_pickle=False))
        except Exception as exc:
            raise StructPruneError(f"--data {path}: not readable as tensors ({first_line(exc)})") from None
        if isinstance(raw, (tuple, list)) and len(raw) == 2:
            raw = {"x": raw[0], "y": raw[1]}
        if isinstance(raw, torch.Tensor):
            raw = {"x": raw}
        if not isinstance(raw, dict) or not ({"x"} <= set(raw) or {"x_train", "x_test"} <= set(raw)):
            raise StructPruneError(f"--data {path}: expected arrays x (and y), or x_train, y_train, x_test, y_test; "
                                   f"got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
        if "x_train" in raw:
            self._splits = {s: self._tensor_dataset(path, raw[f"x_{s}"], raw.get(f"y_{s}")) for s in ("train", "test")}
        else:
            whole = self._tensor_dataset(path, raw["x"], raw.get("y"))
            self._splits = {s: _split(whole, s, seed=0) for s in ("train", "test")}

    def _tensor_dataset(self, path: Path, x, y) -> Dataset:
        x = torch.as_tensor(x)
        x = x.float() if x.is_floating_point() or x.dtype == torch.uint8 else x
        if y is None:
            return Inputs(x)
        y = torch.as_tensor(y).long().reshape(-1)
        if len(y) != len(x):
            raise StructPruneError(f"--data {path}: {len(x)} inputs but {len(y)} labels")
        self.classes = max(self.classes or 0, int(y.max()) + 1)
        return TensorDataset(x, y)

    def _dataset_of(self, spec: str, out) -> Dataset:
        if isinstance(out, torch.Tensor):
            out = Inputs(out)
        elif isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
            out = self._tensor_dataset(Path(spec), *out)
        if not isinstance(out, Dataset) or len(out) == 0:
            raise StructPruneError(f"--data {spec}: returned {type(out).__name__}, not a non-empty Dataset or tensors")
        return out

    def _function(self, spec: str) -> None:
        module_name, _, qualname = spec.partition(":")
        try:
            function = importlib.import_module(module_name)
            for part in qualname.split("."):
                function = getattr(function, part)
        except (ImportError, AttributeError) as exc:
            raise StructPruneError(f"--data {spec}: cannot import it ({first_line(exc)})") from None
        if "split" in inspect.signature(function).parameters:
            self._splits = {s: self._dataset_of(spec, function(split=s)) for s in ("train", "test")}
        else:
            whole = self._dataset_of(spec, function())
            self._splits = {s: _split(whole, s, seed=0) for s in ("train", "test")}
        if self.classes is None:
            self.classes = getattr(self._splits["train"], "classes", None)
            self.classes = len(self.classes) if isinstance(self.classes, (list, tuple)) else self.classes
