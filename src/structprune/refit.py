"""Least-squares refit of the consumers on the kept channels (an option for any method).

For each consumer, with Z_S the calibration rows restricted to the kept channels (M, s·taps) and the
dense pre-BatchNorm output Z·Wᵀ as the target, the new weight solves

    min_W' ‖Z·Wᵀ − Z_S·W'ᵀ‖²   (per output unit; the BatchNorm scale and the bias do not change it)

in float64 through the normal equations with a tiny ridge for stability. The refit is kept only
where it lowers the consumer's reconstruction error on the calibration rows, so it never makes a
layer worse there. Consumers with more than ``max_features`` kept inputs (s·taps) are left as the
method chose them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .methods.base import ConsumerView, GroupView, Selection

MAX_FEATURES = 8192


def refit(view: GroupView, selection: Selection, max_features: int = MAX_FEATURES) -> Selection:
    """``selection`` with least-squares consumer weights; ``stats["refit"]`` says, per consumer, what it did."""
    chosen = dict(selection.consumer_weights or {})
    weights, report = {}, {}
    for consumer in view.consumers:
        keep_idx = selection.keep_idx.to(consumer.inputs.device)
        start = chosen.get(consumer.name, consumer.weight[:, keep_idx])
        before = _error(consumer, keep_idx, start)
        if len(keep_idx) * consumer.weight.shape[2] > max_features:
            weights[consumer.name] = start
            report[consumer.name] = "skipped: too many kept inputs"
            continue
        fitted = _least_squares(consumer, keep_idx)
        after = _error(consumer, keep_idx, fitted)
        better = after < before
        weights[consumer.name] = fitted if better else start
        report[consumer.name] = {"error_before": before, "error_after": min(after, before), "applied": better}
    return Selection(selection.keep_idx, weights, {**selection.stats, "refit": report})


def _least_squares(consumer: ConsumerView, keep_idx: Tensor) -> Tensor:
    rows, _, taps = consumer.inputs.shape
    out = consumer.weight.shape[0]
    kept = consumer.inputs[:, keep_idx].reshape(rows, -1).double()
    target = torch.einsum("mck,ock->mo", consumer.inputs.double(), consumer.weight.double())
    gram = kept.T @ kept
    ridge = 1e-8 * float(torch.diagonal(gram).mean().clamp(min=1e-30))
    gram += ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram, kept.T @ target)  # (s·taps, out)
    return solution.T.reshape(out, len(keep_idx), taps).to(consumer.weight.dtype)


def _error(consumer: ConsumerView, keep_idx: Tensor, weight: Tensor) -> float:
    """‖f(H) − f_S(H)‖² on the calibration rows (BatchNorm scale included)."""
    return float((consumer.output() - consumer.output(keep_idx, weight=weight)).double().square().sum())
