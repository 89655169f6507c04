"""Collect a group's hidden representation, as each consumer reads it, on calibration data.

Rows and memory bound
---------------------
For a consumer reading C group channels with K taps each (K = kernel positions of a conv, the
``H*W`` features of a Linear after a Flatten, or the head size of an attention head), ``rows_cap =
ROWS_PER_FEATURE·C·K`` rows are kept (32 per feature, at least one per sample), and never more than
``memory_bytes / (4*C*K)`` (plus at most one per batch from rounding), where a row is one output position
of one sample. A Linear on a (N, features) input has one row per sample; on a (N, L, features) sequence,
one per token (padding tokens, those with a 0 in the batch's ``attention_mask``, are left out); a conv
output has one per output position. While ``rows_cap`` is at least the number of samples, each sample
contributes ``rows_cap // samples`` rows drawn at random (seeded); beyond that, each batch contributes its
share of ``rows_cap``. Only the patches at the drawn positions are ever materialised, so peak memory is
about ``memory_bytes`` per consumer plus one calibration batch's activations, however many samples there are.

Why 32 rows per feature: the rows feed least-squares problems in C·K unknowns (the refit; ThiNet's and
GFS's fits) and correlations over them (i-SpaSP). For ordinary least squares with p unknowns and n rows
the expected excess error of the fit grows as p/n (the classical σ²·p/n risk of a regression, e.g. Hastie,
Tibshirani & Friedman, *The Elements of Statistical Learning*, §3.2), about 3% at n = 32·p. More rows cost
time in proportion and measured no better: benchmarks/rows.py (results/rows.md) prunes the Fashion-MNIST
checkpoints with every row count up to the memory bound's.

The calibration samples themselves are kept in memory (read once, so every group sees the same
samples) unless ``stream=True`` (:class:`Calibration`): then each pass re-reads the loader and only one
batch is in memory at a time. Defaults: 1,280 samples (i-SpaSP's released recipe) and 256 MiB.

What needs every position, not only the drawn rows, is reduced as the batches pass: each channel's sum
per sample (i-SpaSP's aggregate activation, each position of H counted once) and, when asked, PFP's
sensitivities over every position of the first samples. Each conv row also records which of its taps
lie on the zero padding. With a reference model, the original layer's output at the same rows is kept
as the reconstruction target. A forward pass stops as soon as every consumer has read its input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .errors import StructPruneError, first_line
from .graph import Consumer, Group, Producer, rows_first, run_forward
from .methods.base import ConsumerView, GroupView, ProducerView
from .resume import ActivationCache

DEFAULT_MEMORY_BYTES = 256 * 2**20
#: rows kept per captured feature (C·K; see the module doc); 0: as many as ``memory_bytes`` allows
ROWS_PER_FEATURE = 32
_SCORE_ELEMENTS = 2**22  # input elements (× taps) scored at once for PFP's sensitivities


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


def read_batches(calib_loader: Iterable, max_samples: int, device, dtype: torch.dtype | None = None
                 ) -> Iterator[tuple]:
    """(inputs, targets) of each batch until ``max_samples`` samples, on ``device``, floating-point inputs
    cast to ``dtype`` (targets None for a batch without them)."""
    seen = 0
    try:
        iterator = iter(calib_loader)
    except TypeError:
        raise StructPruneError(f"calib_loader must be iterable, got {type(calib_loader).__name__}") from None
    for batch in iterator:
        inputs = batch_inputs(batch)
        n = min(batch_size(inputs), max_samples - seen)
        if n <= 0:
            break
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
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
        raise StructPruneError("calib_loader yielded no samples: pass a loader with at least one batch")
    return [inputs for inputs, _ in pairs], [target for _, target in pairs]


class Calibration:
    """The calibration samples every group is captured on.

    In memory (default): the first ``max_samples`` samples are read once and kept on the model's device.
    Streamed (``stream=True``): nothing is kept; every pass re-reads ``loader`` (which must then give the
    same samples in the same order each time: a DataLoader without shuffling, a list, ...) and moves
    one batch at a time to the device, so memory does not grow with the calibration set.
    Iterating yields (inputs, targets) per batch (targets None when the batch has none);
    ``samples`` counts the samples and ``labelled`` says whether every batch has targets.
    """

    def __init__(self, loader: Iterable, max_samples: int, device, dtype: torch.dtype | None = None,
                 stream: bool = False):
        self.loader, self.max_samples, self.device, self.dtype, self.stream = loader, max_samples, device, dtype, stream
        self._batches: list | None = None
        if stream:
            self.samples, self.labelled, self._fingerprint = 0, True, None
            for inputs, target in self._read():
                self._fingerprint = self._fingerprint if self.samples else _fingerprint(inputs)
                self.samples += batch_size(inputs)
                self.labelled = self.labelled and target is not None
            if self.samples == 0:
                raise StructPruneError("calib_loader yielded no samples: pass a loader with at least one batch")
        else:
            self._batches = list(zip(*materialize(loader, max_samples, device, dtype), strict=True))
            self._count_batches()

    @classmethod
    def of(cls, batches: list, targets: list | None = None) -> Calibration:
        """In-memory calibration from batches already on the model's device (and their targets)."""
        calib = cls.__new__(cls)
        calib.loader, calib.max_samples, calib.device, calib.dtype, calib.stream = batches, None, None, None, False
        calib._batches = list(zip(batches, targets or [None] * len(batches), strict=True))
        calib._count_batches()
        return calib

    def _count_batches(self) -> None:
        self.samples = sum(batch_size(inputs) for inputs, _ in self._batches)
        self.labelled = all(target is not None for _, target in self._batches)

    def _read(self) -> Iterator[tuple]:
        return read_batches(self.loader, self.max_samples, self.device, self.dtype)

    def __iter__(self) -> Iterator[tuple]:
        if self._batches is not None:
            yield from self._batches
            return
        seen = 0
        for inputs, target in self._read():
            if seen == 0 and _fingerprint(inputs) != self._fingerprint:
                seen = -1
                break
            seen += batch_size(inputs)
            yield inputs, target
        if seen != self.samples:
            raise StructPruneError("stream: the calibration loader gave other samples on this pass than on the "
                                   "first; a streamed loader must give the same samples every pass (no shuffling)")

    def first(self):
        """The inputs of the first batch."""
        return next(iter(self))[0]


