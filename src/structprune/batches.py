"""Calibration batches and running a model on them.

A batch is ``x``, ``(x, y, ...)`` or a dict of keyword inputs; the model inputs in it are a tensor, a tuple of
positional tensors or a dict. :class:`Calibration` reads the calibration loader once (or, streamed, once per
pass) and hands every part of the pipeline the same samples, moved to the model's device and cast to its dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from .errors import StructPruneError


def run_forward(model: nn.Module, example_inputs):
    """Call ``model`` on a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def output_tensors(value) -> list[Tensor]:
    """The tensors in a module's or model's output: a tensor, tuples/lists/dicts of them, or a ModelOutput."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in output_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in output_tensors(v)]
    return []


def batch_inputs(batch):
    """The model inputs in one calibration batch: ``x``, ``(x, y, ...)`` or a dict of keyword inputs."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise StructPruneError("calib_loader yielded an empty batch")
        return batch[0]
    return batch


def batch_size(inputs) -> int:
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    if not isinstance(inputs, Tensor):
        raise StructPruneError(f"calib_loader must yield tensors, (inputs, targets) pairs or dicts; "
                               f"got {type(inputs).__name__}")
    return inputs.shape[0]


def take_samples(inputs, n: int | None, device, dtype: torch.dtype | None = None):
    """The first n samples (all when None) of a batch (tensor, tuple or dict of tensors), on ``device``;
    floating-point tensors are cast to ``dtype`` when given (the model's), integer ones (token ids,
    labels) are left as they are."""
    if isinstance(inputs, dict):
        return {k: take_samples(v, n, device, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(take_samples(v, n, device, dtype) for v in inputs)
    if isinstance(inputs, Tensor):
        inputs = inputs[:n] if n is not None else inputs
        return inputs.to(device, dtype if dtype is not None and inputs.is_floating_point() else None)
    return inputs


def first_batches(batches: Iterable, samples: int) -> Iterator:
    """The first whole batches of ``batches`` that hold at least ``samples`` samples (no batch cut short: a
    training-mode BatchNorm needs more than one value per channel)."""
    seen = 0
    for batch in batches:
        if seen >= samples:
            return
        yield batch
        seen += batch_size(batch_inputs(batch))


def _iterate(loader: Iterable) -> Iterator:
    try:
        return iter(loader)
    except TypeError:
        raise StructPruneError(f"calib_loader must be iterable, got {type(loader).__name__}") from None


def _split(batch) -> tuple:
    """(inputs, targets) of a raw batch (targets None for a batch without them)."""
    target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    return batch_inputs(batch), target


def read_batches(calib_loader: Iterable, max_samples: int, device, dtype: torch.dtype | None = None,
                 batches: Iterator | None = None) -> Iterator[tuple]:
    """(inputs, targets) of each batch until ``max_samples`` samples, on ``device``, floating-point inputs
    cast to ``dtype`` (targets None for a batch without them). ``batches``: raw batches to read instead of a
    new pass over the loader (the rest of one begun elsewhere)."""
    seen = 0
    for batch in _iterate(calib_loader) if batches is None else batches:
        inputs, target = _split(batch)
        n = min(batch_size(inputs), max_samples - seen)
        if n <= 0:
            break
        yield (take_samples(inputs, n, device, dtype),
               take_samples(target, n, device) if isinstance(target, Tensor) else None)
        seen += n
        if seen >= max_samples:
            break


def materialize(calib_loader: Iterable, max_samples: int, device, dtype: torch.dtype | None = None
                ) -> tuple[list, list]:
    """Read up to ``max_samples`` calibration samples once, so every group sees the same samples.

    Returns the model inputs of each batch and its targets (see :func:`read_batches`).
    """
    pairs = list(read_batches(calib_loader, max_samples, device, dtype))
    if not pairs:
        raise _no_samples()
    return [inputs for inputs, _ in pairs], [target for _, target in pairs]


def _no_samples() -> StructPruneError:
    return StructPruneError("calib_loader yielded no samples: pass a loader with at least one batch")


class Calibration:
    """The calibration samples every group is captured on.

    In memory (default): the first ``max_samples`` samples are read once and kept on the model's device.
    Streamed (``stream=True``): nothing is kept; every pass re-reads ``loader`` (which must then give the
    same samples in the same order each time: a DataLoader without shuffling, a list, ...) and moves
    one batch at a time to the device, so memory does not grow with the calibration set.
    Iterating yields (inputs, targets) per batch (targets None when the batch has none);
    ``samples`` counts the samples and ``labelled`` says whether every batch has targets.

    ``max_samples=None`` reads nothing yet: :meth:`first` then reads the first batch alone (an example input,
    before the number of samples is known) and :meth:`read` reads on from there, so the loader is gone through
    once however the two are combined.
    """

    def __init__(self, loader: Iterable, max_samples: int | None, device, dtype: torch.dtype | None = None,
                 stream: bool = False):
        self.loader, self.max_samples, self.device, self.dtype, self.stream = loader, max_samples, device, dtype, stream
        self._batches: list | None = None
        self._pending: tuple[Iterator, object] | None = None  # (the pass begun by first(), its first raw batch)
        self.samples, self.labelled, self._fingerprint = 0, True, None
        if max_samples is not None:
            self.read(max_samples)

    def read(self, max_samples: int) -> None:
        """Read the first ``max_samples`` samples (in memory), or count them (streamed)."""
        self.max_samples = max_samples
        batches = None
        if self._pending is not None:  # go on with the pass that first() began
            rest, head = self._pending
            batches, self._pending = _chain(head, rest), None
        pairs = read_batches(self.loader, max_samples, self.device, self.dtype, batches)
        if self.stream:
            self.samples, self.labelled = 0, True
            for inputs, target in pairs:
                self._fingerprint = self._fingerprint if self.samples else _fingerprint(inputs)
                self.samples += batch_size(inputs)
                self.labelled = self.labelled and target is not None
            if self.samples == 0:
                raise _no_samples()
        else:
            self._batches = list(pairs)
            if not self._batches:
                raise _no_samples()
            self._count_batches()

    @classmethod
    def of(cls, batches: list, targets: list | None = None) -> Calibration:
        """In-memory calibration from batches already on the model's device (and their targets)."""
        calib = cls.__new__(cls)
        calib.loader, calib.max_samples, calib.device, calib.dtype, calib.stream = batches, None, None, None, False
        calib._pending, calib._fingerprint = None, None
        calib._batches = list(zip(batches, targets or [None] * len(batches), strict=True))
        calib._count_batches()
        return calib

    def _count_batches(self) -> None:
        self.samples = sum(batch_size(inputs) for inputs, _ in self._batches)
        self.labelled = all(target is not None for _, target in self._batches)

    def __iter__(self) -> Iterator[tuple]:
        if self._batches is not None:
            yield from self._batches
            return
        seen = 0
        for inputs, target in read_batches(self.loader, self.max_samples, self.device, self.dtype):
            if seen == 0 and _fingerprint(inputs) != self._fingerprint:
                seen = -1
                break
            seen += batch_size(inputs)
            yield inputs, target
        if seen != self.samples:
            raise StructPruneError("stream: the calibration loader gave other samples on this pass than on the "
                                   "first; a streamed loader must give the same samples every pass (no shuffling)")

    def first(self):
        """The inputs of the first batch (before :meth:`read`: that batch alone is read, whole)."""
        if self._batches is not None:
            return self._batches[0][0]
        if self.max_samples is not None:
            return next(iter(self))[0]
        if self._pending is None:
            rest = _iterate(self.loader)
            head = next(rest, _END)
            if head is _END:
                raise _no_samples()
            self._pending = (rest, head)
        return take_samples(_split(self._pending[1])[0], None, self.device, self.dtype)


_END = object()


def _chain(head, rest: Iterator) -> Iterator:
    yield head
    yield from rest


def _fingerprint(inputs) -> float:
    """A cheap checksum of a batch, to notice a streamed loader that shuffles."""
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return float(inputs.double().sum())
