"""PFP: Provable Filter Pruning (Liebenwein et al., ICLR 2020), with channels removed for real.

Sensitivity of input channel j of a consumer, on calibration rows (patches) p, output units i and
taps κ, for each non-negative part A' of the input (A itself if A ≥ 0, else relu(A) and relu(−A))
and each part W± of the weight (positive part, and the magnitude of the negative part):

    g[i, j, κ, p] = W±[i, j, κ]·A'[j, κ, p] / Σ_{k, κ'} W±[i, k, κ']·A'[k, κ', p]   (0 where the sum ≈ 0)
    s_j = max over i, κ, p and over the parts of g

The scores of a coupled group are the maximum over its consumers; p_j = s_j / Σ s.

"0 where the sum ≈ 0" (the specification, and torchprune's float32 epsilon) is read relative to the data:
a position p counts for output unit i only where its sum T[p, i] is at least ``zero_below`` (default
:data:`ZERO_BELOW`) times unit i's mean T over the positions of the same sample (a convolution's output
positions; a Linear layer's rows each stand alone, so nothing changes there). Where an image is mostly zero
background, as Fashion-MNIST's are, T is near zero at many positions of the early, high-resolution
convolutions, and any channel that alone reaches such a position scores g ≈ 1: on ResNet-56's first stage up to
11 of a block's 16 channels tied at 1.0, and after the default recovery PFP trailed the data-free magnitude score
at half the MACs (90.67% vs 91.47%; 91.79% with the default: benchmarks/results/recovery.md, and over three
calibration sets benchmarks/results/pfp_zero_below.md). A relative error at such a position is an absolute error
below ``zero_below`` × the unit's mean, which the refit and the network hardly see. ``zero_below=0`` is the
definition read literally.

Variants:

* ``pfp`` keeps the top-``keep`` channels by s_j and changes no weight (what the paper's experiments ran);
* ``pfp-rand`` samples channels with replacement from p until ``keep`` distinct channels are drawn
  (m' draws), then multiplies consumer column j by c_j/(m'·p_j), c_j the times j was drawn: the
  importance-sampling estimator whose error PFP bounds. Channels with p_j = 0 are only taken when fewer
  than ``keep`` channels have p_j > 0, with their weights unchanged.
* ``pfp-top`` (hybrid): with m the number of draws whose expected number of distinct channels is
  ``keep`` (Σ_j 1 − (1 − p_j)^m = keep), the channels with p_j ≥ 1/m — those sampling would almost
  surely draw — are kept deterministically with their weights unchanged; the rest of the budget is
  importance-sampled from the remaining channels (probabilities renormalised), reweighted as above.

Sensitivities are taken over every position of every selection sample (the authors' tracker), and the
denominator sums over every input channel of the consumer, the group's or not (a concatenation's
other inputs count). They are computed in the capture pass, a few samples at a time, as a running
maximum: memory stays bounded without sampling rows, and rows × outputs × channels × taps are
processed as matrix and (max, ×) products, not one sample and one filter at a time as in torchprune.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from ..errors import StructPruneError
from . import register
from .base import ConsumerView, GroupView, Selection, top_k_sorted

ZERO_BELOW = 0.5  # a sum below this fraction of its unit's mean over the sample's positions counts as ≈ 0
_CHUNK_ELEMENTS = 2**20  # floats per temporary: far below glibc's 32 MiB mmap threshold (no page faults)
_DENSE_SHARE = 2  # evaluate every pair densely when more than 1/_DENSE_SHARE of them pass the bound


def consumer_sensitivity(rows: Tensor, weight: Tensor, features: Tensor, floor: Tensor | None = None,
                         row_sample: Tensor | None = None, zero_below: float = 0.0) -> Tensor:
    """s_j of a consumer's group channels on ``rows`` (at least ``floor``, a running maximum, when given).

    rows: (P, F) the consumer's whole input at P positions, flattened as ``weight`` (O, F) is;
    features: (C, k) the columns of ``weight`` that read each group channel. The denominators sum over
    all F columns. ``zero_below``: a denominator below this fraction of its unit's mean over the rows of the same
    sample (``row_sample`` (P,): each row's sample; None: every row a sample of its own) counts as ≈ 0.
    With everything non-negative, max over i, κ, p of A'[p, f]·W[i, f]/T[p, i] is max over p of A'[p, f]·M[p, f],
    where T = A'·Wᵀ (one matrix product) and M[p, f] = max_i W[i, f]/T[p, i]: a (max, ×) product, the only
    rows × out × features pass.

    It is evaluated only at the (p, c) whose bound max_i(1/T[p, i])·max_{i,κ} W[i, c, κ]·max_κ A'[p, c, κ]
    (then, with taps, max_i (1/T[p, i])·max_κ W[i, c, κ]·max_κ A'[p, c, κ]) beats the running maximum. Rounding is
    monotone, so the float bounds bound the float products: the result is bit for bit the dense evaluation's.
    """
    rows, weight = rows.float(), weight.float()
    return _sensitivity(_Rows(rows, features, row_sample), weight, features, floor, zero_below)


def conv_sensitivity(x: Tensor, conv: nn.Module, channel_index: Tensor, floor: Tensor | None = None,
                     zero_below: float = 0.0) -> Tensor:
    """:func:`consumer_sensitivity` of a Conv1d/Conv2d consumer (``groups=1``) on its whole input ``x``, without
    unfolding it: T is the convolution of A' with W±, max_κ A' a max-pooling of the group's input channels, and
    only the (p, c) the bound leaves are read as patches (the full patches only where the bound prunes little).
    ``channel_index`` (C, w): the conv's input channels each group channel stands for; ``zero_below``: as in
    :func:`consumer_sensitivity`, over each sample's output positions. Equal to the unfolded evaluation up to the
    rounding of the convolution against the matrix product."""
    taps = conv.weight[0, 0].numel()
    features = (channel_index[:, :, None] * taps + torch.arange(taps)).reshape(len(channel_index), -1)
    weight = conv.weight.detach().float().reshape(len(conv.weight), -1)
    return _sensitivity(_ConvInput(x.float(), conv, channel_index.to(x.device), features), weight, features, floor,
                        zero_below)


def conv_sensitivity_applies(conv: nn.Module) -> bool:
    """Whether :func:`conv_sensitivity` covers ``conv``: an ungrouped Conv1d/Conv2d with zero padding that
    max-pooling accepts (at most half the kernel)."""
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "valid"
    return all(p <= k // 2 for p, k in zip(conv.padding, conv.kernel_size, strict=True))


def _columns(features: Tensor, width: int, device) -> tuple[Tensor, bool]:
    """The flat column indices ``features`` (C, k) name among ``width`` columns, and whether they are all of
    them in order (then no gather is needed)."""
    columns = features.reshape(-1).to(device)
    return columns, len(columns) == width and bool((columns == torch.arange(width, device=device)).all())


class _Source:
    """The consumer's input as :func:`_sensitivity` reads it (``values``: the input itself, in some layout):
    its non-negative parts, then per part the denominators, the taps' maxima and the values at (p, c) pairs."""

    values: Tensor
    _numerators: Tensor | None = None

    def parts(self) -> list:
        """A' itself if the input is non-negative, else relu(A) and relu(−A)."""
        if not self.values.numel() or float(self.values.min()) >= 0:
            return [self]
        return [self._with(self.values.clamp(min=0)), self._with((-self.values).clamp(min=0))]

    def _with(self, values: Tensor):
        part = copy.copy(self)
        part.values, part._numerators = values, None
        return part


class _Rows(_Source):
    """The consumer's input as rows (P, F), from the samples ``row_sample`` (P,) (None: one row each)."""

    def __init__(self, rows: Tensor, features: Tensor, row_sample: Tensor | None = None):
        self.values = rows
        self.row_sample = None if row_sample is None else row_sample.to(rows.device)
        self.columns, self.whole = _columns(features, rows.shape[1], rows.device)
        self.shape = tuple(features.shape)  # (C, k)
        self.device = rows.device

    def total(self, w: Tensor) -> Tensor:
        return self.values @ w.T

    def sample_means(self, total: Tensor) -> Tensor | None:  # (P, O): each row's sample's mean of ``total``
        if self.row_sample is None:
            return None  # every row its own sample: the mean is the row itself
        samples, index = torch.unique(self.row_sample, return_inverse=True)
        sums = total.new_zeros(len(samples), total.shape[1]).index_add_(0, index, total)
        counts = torch.bincount(index, minlength=len(samples)).to(total.dtype)
        return (sums / counts[:, None]).index_select(0, index)

    def numerators(self) -> Tensor:  # (P, C, k)
        if self._numerators is None:
            rows = self.values
            self._numerators = (rows if self.whole else rows[:, self.columns]).reshape(len(rows), *self.shape)
        return self._numerators

    def a_max(self) -> Tensor:  # (P, C)
        numerators = self.numerators()
        return numerators.transpose(1, 2).amax(dim=1) if self.shape[1] > 1 else numerators[:, :, 0]

    def at(self, p: Tensor, c: Tensor) -> Tensor:  # (n, k)
        return self.numerators()[p, c]


class _ConvInput(_Source):
    """A conv consumer's input (N, C_in, H, W) read as the rows of its unfolding, without forming them."""

    def __init__(self, x: Tensor, conv: nn.Module, channel_index: Tensor, features: Tensor):
        from ..capture import _as_2d, _geometry, _out_size

        self.values, self.conv, self.channel_index = _as_2d(conv, x), conv, channel_index
        self.features = features.reshape(-1).to(x.device)  # the unfolding's columns of each group channel
        self.kernel, self.stride, self.dilation, self.padding = _geometry(conv)
        n, _, h, w = self.values.shape
        self.out = tuple(_out_size(size + 2 * pad, k, st, d) for size, pad, k, st, d in zip(
            (h, w), self.padding, self.kernel, self.stride, self.dilation, strict=True))
        self.device = x.device

    def _rows(self, value: Tensor) -> Tensor:  # (N, D, H', W') -> (P, D), positions in the unfolding's order
        return value.permute(0, 2, 3, 1).reshape(-1, value.shape[1])

    def total(self, w: Tensor) -> Tensor:
        weight = w.reshape(len(w), self.values.shape[1], *self.kernel)
        return self._rows(nn.functional.conv2d(self.values, weight, stride=self.stride, padding=self.padding,
                                               dilation=self.dilation))

    def sample_means(self, total: Tensor) -> Tensor:  # (P, O): the mean over each sample's output positions
        positions = self.out[0] * self.out[1]
        means = total.reshape(-1, positions, total.shape[1]).mean(dim=1)
        return means.repeat_interleave(positions, dim=0)

    def a_max(self) -> Tensor:
        channels, width = self.channel_index.shape
        pooled = nn.functional.max_pool2d(self.values[:, self.channel_index.reshape(-1)], self.kernel, self.stride,
                                          self.padding, self.dilation)  # pads with -inf: the taps on zeros
        pooled = pooled.clamp(min=0)  # ...are zeros (the input is ≥ 0)
        if width > 1:
            pooled = pooled.reshape(len(pooled), channels, width, *pooled.shape[2:]).amax(dim=2)
        return self._rows(pooled)

    def numerators(self) -> Tensor:  # every (P, C, k): the unfolding itself
        if self._numerators is None:
            cols = nn.functional.unfold(self.values, self.kernel, dilation=self.dilation, padding=self.padding,
                                        stride=self.stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            self._numerators = rows[:, self.features].reshape(len(rows), len(self.channel_index), -1)
        return self._numerators

    def at(self, p: Tensor, c: Tensor) -> Tensor:
        """The patches of group channels ``c`` at positions ``p``: (n, w·k), zero on the padding."""
        if self._numerators is not None:
            return self._numerators[p, c]
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel, self.stride, self.dilation, self.padding
        out_h, out_w = self.out
        h, w = self.values.shape[2:]
        sample, rest = p // (out_h * out_w), p % (out_h * out_w)
        dy = (torch.arange(kh, device=self.device) * dh).repeat_interleave(kw)
        dx = (torch.arange(kw, device=self.device) * dw).repeat(kh)
        ys = (rest // out_w * sh - ph)[:, None] + dy  # (n, k)
        xs = (rest % out_w * sw - pw)[:, None] + dx
        real = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        inputs = self.channel_index[c]  # (n, w)
        values = self.values[sample[:, None, None], inputs[:, :, None], ys.clamp(0, h - 1)[:, None],
                             xs.clamp(0, w - 1)[:, None]]  # (n, w, k)
        return (values * real[:, None].to(values.dtype)).reshape(len(p), -1)


def _sensitivity(source, weight: Tensor, features: Tensor, floor: Tensor | None, zero_below: float = 0.0) -> Tensor:
    """The evaluation :func:`consumer_sensitivity` describes, on a :class:`_Source` (:class:`_Rows` or
    :class:`_ConvInput`)."""
    channels, taps = features.shape
    columns, whole = _columns(features, weight.shape[1], weight.device)
    best = torch.zeros(channels, device=source.device) if floor is None else floor.float().to(source.device).clone()
    seeded = floor is not None
    for part in source.parts():
        a_max = None
        for w in (weight.clamp(min=0), (-weight).clamp(min=0)):
            total = part.total(w)  # (P, O): Σ over every input feature
            inverse = torch.where(total > _negligible(part, total, zero_below), 1 / total.clamp(min=1e-12), 0.0)
            w_group = (w if whole else w[:, columns]).reshape(len(w), channels, taps).permute(1, 2, 0).contiguous()
            w_max = w_group.amax(dim=1) if taps > 1 else w_group[:, 0]  # (C, O): max over the channel's taps
            if a_max is None:
                a_max = part.a_max()  # (P, C): max over taps
            bound = (inverse.amax(dim=1)[:, None] * w_max.amax(dim=1)[None]).mul_(a_max)  # (P, C)
            if not seeded:  # a first lower bound: each channel's likeliest row
                top = bound.amax(dim=0)
                p, c = ((bound == top) & (top > best)).nonzero(as_tuple=True)
                _raise_to_products(best, inverse, w_group, part, p, c)
                seeded = True
            p, c = (bound > best).nonzero(as_tuple=True)
            if _DENSE_SHARE * len(p) > bound.numel():  # the bound prunes little here: every pair, without gathers
                _dense_products(best, inverse, w_group, part.numerators())
                continue
            if taps > 1 and len(p):
                closer = (inverse.index_select(0, p) * w_max.index_select(0, c)).amax(dim=1).mul_(a_max[p, c])
                beats = closer > best.index_select(0, c)
                p, c = p[beats], c[beats]
            _raise_to_products(best, inverse, w_group, part, p, c)
    return best


def _negligible(source, total: Tensor, zero_below: float) -> Tensor | float:
    """The sums T[p, i] at or below which g counts as 0: 1e-12, or ``zero_below`` × unit i's mean over the
    sample's positions where that is more."""
    means = source.sample_means(total) if zero_below > 0 else None
    return 1e-12 if means is None else (means * zero_below).clamp_(min=1e-12)


def _raise_to_products(best: Tensor, inverse: Tensor, w_group: Tensor, source, p: Tensor, c: Tensor) -> None:
    """best[c] ← max(best[c], max over κ of A'[p, c, κ]·max_i (1/T[p, i])·W[i, c, κ]) for each pair (p, c):
    inverse (P, O), w_group (C, k, O), ``source.at(p, c)`` the (n, k) values A'[p, c, :]."""
    taps, out = w_group.shape[1], w_group.shape[2]
    step = max(1, _CHUNK_ELEMENTS // (out * taps))
    for start in range(0, len(p), step):
        rows, chans = p[start:start + step], c[start:start + step]
        m = (inverse.index_select(0, rows)[:, None, :] * w_group.index_select(0, chans)).amax(dim=2)  # (n, k)
        best.scatter_reduce_(0, chans, (source.at(rows, chans) * m).amax(dim=1), "amax")


def _dense_products(best: Tensor, inverse: Tensor, w_group: Tensor, numerators: Tensor) -> None:
    """:func:`_raise_to_products` for every pair (p, c), a few rows at a time."""
    channels, taps, out = w_group.shape
    flat = w_group.permute(2, 0, 1).reshape(out, channels * taps)  # (O, C·k)
    step = max(1, _CHUNK_ELEMENTS // flat.numel())
    for start in range(0, len(inverse), step):
        m = (inverse[start:start + step, :, None] * flat[None]).amax(dim=1)  # (rows, C·k)
        a = numerators[start:start + step].reshape(-1, channels * taps)
        torch.maximum(best, (a * m).reshape(-1, channels, taps).amax(dim=(0, 2)), out=best)


def sensitivities(consumer: ConsumerView, zero_below: float = 0.0) -> Tensor:
    """s_j of each channel for one consumer: captured over every position (:func:`structprune.capture.capture`
    with ``sensitivity_samples``, which applies its own ``zero_below``), or else computed on the view's rows
    (group channels only; ``zero_below`` over the rows of each ``row_sample``)."""
    if consumer.sensitivity is not None:
        return consumer.sensitivity
    out, channels, taps = consumer.weight.shape
    features = torch.arange(channels * taps).reshape(channels, taps)
    return consumer_sensitivity(consumer.inputs.reshape(len(consumer.inputs), -1),
                                consumer.weight.reshape(out, -1), features, row_sample=consumer.row_sample,
                                zero_below=zero_below)


def calibration_size(layer_outputs: list[int], delta: float) -> int:
    """PFP's calibration-set size |S| = ⌈3·ln(8·η·η*/δ)⌉.

    ``layer_outputs``: output elements per sample of each Conv/Linear layer; η is their sum, η* their max.
    """
    eta, eta_max = sum(layer_outputs), max(layer_outputs)
    return max(1, math.ceil(3 * math.log(8 * eta * eta_max / delta)))


def group_sensitivities(group: GroupView, zero_below: float = 0.0) -> Tensor:
    """s_j of each channel of a group: the maximum over its consumers (float64, CPU)."""
    return torch.stack([sensitivities(c, zero_below).cpu().double() for c in group.consumers]).amax(dim=0)


class PFP:
    calib_samples = 256  # used only when the model's layer sizes are unknown
    data_informed = True
    needs_sensitivity = True  # the capture computes s_j over every position (ConsumerView.sensitivity)

    def __init__(self, name: str, mode: str, delta: float = 1e-16, zero_below: float = ZERO_BELOW):
        if not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise StructPruneError(f"delta must be in (0, 1), got {delta!r}")
        if isinstance(zero_below, bool) or not isinstance(zero_below, (int, float)) or not 0 <= zero_below < 1:
            raise StructPruneError(f"zero_below must be in [0, 1), got {zero_below!r}")
        self.name = name
        self.mode = mode  # "top-k", "sample" or "hybrid"
        self.delta = float(delta)
        self.zero_below = float(zero_below)  # read by the capture, which computes the sensitivities

    def default_calib_samples(self, layer_outputs: list[int]) -> int:
        return calibration_size(layer_outputs, self.delta)

    def scores(self, group: GroupView) -> Tensor:
        return group_sensitivities(group, self.zero_below)

    def select(self, group: GroupView, keep: int) -> Selection:
        s = self.scores(group)
        total = float(s.sum())
        stats = {"sensitivity_sum": total}
        if self.mode == "top-k" or total <= 0:
            return Selection(keep_idx=top_k_sorted(s, keep), stats=stats)
        prob = s / total
        factor = torch.ones(group.channels, dtype=torch.float64)
        fixed = torch.zeros(group.channels, dtype=torch.bool)
        if self.mode == "hybrid":
            fixed = prob * draws_for_distinct(prob, keep) >= 1
            if int(fixed.sum()) >= keep:
                return Selection(keep_idx=top_k_sorted(s, keep), stats=stats)
        rest = (~fixed).nonzero().flatten()
        if float(prob[rest].sum()) <= 0:  # fewer channels matter on this data than the budget keeps
            return Selection(keep_idx=top_k_sorted(s, keep), stats=stats)
        rest_prob = prob[rest] / prob[rest].sum()
        picked, counts, draws = _sample_until_distinct(rest_prob, keep - int(fixed.sum()), group.generator())
        sampled = counts > 0
        factor[rest[picked[sampled]]] = counts[sampled] / (draws * rest_prob[picked][sampled])
        keep_idx = torch.sort(torch.cat([fixed.nonzero().flatten(), rest[picked]])).values
        weights = {c.name: c.weight[:, keep_idx.to(c.weight.device)] * factor[keep_idx].to(c.weight)[None, :, None]
                   for c in group.consumers}
        stats.update(draws=draws, deterministic=int(fixed.sum()))
        return Selection(keep_idx=keep_idx, consumer_weights=weights, stats=stats)


def draws_for_distinct(prob: Tensor, distinct: float) -> float:
    """m such that m i.i.d. draws from ``prob`` give ``distinct`` distinct channels in expectation."""
    def expected(m: float) -> float:
        return float((1 - (1 - prob).pow(m)).sum())

    positive = int((prob > 0).sum())
    if distinct >= positive:
        return float("inf")
    low, high = 0.0, 1.0
    while expected(high) < distinct:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if expected(mid) < distinct else (low, mid)
    return high


def _sample_until_distinct(prob: Tensor, keep: int, generator: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """Draw i.i.d. from ``prob`` until ``keep`` distinct channels (or all with p > 0) are drawn.

    Returns the sorted kept channels, how often each was drawn, and the number of draws m'.
    """
    positive = int((prob > 0).sum())
    target = min(keep, positive)
    counts = torch.zeros(len(prob), dtype=torch.float64)
    draws = distinct = 0
    while distinct < target:
        block = torch.multinomial(prob, num_samples=max(keep, 16), replacement=True, generator=generator)
        for j in block.tolist():
            counts[j] += 1
            draws += 1
            distinct += int(counts[j] == 1)
            if distinct == target:
                break
    chosen = (counts > 0).nonzero().flatten()
    if len(chosen) < keep:  # fewer than keep channels matter on this data: fill with unweighted ones
        rest = (counts == 0).nonzero().flatten()[: keep - len(chosen)]
        chosen = torch.cat([chosen, rest])
    keep_idx = torch.sort(chosen).values
    return keep_idx, counts[keep_idx], draws


@register("pfp")
def pfp(delta: float = 1e-16, zero_below: float = ZERO_BELOW) -> PFP:
    """Deterministic PFP: top channels by sensitivity.

    delta: failure probability δ_S of PFP's calibration-set size rule ⌈3·ln(8·η·η*/δ_S)⌉, the default
    number of calibration samples (the selection's; the recovery reads more, see :func:`structprune.prune`).
    zero_below: a sensitivity's denominator counts as ≈ 0 below this fraction of its output unit's mean over the
    sample's positions (see the module's docstring); 0: only below 1e-12, the definition read literally.
    """
    return PFP("pfp", mode="top-k", delta=delta, zero_below=zero_below)


@register("pfp-rand")
def pfp_rand(delta: float = 1e-16, zero_below: float = ZERO_BELOW) -> PFP:
    """PFP with importance sampling and reweighting of the kept channels' consumer weights (options as ``pfp``'s)."""
    return PFP("pfp-rand", mode="sample", delta=delta, zero_below=zero_below)


@register("pfp-top")
def pfp_top(delta: float = 1e-16, zero_below: float = ZERO_BELOW) -> PFP:
    """Hybrid PFP: channels with p_j ≥ 1/m kept deterministically, the rest importance-sampled and reweighted
    (options as ``pfp``'s)."""
    return PFP("pfp-top", mode="hybrid", delta=delta, zero_below=zero_below)
