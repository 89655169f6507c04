"""Collect a group's hidden representation, as each consumer reads it, on calibration data.

Memory bound
------------
For a consumer reading C group channels with K taps each (K = kernel positions of a conv, the
``H*W`` features of a Linear after a Flatten, or the head size of an attention head), at most
``max(samples, memory_bytes / (4*C*K))`` rows are kept, where a row is one output position of one
sample. A Linear on a (N, features) input has one row per sample; on a (N, L, features) sequence,
one per token (padding tokens, those with a 0 in the batch's ``attention_mask``, are left out).
A conv output has many positions per sample. Each sample contributes ``max(1, rows_cap // samples)``
positions (tokens) drawn at random (seeded), and only the patches at those positions are ever
materialised, so peak memory is about ``4*C*K*rows`` bytes per consumer plus one
calibration batch's activations. Defaults: 1,280 samples (i-SpaSP's released recipe) and 256 MiB.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .errors import StructPruneError
from .graph import Consumer, Group, Producer, run_forward
from .methods.base import ConsumerView, GroupView, ProducerView

DEFAULT_MEMORY_BYTES = 256 * 2**20


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


def materialize(calib_loader: Iterable, max_samples: int, device, dtype: torch.dtype | None = None
                ) -> tuple[list, list]:
    """Read up to ``max_samples`` calibration samples once, so every group sees the same samples.

    Returns the model inputs of each batch (on ``device``, floating-point inputs cast to ``dtype``) and
    its targets (None for a batch without targets).
    """
    batches, targets, seen = [], [], 0
    try:
        iterator = iter(calib_loader)
    except TypeError:
        raise StructPruneError(f"calib_loader must be iterable, got {type(calib_loader).__name__}") from None
    for batch in iterator:
        inputs = batch_inputs(batch)
        n = min(batch_size(inputs), max_samples - seen)
        if n <= 0:
            break
        batches.append(take_samples(inputs, n, device, dtype))
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        targets.append(take_samples(target, n, device) if isinstance(target, Tensor) else None)
        seen += n
        if seen >= max_samples:
            break
    if seen == 0:
        raise StructPruneError("calib_loader yielded no samples: pass a loader with at least one batch")
    return batches, targets


class _RowCollector:
    """Forward pre-hook that turns a consumer's input into rows (M, C, K) at sampled positions."""

    def __init__(self, consumer: Consumer, rows_per_sample: int, generator: torch.Generator):
        self.consumer = consumer
        self.rows_per_sample = rows_per_sample
        self.generator = generator
        self.chunks: list[Tensor] = []
        self.token_mask: Tensor | None = None  # (N, L) attention mask of the batch, when it has one

    def __call__(self, module: nn.Module, args) -> None:
        x = args[0].detach()
        if not torch.isfinite(x).all():
            raise StructPruneError(f"calibration data: NaN or Inf activations reach layer {self.consumer.name}; "
                                   f"check the model and the input normalisation")
        if self.consumer.kind == "conv":
            self.chunks.append(self._conv_rows(module, x))
        else:
            self.chunks.append(self._linear_rows(x))

    def _pick(self, total: int, wanted: int, device) -> Tensor:
        if wanted >= total:
            return torch.arange(total, device=device)
        return torch.randperm(total, generator=self.generator)[:wanted].sort().values.to(device)

    def _linear_rows(self, x: Tensor) -> Tensor:
        samples = x.shape[0]
        mask = self.token_mask
        if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            x = x[mask.to(x.device) != 0]  # padding tokens are not part of the representation
        x = x.reshape(-1, x.shape[-1])
        rows = self._pick(x.shape[0], samples * self.rows_per_sample, x.device)
        return x[rows][:, self.consumer.channel_index.to(x.device)]

    def _conv_rows(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        x = x[:, self.consumer.channel_index[:, 0].to(x.device)]
        if isinstance(conv.padding, str):  # "same"/"valid": resolve to numbers
            pad = [(d * (k - 1)) // 2 if conv.padding == "same" else 0
                   for k, d in zip(conv.kernel_size, conv.dilation, strict=False)]
        else:
            pad = list(conv.padding)
        x = nn.functional.pad(x, (pad[1], pad[1], pad[0], pad[0]))
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        positions = self._pick(n * out_h * out_w, n * self.rows_per_sample, x.device)
        sample, rest = positions // (out_h * out_w), positions % (out_h * out_w)
        top, left = (rest // out_w) * sh, (rest % out_w) * sw
        dy = (torch.arange(kh, device=x.device) * dh).repeat_interleave(kw)
        dx = (torch.arange(kw, device=x.device) * dw).repeat(kh)
        patches = x[sample[:, None], :, top[:, None] + dy, left[:, None] + dx]  # (rows, taps, C)
        return patches.transpose(1, 2).contiguous()


def capture(model: nn.Module, group: Group, batches: list, memory_bytes: int = DEFAULT_MEMORY_BYTES,
            seed: int = 0, targets: list | None = None, loss_fn=None) -> GroupView:
    """Run the calibration batches through ``model`` and return the group's :class:`GroupView`.

    With ``targets`` (one per batch), the producers' ``weight_grad`` is the gradient of
    ``loss_fn(model(inputs), targets)`` (default: cross-entropy) summed over the batches.
    """
    samples = sum(batch_size(b) for b in batches)
    collectors, hooks = [], []
    gen = torch.Generator()
    gen.manual_seed(seed)
    for consumer in group.consumers:
        features = consumer.channel_index.numel() * (
            consumer.module.weight[0, 0].numel() if consumer.kind == "conv" else 1)
        rows_cap = max(samples, memory_bytes // (4 * features))
        collector = _RowCollector(consumer, max(1, rows_cap // samples), gen)
        collectors.append(collector)
        hooks.append(consumer.module.register_forward_pre_hook(collector))
    gradients = None if targets is None else _LossGradients(model, group, loss_fn)
    was_training = model.training
    model.eval()
    try:
        with torch.set_grad_enabled(gradients is not None):
            for i, inputs in enumerate(batches):
                mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                for collector in collectors:
                    collector.token_mask = mask
                outputs = run_forward(model, inputs)
                if gradients is not None:
                    gradients.backward(outputs, targets[i])
    finally:
        model.train(was_training)
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
        ))
    producers = tuple(
        ProducerView(p.name, p.module, _per_channel(p.module.weight.detach(), p, group.channels),
                     None if gradients is None else _per_channel(gradients.grads[i], p, group.channels))
        for i, p in enumerate(group.producers)
    )
    bn_scale = None
    if group.batchnorms:
        bn_scale = sum(_per_channel(bn.module.weight.detach().abs(), bn, group.channels).sum(dim=1)
                       for bn in group.batchnorms)
    return GroupView(name=group.name, channels=group.channels, consumers=tuple(consumers),
                     producers=producers, seed=seed, bn_scale=bn_scale)


def _per_channel(tensor: Tensor, layer: Producer, channels: int) -> Tensor:
    """Rows of a producer's (or BatchNorm's) parameter that belong to each group channel, flattened."""
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
        loss = self.loss_fn(outputs, targets)
        grads = torch.autograd.grad(loss, self.weights, allow_unused=True)
        for total, grad in zip(self.grads, grads, strict=False):
            if grad is not None:
                total += grad.detach()

    def restore(self) -> None:
        for weight, requires_grad, grad in self.saved:
            weight.requires_grad_(requires_grad)
            weight.grad = grad
