"""The method contract: what a pruning method sees (a :class:`GroupView`) and returns (a :class:`Selection`).

A method looks at one group at a time and never touches the model. Every consumer of the group is
presented as a linear map on *rows*: one row per calibration sample and output position, holding,
for each group channel, the values the consumer multiplies by its weights there (the kernel taps of
a conv patch, or the ``H*W`` features a Linear reads after a Flatten). With ``Z`` the rows
(M, C, K) and ``W`` the canonical weight (O, C, K), the consumer's output is
``f(Z) = scale * (einsum('mck,ock->mo', Z, W) + bias)``, where ``scale`` is γ/σ of a BatchNorm
directly after the consumer. Restricting f to a channel subset S means zeroing the other channels.
The BatchNorm's shift β − γμ/σ cancels in every difference f(H) − f(H_S), so f leaves it out;
:meth:`ConsumerView.full_output` adds it back (the layer's real output, bias and shift included).

A conv's rows are patches: a tap that falls on the zero padding around the input is not a position
of the hidden representation, and ``tap_mask`` (rows, taps) says which taps are real.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import check_positive_int

_CHUNK_ELEMENTS = 2**22  # floats per row chunk when accumulating over rows


@dataclass
class NormalEquations:
    """Σ over rows of [Z_S 1]ᵀ[Z_S 1] (F+1, F+1), [Z_S 1]ᵀ·Y (F+1, O) and Y² (O), in float64."""

    gram: Tensor
    cross: Tensor
    target_sq: Tensor
    scale_sq: Tensor  # (O,) BatchNorm scale², weighting each output's error

    def best_shift(self, weight: Tensor) -> Tensor:
        """The constant δ (O) that minimises the error of ``weight`` (what a recalibrated BatchNorm absorbs)."""
        rows = self.gram[-1, -1]
        return (self.cross[-1] - self.gram[-1, :-1] @ weight) / rows.clamp(min=1)

    def error(self, weight: Tensor, bias_delta: Tensor | None = None) -> float:
        """Σ_o scale_o²·‖y_o − [Z_S 1]·[w_o; δ_o]‖² for kept-input weights (F, O) and a bias change δ (O)."""
        coef = torch.cat([weight, (bias_delta if bias_delta is not None else torch.zeros(weight.shape[1],
                          dtype=weight.dtype))[None]])
        per_output = self.target_sq - 2 * (coef * self.cross).sum(0) + (coef * (self.gram @ coef)).sum(0)
        return float((self.scale_sq * per_output.clamp(min=0)).sum())


@dataclass(frozen=True)
class ConsumerView:
    """One consumer of a group: its calibration inputs and its weights, read-only."""

    name: str
    inputs: Tensor  # (rows, channels, taps): the hidden representation as this consumer reads it
    weight: Tensor  # (out, channels, taps)
    bias: Tensor | None  # (out,)
    output_scale: Tensor  # (out,)
    output_shift: Tensor | None = None  # (out,) β − γμ/σ of the BatchNorm after the consumer
    normalized: bool = False  # a BatchNorm follows the consumer (its recalibration absorbs a constant shift)
    #: a grouped convolution: ``weight`` is its dense form, zero between conv groups by structure, and only the
    #: blocks of its conv groups are written back
    grouped: bool = False
    tap_mask: Tensor | None = None  # (rows, taps) bool: the taps on real positions (None: all)
    row_sample: Tensor | None = None  # (rows,) the calibration sample each row comes from
    sample_sums: Tensor | None = None  # (samples, channels) float64: Σ of each channel's hidden values per sample
    sensitivity: Tensor | None = None  # (channels,) PFP's s_j over every position of the selection samples
    #: the rows are every position of every calibration sample and the group's channels the consumer's whole input
    #: (False from a capture that kept a sample of the rows: what PFP's maximum over positions cannot read)
    rows_complete: bool = True
    #: (rows, out) the original (unpruned) model's output of this layer at the same rows, bias included:
    #: what a reconstruction aims at instead of the dense layer on the already-pruned inputs
    target: Tensor | None = None
    #: the dense output on all rows, kept at its first use (a selection, its report and the refit each ask)
    _dense: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def full_output(self) -> Tensor:
        """The consumer's real output on the rows (bias and BatchNorm shift included)."""
        out = self.output()
        return out if self.output_shift is None else out + self.output_shift

    def output(self, channel_idx: Tensor | None = None, weight: Tensor | None = None,
               rows: slice = slice(None), bias: Tensor | None = None) -> Tensor:
        """f restricted to ``channel_idx`` (all channels when None), optionally with replacement weights
        (out, len(channel_idx), taps) and bias (out,). Output shape: (rows, out).
        """
        if channel_idx is None and weight is None and bias is None and rows == slice(None):
            if self._dense is None:  # read-only view: the same inputs and weights give the same output
                object.__setattr__(self, "_dense", self._output(None, None, rows, None))
            return self._dense
        return self._output(channel_idx, weight, rows, bias)

    def _output(self, channel_idx: Tensor | None, weight: Tensor | None, rows: slice, bias: Tensor | None) -> Tensor:
        inputs = self.inputs[rows]
        w = self.weight if weight is None else weight
        if channel_idx is not None:
            inputs = inputs[:, channel_idx]
            if weight is None:
                w = w[:, channel_idx]
        out = inputs.reshape(len(inputs), -1) @ w.reshape(len(w), -1).T  # Σ over c, k as one matrix product
        bias = self.bias if bias is None else bias
        if bias is not None:
            out = out + bias
        return out * self.output_scale

    def normal_equations(self, channel_idx: Tensor, stride: int = 1) -> NormalEquations:
        """The least-squares system of reconstructing the target from the rows of ``channel_idx`` (and a
        constant): Σ over rows of [Z_S 1]ᵀ[Z_S 1], [Z_S 1]ᵀ·Y and Y², accumulated in float64 over row
        chunks (memory independent of the number of rows). Y is :attr:`target` less the bias when the
        capture recorded it, else the dense layer without its bias, Z·Wᵀ. ``stride``: every stride-th row only
        (the rows are each sample's in turn: a stride keeps every sample's share)."""
        inputs = self.inputs[::stride]
        targets = None if self.target is None else self.target[::stride]
        rows, channels, taps = inputs.shape
        features = len(channel_idx) * taps
        weight = self.weight.reshape(self.weight.shape[0], -1)
        gram = torch.zeros(features + 1, features + 1, dtype=torch.float64)
        cross = torch.zeros(features + 1, weight.shape[0], dtype=torch.float64)
        target_sq = torch.zeros(weight.shape[0], dtype=torch.float64)
        chunk = max(1, _CHUNK_ELEMENTS // (channels * taps))
        for start in range(0, rows, chunk):
            z = inputs[start:start + chunk]
            if targets is None:
                y = (z.reshape(len(z), -1) @ weight.T).double()
            else:  # the original layer's output, less the bias the consumer keeps
                y = targets[start:start + chunk].double()
                if self.bias is not None:
                    y = y - self.bias.double()
            kept = torch.cat([z[:, channel_idx].reshape(len(z), -1).double(),
                              torch.ones(len(z), 1, dtype=torch.float64, device=z.device)], dim=1)
            gram += (kept.T @ kept).cpu()
            cross += (kept.T @ y).cpu()
            target_sq += y.square().sum(0).cpu()
        return NormalEquations(gram, cross, target_sq, self.output_scale.double().square().cpu())

    def contribution_gram(self, max_pairs: int = 65536, generator: torch.Generator | None = None,
                          whole_rows: bool = False) -> Tensor:
        """Gram matrix (C, C), float64, of the channels' contributions to the output.

        Channel c contributes ``x_c[m, o] = scale[o] * Σ_k Z[m, c, k] W[o, c, k]`` to the output, so
        ``‖Y − f(H_S)‖² = Σ_{i, j ∉ S} G[i, j]`` for any kept set S (the bias cancels). Greedy selection
        on G (ThiNet, GFS) is then exact and costs O(C) per step instead of a pass over the data.
        With more than ``max_pairs`` (row, output) pairs, G is estimated from that many pairs drawn
        uniformly (ThiNet samples them the same way), scaled to the full sum; the cost is
        O(pairs·C·(taps + C)), most of it gathering each pair's row and filter. ``whole_rows``: the pairs are
        every output of about max_pairs / out rows drawn uniformly (without replacement), an estimate as
        unbiased, computed as one matrix product per channel with no gather: O(pairs·C·(taps/out + C)).
        """
        rows, channels, _ = self.inputs.shape
        out = self.weight.shape[0]
        if whole_rows:
            return self._gram_of_rows(min(rows, max(1, max_pairs // out)), generator)
        if rows * out <= max_pairs:
            row_idx = torch.arange(rows).repeat_interleave(out)
            out_idx = torch.arange(out).repeat(rows)
        else:
            pairs = torch.randint(0, rows * out, (max_pairs,), generator=generator)
            row_idx, out_idx = pairs // out, pairs % out
        gram = torch.zeros(channels, channels, dtype=torch.float64, device=self.inputs.device)
        chunk = max(1, 2**23 // self.inputs[0].numel())
        for start in range(0, len(row_idx), chunk):
            r = row_idx[start:start + chunk].to(self.inputs.device)
            o = out_idx[start:start + chunk].to(self.inputs.device)
            x = (self.inputs[r] * self.weight[o]).sum(dim=2) * self.output_scale[o, None]  # (pairs, C)
            gram += x.double().T @ x.double()
        return (gram * (rows * out / len(row_idx))).cpu()

    def _gram_of_rows(self, count: int, generator: torch.Generator | None) -> Tensor:
        """:meth:`contribution_gram` on ``count`` rows drawn without replacement, all outputs of each."""
        rows, channels, taps = self.inputs.shape
        out = self.weight.shape[0]
        picked = (torch.arange(rows) if count >= rows else torch.randperm(rows, generator=generator)[:count])
        filters = self.weight.permute(1, 2, 0)  # (C, taps, out)
        gram = torch.zeros(channels, channels, dtype=torch.float64, device=self.inputs.device)
        chunk = max(1, 2**23 // (channels * max(out, taps)))
        for start in range(0, len(picked), chunk):
            z = self.inputs[picked[start:start + chunk].to(self.inputs.device)].transpose(0, 1)  # (C, r, taps)
            x = (torch.bmm(z, filters) * self.output_scale).reshape(channels, -1).double()  # (C, r·out)
            gram += x @ x.T
        return (gram * (rows / len(picked))).cpu()


@dataclass(frozen=True)
class ProducerView:
    """A layer whose outputs are the group's channels: ``weight[c]`` is channel c's filter, flattened.

    ``weight_grad`` is the gradient of the calibration loss with respect to ``weight`` (summed over the
    calibration batches); it is only computed for methods whose :class:`Needs` ask for ``gradients``.
    """

    name: str
    module: nn.Module
    weight: Tensor  # (channels, fan_in)
    weight_grad: Tensor | None = None  # (channels, fan_in)


@dataclass(frozen=True)
class GroupView:
    """Everything a method may read about one group, nothing it may mutate."""

    name: str
    channels: int
    consumers: tuple[ConsumerView, ...]
    producers: tuple[ProducerView, ...]
    seed: int = 0
    #: Σ |γ| of the BatchNorms on the group's channels (None when there is no BatchNorm)
    bn_scale: Tensor | None = None

    @property
    def activation(self) -> Tensor:
        """Aggregate activation a[c] of each channel: the sum of its hidden values over the calibration
        samples, every position counted once (summed over consumers, which read the same values). Without
        captured sums (a hand-made view), the sum over rows and taps."""
        if all(c.sample_sums is not None for c in self.consumers):
            return sum(c.sample_sums.sum(dim=0) for c in self.consumers)
        return sum(c.inputs.sum(dim=(0, 2)).double() for c in self.consumers)

    def restrict(self, samples: int) -> GroupView:
        """The view of the first ``samples`` calibration samples (a method's own calibration size, when the
        recovery reads more); the view itself when it has no more than that."""
        def head(c: ConsumerView) -> ConsumerView:
            if c.row_sample is None or not len(c.row_sample) or int(c.row_sample.max()) < samples:
                return c
            rows = (c.row_sample < samples).nonzero().flatten()
            return replace(c, inputs=c.inputs[rows], row_sample=c.row_sample[rows],
                           tap_mask=None if c.tap_mask is None else c.tap_mask[rows],
                           sample_sums=None if c.sample_sums is None else c.sample_sums[:samples],
                           target=None if c.target is None else c.target[rows])
        return replace(self, consumers=tuple(head(c) for c in self.consumers))

    def contribution_gram(self, max_pairs: int, whole_rows: bool = False) -> Tensor:
        """Σ over consumers of :meth:`ConsumerView.contribution_gram` (pairs sampled with :meth:`generator`)."""
        gen = self.generator()
        return sum(c.contribution_gram(max_pairs, gen, whole_rows) for c in self.consumers)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from the run's seed and the group's name, so selections are reproducible."""
        gen = torch.Generator()
        gen.manual_seed((self.seed * 1_000_003 + sum(map(ord, self.name)) * 7919) % (2**63))
        return gen


@dataclass
class Selection:
    """What a method chooses for a group.

    keep_idx: sorted channel indices to keep, ``len == keep``.
    consumer_weights: optional replacement canonical weights (out, keep, taps) per consumer name.
    stats: per-group numbers for the report (residuals, bounds, iterations, ...).
    consumer_biases: optional replacement biases (out,) per consumer name (only for consumers with a bias).
    """

    keep_idx: Tensor
    consumer_weights: dict[str, Tensor] | None = None
    stats: dict = field(default_factory=dict)
    consumer_biases: dict[str, Tensor] | None = None


@dataclass(frozen=True)
class Needs:
    """What a method reads of its :class:`GroupView`: the pipeline captures exactly that, and nothing more.

    activations: the calibration rows (``ConsumerView.inputs``, ``sample_sums``, ...); False for a weights-only
        criterion (it still gets them when the refit reads them, for the report's residuals).
    gradients: ``ProducerView.weight_grad``, the loss gradient on the calibration batches, which must then be
        labelled (:attr:`labels`).
    sensitivity: ``ConsumerView.sensitivity``, PFP's s_j over every position of the selection samples
        (:mod:`structprune.sensitivity`), with ``zero_below`` its threshold for a denominator that counts as 0.
    """

    activations: bool = True
    gradients: bool = False
    sensitivity: bool = False
    zero_below: float = 0.0

    @property
    def labels(self) -> bool:
        """Whether the calibration batches must be (inputs, targets) pairs."""
        return self.gradients


@runtime_checkable
class Method(Protocol):
    """A pruning method: everything :func:`structprune.prune` reads of one. :class:`MethodBase` gives the
    defaults; a new method is one file in ``methods/`` and one line in its registry (``methods/__init__.py``)."""

    #: the name reports and the registry use
    name: str
    #: what the method reads (see :class:`Needs`)
    needs: Needs

    def calibration_samples(self, layer_outputs: Sequence[int]) -> int:
        """The calibration samples to select on when the caller does not say (the paper's default for the method).
        ``layer_outputs``: output elements per sample of each Conv/Linear layer (PFP's rule reads them)."""
        ...

    def select(self, group: GroupView, keep: int) -> Selection:
        """The ``keep`` channels of ``group`` to keep (and, optionally, new consumer weights)."""
        ...


class MethodBase:
    """The contract's defaults: reads activations, needs neither gradients nor sensitivities, selects on
    :attr:`calib_samples` calibration samples."""

    name: str = "method"
    needs: Needs = Needs()
    #: calibration samples when the caller does not say
    calib_samples: int = 256

    def calibration_samples(self, layer_outputs: Sequence[int]) -> int:
        return self.calib_samples

    def select(self, group: GroupView, keep: int) -> Selection:
        raise NotImplementedError


class GramSelection(MethodBase):
    """A greedy selection on the Gram matrix of the channels' contributions (:meth:`GroupView.contribution_gram`,
    from at most ``max_pairs`` (calibration row, output unit) pairs): ThiNet's and GFS's shared option."""

    def __init__(self, max_pairs: int = 65536):
        check_positive_int(max_pairs, "max_pairs")
        self.max_pairs = max_pairs


def options_of(method: Method) -> dict:
    """A method's options as the report records them: its public attributes but the name."""
    return {k: v for k, v in vars(method).items() if not k.startswith("_") and k != "name"}


def top_k_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, ties broken by the lower index, returned in increasing order."""
    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return torch.sort(order).values
