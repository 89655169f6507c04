"""Calibration and evaluation data from the user's own files: an image folder, tensors in a file, or a
``module:function`` that returns a dataset.

* ``imagefolder:DIR``: one sub-folder per class (sorted names are the labels), or the images in ``DIR`` itself
  (no labels: for distillation and calibration), images of any size read with
  Pillow, converted to RGB, resized to ``image_size`` × ``image_size`` (default: the images' own size when they
  share one, else 224) and normalised with ``mean``/``std`` (default: ImageNet's, what torchvision's and timm's
  pretrained models expect). ``DIR/train`` and ``DIR/test`` (or ``DIR/val``) are the two splits when they exist;
  otherwise one seeded 80/20 split of ``DIR``. What was converted (greyscale or RGBA images, other sizes, files
  that are not images) is reported in one line, and resizing up by more than 2× is warned about.
* ``.npz``, ``.npy`` or ``.pt`` file: inputs ``x`` (N, ...) and labels ``y`` (N,) — ``.npz`` arrays / a ``.pt``
  dict (read with ``weights_only=True``) with keys ``x``/``y`` or ``x_train``, ``y_train``, ``x_test``,
  ``y_test``; a bare ``.npy`` array or ``.pt`` tensor is inputs without labels. Without ``*_test`` keys the
  samples are split 80/20 by a seeded shuffle.
* ``module:function``: ``function(split="train"|"test")`` (or ``function()`` when it takes no ``split``)
  returning a ``Dataset`` of ``(input, label)`` or inputs, or tensors ``x`` / ``(x, y)``. Labels are integer
  classes; their number is the dataset's ``classes`` (a list or a count) where it has one, else counted from the
  labels. This runs the user's own code: it is named on the command line, never read from a file.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import StructPruneError, first_line
from ..safe_io import import_module

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
TENSOR_SUFFIXES = (".npz", ".npy", ".pt")
HELD_OUT = 0.2
DEFAULT_IMAGE_SIZE = 224
#: images whose header is read to find the folder's size and modes (evenly spread over the folder)
SCANNED_IMAGES = 10_000

log = logging.getLogger("structprune")


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
    """Images under ``root/<class>/``, read when indexed: ((3, size, size) float tensor, class index); without
    classes (``classes`` is ``[""]``: the images lie in ``root`` itself), the image tensor alone."""

    def __init__(self, root: Path, classes: list[str], image_size: tuple[int, int], mean, std):
        self.labelled = classes != [""]
        self.files = [(path, label) for label, name in enumerate(classes)
                      for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
        #: files in the class folders that are not images (left out)
        self.others = sum(1 for name in classes for path in (root / name).rglob("*")
                          if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES)
        if not self.files:
            raise StructPruneError(f"--data imagefolder:{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                   f"in its class folders")
        self.image_size = image_size  # (height, width)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image  # a dependency of matplotlib, which structprune requires

        path, label = self.files[i]
        try:
            with Image.open(path) as image:
                height, width = self.image_size
                image = image.convert("RGB")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.BILINEAR)
                pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        except (OSError, ValueError) as exc:
            raise StructPruneError(f"--data: {path} is not a readable image ({first_line(exc)})") from None
        image = (pixels.permute(2, 0, 1) / 255 - self.mean) / self.std
        return (image, label) if self.labelled else image


class Source:
    """A dataset named by the user: its two splits, one sample's shape and its number of classes."""

    def __init__(self, spec: str, image_size: int | tuple[int, int] | None = None, mean=None, std=None):
        self.spec = spec
        #: an image folder's (height, width) as read (None until one is opened; --image-size N: (N, N))
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.mean, self.std = tuple(mean or IMAGENET_MEAN), tuple(std or IMAGENET_STD)
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise StructPruneError(f"--image-size must be positive, got {image_size}")
        self.image_size = None if self.image_size is None else tuple(int(v) for v in self.image_size)
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
        if len(parts) < 2:
            parts = {"": root}
        first = next(iter(parts.values()))
        classes = sorted(p.name for p in first.iterdir() if p.is_dir())
        if not classes and any(p.suffix.lower() in IMAGE_SUFFIXES for p in first.iterdir()):
            classes = [""]  # images without labels, for distillation and calibration
        if not classes:
            raise StructPruneError(f"--data imagefolder:{root}: no class sub-folders (one folder per class) and no "
                                   f"images in it")
        asked = self.image_size
        folders = {s: ImageFolder(d, classes, (1, 1), self.mean, self.std) for s, d in parts.items()}
        self.image_size = _image_size(root, [f for folder in folders.values() for f, _ in folder.files], asked,
                                      sum(folder.others for folder in folders.values()))
        for folder in folders.values():
            folder.image_size = self.image_size
        if "" in folders:
            self._splits = {s: _split(folders[""], s, seed=0) for s in ("train", "test")}
        else:
            self._splits = folders
        self.classes = len(classes) if classes != [""] else None

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
        function = import_module(module_name, f"--data {spec}")
        for part in qualname.split("."):
            function = getattr(function, part, None)
            if function is None:
                raise StructPruneError(f"--data {spec}: {module_name} has no {qualname}")
        if "split" in inspect.signature(function).parameters:
            self._splits = {s: self._dataset_of(spec, function(split=s)) for s in ("train", "test")}
        else:
            whole = self._dataset_of(spec, function())
            self._splits = {s: _split(whole, s, seed=0) for s in ("train", "test")}
        if self.classes is None:
            self.classes = _classes(spec, self._splits)


