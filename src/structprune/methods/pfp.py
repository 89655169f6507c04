"""PFP: Provable Filter Pruning (Liebenwein et al., ICLR 2020), with channels removed for real.

Each input channel j of a consumer gets a sensitivity s_j on calibration data: the largest share of any output
unit's (positive or negative) pre-activation it makes up at any position of any sample
(:mod:`structprune.sensitivity` has the definition and its computation, over every position, in the capture pass).
The scores of a coupled group are the maximum over its consumers; p_j = s_j / Σ s.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import StructPruneError
from ..sensitivity import ZERO_BELOW, consumer_sensitivity
from .base import ConsumerView, GroupView, MethodBase, Needs, Selection, top_k_sorted


def sensitivities(consumer: ConsumerView, zero_below: float = 0.0) -> Tensor:
    """s_j of each channel for one consumer: captured over every position (:func:`structprune.capture.capture`
    with ``sensitivity_samples``, which applies its own ``zero_below``), or else computed on the view's rows
    (a view whose rows are all the consumer's input; ``zero_below`` over the rows of each ``row_sample``). A view
    of sampled rows is refused: a maximum over a sample of the positions is not PFP's sensitivity."""
    if consumer.sensitivity is not None:
        return consumer.sensitivity
    if not consumer.rows_complete:
        raise StructPruneError(f"pfp: layer {consumer.name}'s view keeps a sample of its input rows, and PFP's "
                               f"sensitivity is a maximum over every position of every sample: capture it with "
                               f"sensitivity_samples=N (structprune.prune does)")
    out, channels, taps = consumer.weight.shape
    features = torch.arange(channels * taps).reshape(channels, taps)
    return consumer_sensitivity(consumer.inputs.reshape(len(consumer.inputs), -1),
                                consumer.weight.reshape(out, -1), features, row_sample=consumer.row_sample,
                                zero_below=zero_below)


def calibration_size(layer_outputs: Sequence[int], delta: float) -> int:
    """PFP's calibration-set size |S| = ⌈3·ln(8·η·η*/δ)⌉.

    ``layer_outputs``: output elements per sample of each Conv/Linear layer; η is their sum, η* their max.
    """
    eta, eta_max = sum(layer_outputs), max(layer_outputs)
    return max(1, math.ceil(3 * math.log(8 * eta * eta_max / delta)))


def group_sensitivities(group: GroupView, zero_below: float = 0.0) -> Tensor:
    """s_j of each channel of a group: the maximum over its consumers (float64, CPU)."""
    return torch.stack([sensitivities(c, zero_below).cpu().double() for c in group.consumers]).amax(dim=0)


class PFP(MethodBase):
    def __init__(self, name: str, mode: str, delta: float = 1e-16, zero_below: float = ZERO_BELOW):
        if not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise StructPruneError(f"delta must be in (0, 1), got {delta!r}")
        if isinstance(zero_below, bool) or not isinstance(zero_below, (int, float)) or not 0 <= zero_below < 1:
            raise StructPruneError(f"zero_below must be in [0, 1), got {zero_below!r}")
        self.name = name
        self.mode = mode  # "top-k", "sample" or "hybrid"
        self.delta = float(delta)
        self.zero_below = float(zero_below)

    @property
    def needs(self) -> Needs:
        """s_j over every position (``ConsumerView.sensitivity``), computed by the capture with ``zero_below``."""
        return Needs(sensitivity=True, zero_below=self.zero_below)

    def calibration_samples(self, layer_outputs: Sequence[int]) -> int:
        return calibration_size(layer_outputs, self.delta) if layer_outputs else self.calib_samples

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


def pfp(delta: float = 1e-16, zero_below: float = ZERO_BELOW) -> PFP:
    """Deterministic PFP: top channels by sensitivity.

    delta: failure probability δ_S of PFP's calibration-set size rule ⌈3·ln(8·η·η*/δ_S)⌉, the default
    number of calibration samples (the selection's; the recovery reads more, see :func:`structprune.prune`).
    zero_below: a sensitivity's denominator counts as ≈ 0 below this fraction of its output unit's mean over the
    sample's positions (see the module's docstring); 0: only below 1e-12, the definition read literally.
    """
    return PFP("pfp", mode="top-k", delta=delta, zero_below=zero_below)


def pfp_rand(delta: float = 1e-16, zero_below: float = ZERO_BELOW) -> PFP:
    """PFP with importance sampling and reweighting of the kept channels' consumer weights (options as ``pfp``'s)."""
    return PFP("pfp-rand", mode="sample", delta=delta, zero_below=zero_below)


def pfp_top(delta: float = 1e-16, zero_below: float = ZERO_BELOW) -> PFP:
    """Hybrid PFP: channels with p_j ≥ 1/m kept deterministically, the rest importance-sampled and reweighted
    (options as ``pfp``'s)."""
    return PFP("pfp-top", mode="hybrid", delta=delta, zero_below=zero_below)
