"""PFP's sensitivities (Liebenwein et al., ICLR 2020): the maths, on a consumer's whole input.

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

Sensitivities are taken over every position of every selection sample (the authors' tracker), and the
denominator sums over every input channel of the consumer, the group's or not (a concatenation's
other inputs count). They are computed in the capture pass, a few samples at a time, as a running
maximum: memory stays bounded without sampling rows, and rows × outputs × channels × taps are
processed as matrix and (max, ×) products, not one sample and one filter at a time as in torchprune.

The capture (:mod:`structprune.capture`) calls these as the calibration batches pass; the method
(:mod:`structprune.methods.pfp`) and PFP's allocation read the result.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .layers import as_2d, conv_geometry, out_size

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
        self.values, self.conv, self.channel_index = as_2d(conv, x), conv, channel_index
        self.features = features.reshape(-1).to(x.device)  # the unfolding's columns of each group channel
        self.kernel, self.stride, self.dilation, self.padding = conv_geometry(conv)
        n, _, h, w = self.values.shape
        self.out = tuple(out_size(size + 2 * pad, k, st, d) for size, pad, k, st, d in zip(
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