def _classes(spec: str, splits: dict[str, Dataset]) -> int | None:
    """The number of classes of a user's dataset: its ``classes`` (a list of names or a count), else counted from
    the integer labels of its ``(input, label)`` samples (its ``targets`` where it has them); None without labels."""
    train = splits["train"]
    named = getattr(train, "classes", None)
    if isinstance(named, (list, tuple)):
        return len(named)
    if isinstance(named, int):
        return named
    sample = train[0]
    if not isinstance(sample, (tuple, list)) or len(sample) < 2 or not _is_label(sample[1]):
        return None
    labels = []
    for dataset in splits.values():
        targets = getattr(dataset, "targets", None)
        labels += list(targets) if targets is not None else [dataset[i][1] for i in range(len(dataset))]
    if not all(_is_label(y) for y in labels) or min(int(y) for y in labels) < 0:
        raise StructPruneError(f"--data {spec}: labels must be class indices (integers from 0); set the dataset's "
                               f"classes, or return inputs alone for unlabelled data")
    return max(int(y) for y in labels) + 1


def _is_label(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_floating_point()
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


_MODES = {"1": "black-and-white", "L": "greyscale", "LA": "greyscale with alpha", "P": "palette", "I": "32-bit integer",
          "I;16": "16-bit greyscale", "F": "floating-point", "CMYK": "CMYK", "RGBA": "RGBA", "YCbCr": "YCbCr"}


def _image_size(root: Path, files: list[Path], asked: tuple[int, int] | None, others: int) -> tuple[int, int]:
    """The (height, width) an image folder is read at: ``asked`` (--image-size), else the images' own when they
    share one, else 224×224. Reports in one line what reading converts, and warns when that resizes images up
    by more than 2×."""
    from PIL import Image  # a dependency of matplotlib, which structprune requires

    step = max(1, len(files) // SCANNED_IMAGES)
    sizes, modes = Counter(), Counter()
    for path in files[::step]:
        try:
            with Image.open(path) as image:  # the header only
                sizes[(image.height, image.width)] += 1
                modes[image.mode] += 1
        except (OSError, ValueError) as exc:
            raise StructPruneError(f"--data: {path} is not a readable image ({first_line(exc)})") from None
    own = sizes.most_common(1)[0][0]
    size = asked or (own if len(sizes) == 1 else (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))
    scanned = sum(sizes.values())
    notes = [f"{n} {_MODES.get(mode, mode)} converted to RGB" for mode, n in sorted(modes.items()) if mode != "RGB"]
    resized = scanned - sizes.get(size, 0)
    if resized:
        notes.append(f"{resized} resized to {size[0]}×{size[1]}")
    if others:
        notes.append(f"{others} file(s) that are not images left out")
    read = f"{scanned} of {len(files)}" if scanned < len(files) else f"{len(files)}"
    log.info(f"--data imagefolder:{root}: {read} images read at {size[0]}×{size[1]}"
             + (f" ({'; '.join(notes)})" if notes else ""))
    scale = max(size[0] / own[0], size[1] / own[1])
    if scale > 2:  # the images' most common size, read more than twice as large
        warnings.warn(f"structprune: --data imagefolder:{root}: images of {own[0]}×{own[1]} are read at "
                      f"{size[0]}×{size[1]}, {scale:.3g}× their size (the model runs on {scale * scale:.3g}× the "
                      f"pixels for no more detail); pass --image-size {max(own)} to read them at their own size",
                      stacklevel=3)
    return size
