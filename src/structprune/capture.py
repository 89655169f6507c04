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
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .activation_cache import ActivationCache
from .batches import Calibration, batch_size, run_forward
from .errors import StructPruneError, first_line
from .groups import Consumer, Group, Producer
from .layers import all_rows, as_2d, conv_geometry, out_size, rows_first
from .methods.base import ConsumerView, GroupView, ProducerView
from .sensitivity import consumer_sensitivity, conv_sensitivity, conv_sensitivity_applies

DEFAULT_MEMORY_BYTES = 256 * 2**20
#: rows kept per captured feature (C·K; see the module doc); 0: as many as ``memory_bytes`` allows
ROWS_PER_FEATURE = 32
_SCORE_ELEMENTS = 2**22  # input elements (× taps) scored at once for PFP's sensitivities


def _token_mask(mask: Tensor | None, n: int, x: Tensor) -> Tensor | None:
    """The batch's attention mask (N, L) as the real tokens of the first ``n`` samples of a (n, L, features) input
    ``x``; None where there is no mask or ``x`` is not such a sequence."""
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return mask[:n].to(x.device) != 0
    return None


class _Sensitivity:
    """PFP's s_j of one consumer's group channels (:mod:`structprune.sensitivity`) over every position of the
    first ``samples`` calibration samples, a running maximum over the batches (``zero_below``: PFP's option)."""

    def __init__(self, consumer: Consumer, samples: int, zero_below: float):
        self.consumer, self.samples, self.zero_below = consumer, samples, zero_below
        self.value: Tensor | None = None

    def add(self, module: nn.Module, x: Tensor, seen: int, token_mask: Tensor | None) -> None:
        """Score the samples of batch ``x`` (after ``seen`` samples) that are among the first ``samples``."""
        scored = min(x.shape[0], self.samples - seen)
        if scored > 0:
            self._score(module, x[:scored], token_mask)

    def _score(self, module: nn.Module, x: Tensor, token_mask: Tensor | None) -> None:
        """On every row of ``x``, a few samples at a time (bounded memory)."""
        kind = self.consumer.kind
        per_sample = max(1, x[0].numel() * (module.weight[0, 0].numel() if kind == "conv" else 1))
        step = max(1, _SCORE_ELEMENTS // per_sample)  # unfolded elements: what the evaluation may form
        if kind == "conv" and conv_sensitivity_applies(module):  # its input as it is, not unfolded
            for start in range(0, x.shape[0], step):
                self.value = conv_sensitivity(x[start:start + step], module, self.consumer.channel_index,
                                              floor=self.value, zero_below=self.zero_below)
            return
        weight = self.consumer.flat_weight()
        features = self.consumer.input_features()
        for start in range(0, x.shape[0], step):
            chunk = x[start:start + step]
            rows = all_rows(module, chunk, kind, _token_mask(token_mask, chunk.shape[0], chunk))
            row_sample = None  # a Linear layer's rows stand alone; a conv's rows of one sample are its positions
            if kind == "conv":
                row_sample = torch.arange(len(chunk), device=rows.device).repeat_interleave(len(rows) // len(chunk))
            self.value = consumer_sensitivity(rows, weight, features, floor=self.value, row_sample=row_sample,
                                              zero_below=self.zero_below)


class _RowCollector:
    """Forward pre-hook on one consumer: turns its input into rows (M, C, K) at sampled positions, and
    keeps what needs every position: per-sample sums of each channel and, when asked, PFP's sensitivities
    over every position of the first ``sensitivity_samples`` samples (``zero_below``: PFP's option)."""

    def __init__(self, consumer: Consumer, rows_cap: int, samples: int, generator: torch.Generator,
                 sensitivity_samples: int = 0, zero_below: float = 0.0):
        self.consumer = consumer
        self.rows_cap, self.samples = rows_cap, samples
        self.generator = generator
        self.sensitivity = _Sensitivity(consumer, sensitivity_samples, zero_below)
        self.chunks: list[Tensor] = []
        self.masks: list[Tensor] = []  # (rows, taps) real-position taps of conv rows
        self.row_samples: list[Tensor] = []
        self.sums: list[Tensor] = []  # (batch, channels) per-sample channel sums
        self._sums_of = -1  # the batch (its first sample) the last sums belong to
        self.seen = 0  # samples before this batch (set by the capture loop: a layer may run twice per batch)
        self.token_mask: Tensor | None = None  # (N, L) attention mask of the batch, when it has one
        self.picked: Tensor | None = None  # the rows (positions) drawn from the last batch
        self.sampled = False  # some batch kept fewer rows than it had

    def __call__(self, module: nn.Module, args) -> None:
        x = args[0].detach()
        if self.consumer.kind == "conv":
            self._conv_rows(module, x)
        else:
            self._linear_rows(x)
        self.sensitivity.add(module, x, self.seen, self.token_mask)

    def _mask(self, n: int, x: Tensor) -> Tensor | None:
        return _token_mask(self.token_mask, n, x)

    def _wanted(self, n: int) -> int:
        """Rows to keep from a batch of n samples: the same whole number per sample while the cap allows
        one row per sample or more, else the batch's share of the cap (bounded however many samples)."""
        if self.rows_cap >= self.samples:
            return n * (self.rows_cap // self.samples)
        return math.ceil(self.rows_cap * n / self.samples)

    def _pick(self, total: int, wanted: int, device) -> Tensor:
        if wanted >= total:
            return torch.arange(total, device=device)
        self.sampled = True
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
        x = as_2d(conv, x)
        # per (sample, channel) over its positions in float32 at least (pairwise summation; a float64 accumulator
        # makes torch's reduction ~25× slower), then float64 across channels and batches
        low = x.dtype in (torch.float16, torch.bfloat16)
        sums = x.sum(dim=(2, 3), dtype=torch.float32 if low else None)[:, index].double()
        self._add_sums(sums.reshape(len(x), channels, width).sum(dim=2).cpu())
        (kh, kw), (sh, sw), (dh, dw), pad = conv_geometry(conv)
        n, _, h, w = x.shape
        out_h, out_w = out_size(h + 2 * pad[0], kh, sh, dh), out_size(w + 2 * pad[1], kw, sw, dw)
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
            rows = all_rows(module, output, "linear", self.collector._mask(output.shape[0], output))
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
    (:mod:`structprune.activation_cache`); a pass then resumes at the kept block when it can, and records for the next
    group the input of the earliest block this group changes (its producers, BatchNorms and consumers).
    """
    if not isinstance(calib, Calibration):
        calib = Calibration.of(calib, targets)
        gradients = gradients or targets is not None
    gen = torch.Generator()
    gen.manual_seed(seed)
    collectors = []
    for consumer in group.consumers:
        features = consumer.channel_index.numel() * (
            consumer.module.weight[0, 0].numel() if consumer.kind == "conv" else 1)
        collectors.append(_RowCollector(consumer, rows_cap(features, calib.samples, memory_bytes), calib.samples,
                                        gen, sensitivity_samples, zero_below))
    if gradients:
        cache = reference_cache = None  # the loss needs the whole pass
    references = [] if reference is None else [_Reference(c, reference[1][c.consumer.name]) for c in collectors
                                               if c.consumer.name in reference[1]]
    loss = _LossGradients(model, group, loss_fn) if gradients else None
    _run_passes(model, group, calib, collectors, None if reference is None else reference[0], references,
                (cache, reference_cache), loss)
    return _view(group, collectors, references, loss, seed)


def _run_passes(model: nn.Module, group: Group, calib: Calibration, collectors: list[_RowCollector],
                original: nn.Module | None, references: list[_Reference], caches: tuple,
                loss: _LossGradients | None) -> None:
    """The capture's passes over the calibration batches: ``model`` with the collectors as hooks (and the loss's
    backward pass), and the ``original`` model with the reference hooks on the same batches; ``caches``: the two
    models' ActivationCaches (or None)."""
    cache, reference_cache = caches
    reads = [c.name for c in group.consumers]
    changes = reads + [layer.name for layer in (*group.producers, *group.batchnorms)]
    resumed = (cache.resumed(*cache.plan(reads, changes), producers=[p.name for p in group.producers])
               if cache is not None else nullcontext())  # before the hooks
    ref_reads = [r.collector.consumer.name for r in references]
    ref_resumed = (reference_cache.resumed(*reference_cache.plan(ref_reads))
                   if original is not None and reference_cache is not None else nullcontext())
    stopper = _Stopper(len(collectors), _expected_calls(cache, reads))
    hooks = [c.consumer.module.register_forward_pre_hook(stopper.wrap(i, c)) for i, c in enumerate(collectors)]
    ref_stopper = _Stopper(len(references), _expected_calls(reference_cache, ref_reads))
    if original is not None:
        hooks += [original.get_submodule(r.collector.consumer.name).register_forward_hook(ref_stopper.wrap(i, r))
                  for i, r in enumerate(references)]
    modes = [(m, m.training) for m in (model, original) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        with torch.set_grad_enabled(loss is not None), resumed, ref_resumed:
            seen = 0
            for batch, (inputs, target) in enumerate(calib):
                for kept in (cache, reference_cache):
                    if kept is not None:
                        kept.batch = batch
                mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                for collector in collectors:
                    collector.token_mask, collector.seen = mask, seen
                seen += batch_size(inputs)
                outputs = _forward(model, inputs, stopper if loss is None else None)
                if loss is not None:
                    loss.backward(outputs, target)
                if original is not None:
                    with torch.no_grad():
                        _forward(original, inputs, ref_stopper)
    finally:
        for m, training in modes:
            m.train(training)
        for hook in hooks:
            hook.remove()
        if loss is not None:
            loss.restore()


def _view(group: Group, collectors: list[_RowCollector], references: list[_Reference],
          loss: _LossGradients | None, seed: int) -> GroupView:
    """The :class:`GroupView` of what the collectors (and the reference hooks, and the loss) gathered."""
    consumers = []
    for consumer, collector in zip(group.consumers, collectors, strict=False):
        bias = consumer.module.bias
        sensitivity = collector.sensitivity.value
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
            sensitivity=None if sensitivity is None else sensitivity.cpu().double(),
            rows_complete=not collector.sampled and consumer.channel_index.numel() == _input_channels(consumer),
            target=next((torch.cat(r.chunks) for r in references if r.collector is collector), None),
        ))
    producers = tuple(
        ProducerView(p.name, p.module, _per_channel(p.module.weight.detach(), p, group.channels),
                     None if loss is None else _per_channel(loss.grads[i], p, group.channels))
        for i, p in enumerate(group.producers)
    )
    return GroupView(name=group.name, channels=group.channels, consumers=tuple(consumers),
                     producers=producers, seed=seed, bn_scale=_bn_scale(group))


def _input_channels(consumer: Consumer) -> int:
    """The channels of the consumer's whole input (a conv's in_channels, a Linear's in_features)."""
    weight = consumer.flat_weight()
    return weight.shape[1] // (consumer.module.weight[0, 0].numel() if consumer.kind == "conv" else 1)


@torch.no_grad()
def group_sensitivities(model: nn.Module, groups: list[Group], calib: Calibration, samples: int,
                        zero_below: float) -> dict[str, Tensor]:
    """PFP's s_j of every group's channels on ``model`` as it is: the maximum over each group's consumers (float64,
    CPU) of their sensitivities over every position of the first ``samples`` calibration samples (what
    :func:`capture` computes with ``sensitivity_samples``), for all groups in one pass over those samples, no rows
    kept. PFP's allocation reads them."""
    scorers = [(group.name, _Sensitivity(c, samples, zero_below)) for group in groups for c in group.consumers]
    batch: dict = {"seen": 0, "mask": None}

    def scorer(sensitivity: _Sensitivity):
        return lambda module, args: sensitivity.add(module, args[0].detach(), batch["seen"], batch["mask"])

    stopper = _Stopper(len(scorers))
    hooks = [s.consumer.module.register_forward_pre_hook(stopper.wrap(i, scorer(s))) for i, (_, s) in
             enumerate(scorers)]
    training = model.training
    model.eval()
    try:
        for inputs, _ in calib:
            if batch["seen"] >= samples:
                break
            batch["mask"] = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            _forward(model, inputs, stopper)
            batch["seen"] += batch_size(inputs)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    result: dict[str, Tensor] = {}
    for name, sensitivity in scorers:
        value = sensitivity.value.cpu().double()
        result[name] = value if name not in result else torch.maximum(result[name], value)
    return result


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