def _fingerprint(inputs) -> float:
    """A cheap checksum of a batch, to notice a streamed loader that shuffles."""
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return float(inputs.double().sum())


class _RowCollector:
    """Forward pre-hook on one consumer: turns its input into rows (M, C, K) at sampled positions, and
    keeps what needs every position: per-sample sums of each channel and, when asked, PFP's sensitivities
    over every position of the first ``sensitivity_samples`` samples (``zero_below``: PFP's option)."""

    def __init__(self, consumer: Consumer, rows_cap: int, samples: int, generator: torch.Generator,
                 sensitivity_samples: int = 0, zero_below: float = 0.0):
        self.consumer = consumer
        self.rows_cap, self.samples = rows_cap, samples
        self.generator = generator
        self.sensitivity_samples = sensitivity_samples
        self.zero_below = zero_below
        self.chunks: list[Tensor] = []
        self.masks: list[Tensor] = []  # (rows, taps) real-position taps of conv rows
        self.row_samples: list[Tensor] = []
        self.sums: list[Tensor] = []  # (batch, channels) per-sample channel sums
        self._sums_of = -1  # the batch (its first sample) the last sums belong to
        self.sensitivity: Tensor | None = None
        self.seen = 0  # samples before this batch (set by the capture loop: a layer may run twice per batch)
        self.token_mask: Tensor | None = None  # (N, L) attention mask of the batch, when it has one
        self.picked: Tensor | None = None  # the rows (positions) drawn from the last batch

    def __call__(self, module: nn.Module, args) -> None:
        x = args[0].detach()
        batch = x.shape[0]
        if self.consumer.kind == "conv":
            self._conv_rows(module, x)
        else:
            self._linear_rows(x)
        scored = min(batch, self.sensitivity_samples - self.seen)
        if scored > 0:
            self._score(module, x[:scored])

    def _score(self, module: nn.Module, x: Tensor) -> None:
        """PFP's sensitivities on every row of ``x``, a few samples at a time (bounded memory)."""
        from .methods.pfp import consumer_sensitivity, conv_sensitivity, conv_sensitivity_applies

        per_sample = max(1, x[0].numel() * (module.weight[0, 0].numel() if self.consumer.kind == "conv" else 1))
        step = max(1, _SCORE_ELEMENTS // per_sample)  # unfolded elements: what the evaluation may form
        if self.consumer.kind == "conv" and conv_sensitivity_applies(module):  # its input as it is, not unfolded
            for start in range(0, x.shape[0], step):
                self.sensitivity = conv_sensitivity(x[start:start + step], module, self.consumer.channel_index,
                                                    floor=self.sensitivity, zero_below=self.zero_below)
            return
        weight = self.consumer.flat_weight()
        features = self.consumer.input_features()
        for start in range(0, x.shape[0], step):
            chunk = x[start:start + step]
            rows = _all_rows(module, chunk, self.consumer.kind, self._mask(chunk.shape[0], chunk))
            row_sample = None  # a Linear layer's rows stand alone; a conv's rows of one sample are its positions
            if self.consumer.kind == "conv":
                row_sample = torch.arange(len(chunk), device=rows.device).repeat_interleave(len(rows) // len(chunk))
            self.sensitivity = consumer_sensitivity(rows, weight, features, floor=self.sensitivity,
                                                    row_sample=row_sample, zero_below=self.zero_below)

    def _mask(self, n: int, x: Tensor) -> Tensor | None:
        mask = self.token_mask
        if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            return mask[:n].to(x.device) != 0
        return None

    def _wanted(self, n: int) -> int:
        """Rows to keep from a batch of n samples: the same whole number per sample while the cap allows
        one row per sample or more, else the batch's share of the cap (bounded however many samples)."""
        if self.rows_cap >= self.samples:
            return n * (self.rows_cap // self.samples)
        return math.ceil(self.rows_cap * n / self.samples)

    def _pick(self, total: int, wanted: int, device) -> Tensor:
        if wanted >= total:
            return torch.arange(total, device=device)
        return torch.randperm(total, generator=self.generator)[:wanted].sort().values.to(device)

    def _add_sums(self, sums: Tensor) -> None:
        """Per-sample channel sums of this batch; a layer that runs twice per batch adds to the same samples.
        A NaN or an Inf among the group's input channels makes its sum one (a sum of finite values overflows
        only near float32's range): the check costs no pass over the activations of its own."""
        if not torch.isfinite(sums).all():
            raise StructPruneError(f"calibration data: NaN or Inf activations reach layer {self.consumer.name}; "
                                   f"check the model and the input normalisation")
        if self.sums and self._sums_of == self.seen:
            self.sums[-1] += sums
        else:
            self.sums.append(sums)
            self._sums_of = self.seen

    def _keep(self, rows: Tensor, sample: Tensor, mask: Tensor | None = None) -> None:
        self.chunks.append(rows)
        self.row_samples.append(sample.cpu() + self.seen)
        if mask is not None:
            self.masks.append(mask)

    def _linear_rows(self, x: Tensor) -> None:
        samples = x.shape[0]
        index = self.consumer.channel_index.to(x.device)
        mask = self._mask(samples, x)
        if x.dim() == 3:
            sample = torch.arange(samples, device=x.device)[:, None].expand(x.shape[:2])
            if mask is not None:
                x, sample = x[mask], sample[mask]
            else:
                x, sample = x.reshape(-1, x.shape[-1]), sample.reshape(-1)
        else:
            x, sample = x.reshape(samples, -1), torch.arange(samples, device=x.device)
        per_sample = torch.zeros(samples, x.shape[-1], dtype=torch.float64, device=x.device)
        per_sample.index_add_(0, sample, x.double())
        self._add_sums(per_sample[:, index].sum(dim=2).cpu())
        rows = self._pick(x.shape[0], self._wanted(samples), x.device)
        self.picked = rows
        self._keep(x[rows][:, index], sample[rows])

    def _conv_rows(self, conv: nn.Module, x: Tensor) -> None:
        """Rows at sampled output positions: the group channels' patches, read from the input itself (the
        padding is zeros written into the few rows, not a padded copy of the batch; sums are taken over every
        channel and then indexed, not over a copy of the group's channels)."""
        channels, width = self.consumer.channel_index.shape  # width > 1: the input channels a channel stands for
        index = self.consumer.channel_index.reshape(-1).to(x.device)
        x = _as_2d(conv, x)
        # per (sample, channel) over its positions in float32 at least (pairwise summation; a float64 accumulator
        # makes torch's reduction ~25× slower), then float64 across channels and batches
        low = x.dtype in (torch.float16, torch.bfloat16)
        sums = x.sum(dim=(2, 3), dtype=torch.float32 if low else None)[:, index].double()
        self._add_sums(sums.reshape(len(x), channels, width).sum(dim=2).cpu())
        (kh, kw), (sh, sw), (dh, dw), pad = _geometry(conv)
        n, _, h, w = x.shape
        out_h, out_w = _out_size(h + 2 * pad[0], kh, sh, dh), _out_size(w + 2 * pad[1], kw, sw, dw)
        positions = self._pick(n * out_h * out_w, self._wanted(n), x.device)
        self.picked = positions
        sample, rest = positions // (out_h * out_w), positions % (out_h * out_w)
        top, left = (rest // out_w) * sh - pad[0], (rest % out_w) * sw - pad[1]
        dy = (torch.arange(kh, device=x.device) * dh).repeat_interleave(kw)
        dx = (torch.arange(kw, device=x.device) * dw).repeat(kh)
        ys, xs = top[:, None] + dy, left[:, None] + dx  # (rows, taps) in input coordinates
        real = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        patches = x[sample[:, None], :, ys.clamp(0, h - 1), xs.clamp(0, w - 1)][:, :, index]  # (rows, taps, C·width)
        patches = patches * real[:, :, None].to(patches.dtype)
        rows = patches.transpose(1, 2).reshape(len(patches), channels, -1)  # (rows, C, width·taps)
        self._keep(rows.contiguous(), sample, real.repeat(1, width).cpu())


class _Reference:
    """Forward hook on the *original* model's copy of a consumer: its output at the rows the collector drew
    from the same batch, restricted to the consumer's current outputs (``out_index``)."""

    def __init__(self, collector: _RowCollector, out_index: Tensor):
        self.collector, self.out_index = collector, out_index
        self.chunks: list[Tensor] = []

    def __call__(self, module, _args, output) -> None:
        picked = self.collector.picked
        output = output.detach()
        if self.collector.consumer.kind == "conv":
            rows = output.flatten(2).transpose(1, 2).reshape(-1, output.shape[1])  # (N·positions, O)
        else:  # the same rows as the collector's: padding tokens left out
            rows = _all_rows(module, output, "linear", self.collector._mask(output.shape[0], output))
        self.chunks.append(rows[picked][:, self.out_index.to(rows.device)].float())


class _StopForward(Exception):
    """Raised by a hook once every consumer has seen the batch: the rest of the network is not needed."""


class _Stopper:
    """Counts the hook calls of a batch; once each hook has run as often as on the first (full) batch, the
    forward pass is cut short."""

    def __init__(self, hooks: int, expected: list[int] | None = None):
        self.expected = expected  # known calls per batch (from a traced pass), or counted on the first batch
        self.calls = [0] * hooks

    def wrap(self, i: int, hook):
        def counted(*args):
            hook(*args)
            self.calls[i] += 1
            if self.expected is not None and self.calls == self.expected:
                raise _StopForward

        return counted

    def next_batch(self) -> None:
        if self.expected is None:
            self.expected = list(self.calls)
        self.calls = [0] * len(self.calls)


def rows_cap(features: int, samples: int, memory_bytes: int) -> int:
    """Rows kept for a consumer reading ``features`` = C·K group inputs: ``ROWS_PER_FEATURE`` per feature (at
    least one per sample), within ``memory_bytes``."""
    wanted = max(samples, ROWS_PER_FEATURE * features) if ROWS_PER_FEATURE else memory_bytes
    return max(1, min(wanted, memory_bytes // (4 * features)))


def _expected_calls(cache: ActivationCache | None, names: list[str]) -> list[int] | None:
    """How often each of the modules ``names`` runs in one forward pass, when the cache's traced pass says."""
    if cache is None:
        return None
    calls = [cache.chain.calls.get(name, 0) for name in names]
    return calls if all(calls) else None


def _geometry(conv: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, dilation, padding) of a Conv2d, or of a Conv1d seen as a Conv2d over (1, L) inputs."""
    if isinstance(conv.padding, str):  # "same"/"valid": resolve to numbers
        padding = tuple((d * (k - 1)) // 2 if conv.padding == "same" else 0
                        for k, d in zip(conv.kernel_size, conv.dilation, strict=False))
    else:
        padding = tuple(conv.padding)
    if isinstance(conv, nn.Conv1d):  # one row of height 1: kernel, stride and dilation 1 there, no padding
        return (1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation), (0, *padding)
    return tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), padding


def _as_2d(conv: nn.Module, x: Tensor) -> Tensor:
    """A conv's input as (N, C, H, W): a Conv1d's (N, C, L) as (N, C, 1, L)."""
    return x.unsqueeze(2) if isinstance(conv, nn.Conv1d) else x


def _out_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def _all_rows(module: nn.Module, x: Tensor, kind: str, token_mask: Tensor | None) -> Tensor:
    """Every row of a consumer's *whole* input (all its input features, not only a group's), flattened as
    the layer's weight is: (rows, C_in·K) patches of a conv (zero padding included), (rows, features) of a
    Linear (padding tokens left out)."""
    if kind == "linear":
        return x[token_mask] if token_mask is not None else x.reshape(-1, x.shape[-1])
    kernel, stride, dilation, padding = _geometry(module)
    cols = nn.functional.unfold(_as_2d(module, x), kernel, dilation=dilation, padding=padding,
                                stride=stride)  # (N, C·K, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def capture(model: nn.Module, group: Group, calib: Calibration | list, memory_bytes: int = DEFAULT_MEMORY_BYTES,
            seed: int = 0, targets: list | None = None, loss_fn=None, gradients: bool = False,
            sensitivity_samples: int = 0, reference: tuple[nn.Module, dict[str, Tensor]] | None = None,
            cache: ActivationCache | None = None, reference_cache: ActivationCache | None = None,
            zero_below: float = 0.0) -> GroupView:
    """Run the calibration samples through ``model`` and return the group's :class:`GroupView`.

    ``calib``: a :class:`Calibration`, or a list of input batches (with ``targets``, one per batch).
    With ``gradients`` (or ``targets`` given), the producers' ``weight_grad`` is the gradient of
    ``loss_fn(model(inputs), targets)`` (default: cross-entropy) summed over the batches.
    ``sensitivity_samples``: compute PFP's sensitivities (:func:`structprune.methods.pfp.consumer_sensitivity`)
    over every position of the first this many samples, against the consumer's whole input (``zero_below``:
    PFP's option of that name).
    ``reference``: (the original, unpruned model, {consumer name: indices of its current outputs among the
    original's}); each consumer named there gets as ``target`` the original model's output of that layer
    at the same rows, so that a reconstruction can undo the error accumulated upstream.

    Each forward pass stops once every consumer has read its input (after a first full pass that counts
    how often each is called, unless ``cache`` knows), unless loss gradients are needed.
    ``cache``, ``reference_cache``: kept block inputs of ``model`` and of the reference model
    (:mod:`structprune.resume`); a pass then resumes at the kept block when it can, and records for the next
    group the input of the earliest block this group changes (its producers, BatchNorms and consumers).
    """
    if not isinstance(calib, Calibration):
        calib = Calibration.of(calib, targets)
        gradients = gradients or targets is not None
    samples = calib.samples
    collectors, hooks = [], []
    gen = torch.Generator()
    gen.manual_seed(seed)
    for consumer in group.consumers:
        features = consumer.channel_index.numel() * (
            consumer.module.weight[0, 0].numel() if consumer.kind == "conv" else 1)
        collector = _RowCollector(consumer, rows_cap(features, samples, memory_bytes), samples, gen,
                                  sensitivity_samples, zero_below)
        collectors.append(collector)
    if gradients:
        cache = reference_cache = None  # the loss needs the whole pass
    reads = [c.name for c in group.consumers]
    changes = reads + [layer.name for layer in (*group.producers, *group.batchnorms)]
    resumed = (cache.resumed(*cache.plan(reads, changes), producers=[p.name for p in group.producers])
               if cache is not None else nullcontext())  # before the hooks
    ref_reads = [name for name in reads if reference is not None and name in reference[1]]
    ref_resumed = (reference_cache.resumed(*reference_cache.plan(ref_reads))
                   if reference is not None and reference_cache is not None else nullcontext())
    stopper = _Stopper(len(collectors), _expected_calls(cache, reads))
    hooks = [c.consumer.module.register_forward_pre_hook(stopper.wrap(i, c)) for i, c in enumerate(collectors)]
    references = []
    if reference is not None:
        original, out_index = reference
        references = [_Reference(c, out_index[c.consumer.name]) for c in collectors if c.consumer.name in out_index]
        ref_stopper = _Stopper(len(references), _expected_calls(reference_cache, ref_reads))
        hooks += [original.get_submodule(r.collector.consumer.name).register_forward_hook(ref_stopper.wrap(i, r))
                  for i, r in enumerate(references)]
    gradients = _LossGradients(model, group, loss_fn) if gradients else None
    modes = [(m, m.training) for m in (model, reference[0] if reference is not None else None) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        with torch.set_grad_enabled(gradients is not None), resumed, ref_resumed:
            seen = 0
            for batch, (inputs, target) in enumerate(calib):
                for kept in (cache, reference_cache):
                    if kept is not None:
                        kept.batch = batch
                mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                for collector in collectors:
                    collector.token_mask, collector.seen = mask, seen
                seen += batch_size(inputs)
                outputs = _forward(model, inputs, stopper if gradients is None else None)
                if gradients is not None:
                    gradients.backward(outputs, target)
                if reference is not None:
                    with torch.no_grad():
                        _forward(reference[0], inputs, ref_stopper)
    finally:
        for m, training in modes:
            m.train(training)
        for hook in hooks:
            hook.remove()
        if gradients is not None:
            gradients.restore()
    consumers = []
    for consumer, collector in zip(group.consumers, collectors, strict=False):
        bias = consumer.module.bias
        consumers.append(ConsumerView(
            name=consumer.name,
            inputs=torch.cat(collector.chunks).float(),
            weight=consumer.canonical_weight().float(),
            bias=None if bias is None else bias.detach().float(),
            output_scale=consumer.output_scale.float(),
            output_shift=consumer.output_shift.float(),
            normalized=consumer.normalized,
            grouped=consumer.grouped,
            tap_mask=torch.cat(collector.masks) if collector.masks else None,
            row_sample=torch.cat(collector.row_samples),
            sample_sums=torch.cat(collector.sums),
            sensitivity=None if collector.sensitivity is None else collector.sensitivity.cpu().double(),
            target=next((torch.cat(r.chunks) for r in references if r.collector is collector), None),
        ))
    producers = tuple(
        ProducerView(p.name, p.module, _per_channel(p.module.weight.detach(), p, group.channels),
                     None if gradients is None else _per_channel(gradients.grads[i], p, group.channels))
        for i, p in enumerate(group.producers)
    )
    return GroupView(name=group.name, channels=group.channels, consumers=tuple(consumers),
                     producers=producers, seed=seed, bn_scale=_bn_scale(group))


def weights_view(group: Group, seed: int = 0) -> GroupView:
    """The group's :class:`GroupView` with weights only (no calibration rows): all that a data-free method
    reads, without a pass over the calibration data."""
    consumers = tuple(ConsumerView(
        name=c.name, inputs=torch.empty(0, c.channel_index.shape[0], c.canonical_weight().shape[2]),
        weight=c.canonical_weight().float(), bias=None if c.module.bias is None else c.module.bias.detach().float(),
        output_scale=c.output_scale.float(), output_shift=c.output_shift.float(), normalized=c.normalized,
        grouped=c.grouped) for c in group.consumers)
    producers = tuple(ProducerView(p.name, p.module, _per_channel(p.module.weight.detach(), p, group.channels))
                      for p in group.producers)
    return GroupView(name=group.name, channels=group.channels, consumers=consumers, producers=producers, seed=seed,
                     bn_scale=_bn_scale(group))


def _bn_scale(group: Group) -> Tensor | None:
    """Σ |γ| of the BatchNorms on each of the group's channels (None without BatchNorm)."""
    if not group.batchnorms:
        return None
    return sum(_per_channel(bn.module.weight.detach().abs(), bn, group.channels).sum(dim=1) for bn in group.batchnorms)


def _forward(model: nn.Module, inputs, stopper: _Stopper | None):
    """The model's outputs, or None when the stopper cut the pass short once the hooks had what they need."""
    try:
        return run_forward(model, inputs)
    except _StopForward:
        return None
    finally:
        if stopper is not None:
            stopper.next_batch()


def _per_channel(tensor: Tensor, layer: Producer, channels: int) -> Tensor:
    """Rows of a producer's (or BatchNorm's) parameter (or of its gradient) that belong to each group channel,
    flattened."""
    tensor = rows_first(layer.module, tensor)
    return tensor[layer.channel_index.to(tensor.device)].reshape(channels, -1).float()


class _LossGradients:
    """Accumulates the loss gradient of each producer weight over calibration batches."""

    def __init__(self, model: nn.Module, group: Group, loss_fn):
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.weights = [p.module.weight for p in group.producers]
        self.grads = [torch.zeros_like(w) for w in self.weights]
        self.saved = [(w, w.requires_grad, w.grad) for w in self.weights]
        for w in self.weights:
            w.requires_grad_(True)
            w.grad = None

    def backward(self, outputs, targets) -> None:
        if targets is None:
            raise StructPruneError("this method needs labelled calibration batches: (inputs, targets) pairs")
        if isinstance(outputs, (tuple, list)):
            outputs = outputs[0]
        if self.loss_fn is nn.functional.cross_entropy and not targets.is_floating_point() and outputs.dim() >= 2:
            classes = outputs.shape[1]
            if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
                raise StructPruneError(f"calibration labels must be class indices in [0, {classes}) for a model "
                                       f"with {classes} outputs; got labels from {int(targets.min())} to "
                                       f"{int(targets.max())}")
        try:
            loss = self.loss_fn(outputs, targets)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise StructPruneError(f"loss_fn failed on the model's outputs {tuple(outputs.shape)} and the "
                                   f"calibration targets {tuple(targets.shape)}: {first_line(exc)}") from None
        grads = torch.autograd.grad(loss, self.weights, allow_unused=True)
        for total, grad in zip(self.grads, grads, strict=False):
            if grad is not None:
                total += grad.detach()

    def restore(self) -> None:
        for weight, requires_grad, grad in self.saved:
            weight.requires_grad_(requires_grad)
            weight.grad = grad
