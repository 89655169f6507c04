"""Least-squares reconstruction of the consumers on the kept channels (on by default, for any method).

For each consumer, with Z the calibration rows of the group's channels, Z_S those of the kept channels
(M, s·taps) and a target T, the new weight solves

    min_W', δ  ‖T − b − Z_S·W'ᵀ − δ‖²   (per output unit; a BatchNorm scale after the consumer does not change it)

The target is the layer's output in the original, unpruned model at the same rows when the capture
recorded it (``ConsumerView.target``: the reconstruction then also undoes the error accumulated
upstream), else the dense layer on the current inputs, Z·Wᵀ + b. The bias change δ is written into the
consumer's bias when it has one (the removed channels' mean contribution moves into it); for a consumer
without bias followed by a BatchNorm it goes into that BatchNorm's running mean (μ − δ), so that the groups
pruned after this one already read the refitted layer's output, not one off by δ until the recalibration
(measured: ResNet-56 at 50% of the MACs lost up to 2 points of accuracy to that, benchmarks/rows.py).
The normal equations are accumulated over row chunks in float64 (memory independent of the
number of rows) and solved by Cholesky with a ridge relative to the spectrum (``ridge`` times the
mean eigenvalue of Z_Sᵀ·Z_S) that pulls W' towards the method's own weights, not towards zero: where
the rows do not determine a weight (fewer rows than kept inputs, or channels that never fire on
the calibration data), it stays as the method left it. The refit is kept only where it lowers the
consumer's reconstruction error on the calibration rows, so it never makes a layer worse there; the
errors come from the same normal equations, without another pass over the rows. The equations read
``ROWS_PER_FEATURE`` rows per kept input (every k-th captured row: the capture keeps that many per captured
input, and the kept inputs are fewer), the rule the capture itself follows. Consumers with more
than ``max_features`` kept inputs (s·taps) are left as the method chose them, and the report says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import capture
from .methods.base import GroupView, NormalEquations, Selection

MAX_FEATURES = 16384
RIDGE = 1e-4


def refit(view: GroupView, selection: Selection, max_features: int = MAX_FEATURES, ridge: float = RIDGE) -> Selection:
    """``selection`` with least-squares consumer weights (and biases); ``stats["refit"]`` says, per consumer,
    what it did: the squared errors before and after, whether the refit was applied, and the squared norm of the
    target on the same rows (``target_energy``: what makes the errors relative)."""
    chosen = dict(selection.consumer_weights or {})
    biases = dict(selection.consumer_biases or {})
    weights, report = {}, {}
    for consumer in view.consumers:
        keep_idx = selection.keep_idx.to(consumer.inputs.device)
        out, _, taps = consumer.weight.shape
        start = chosen.get(consumer.name, consumer.weight[:, keep_idx])
        features = len(keep_idx) * taps
        if features > max_features or consumer.grouped:
            weights[consumer.name] = start
            report[consumer.name] = ("not refitted: a grouped convolution (a free fit would fill the weights its "
                                     "groups keep zero)" if consumer.grouped
                                     else f"not refitted: {features} kept inputs, more than {max_features}")
            continue
        # ROWS_PER_FEATURE rows per unknown, as the capture keeps per captured input (more measured no better):
        # the kept inputs are fewer, so every k-th row (k = rows per kept input over the rule, at least 1)
        per_input = capture.ROWS_PER_FEATURE  # read here: benchmarks/rows.py varies it (0: every row)
        stride = max(1, len(consumer.inputs) // (per_input * features)) if per_input else 1
        equations = consumer.normal_equations(keep_idx, stride)
        start_flat = start.reshape(out, -1).T.double().cpu()
        intercept = consumer.bias is not None or consumer.normalized
        fitted, delta = _solve(equations, start_flat, ridge, fit_bias=intercept)
        start_delta = equations.best_shift(start_flat) if consumer.normalized else None
        before, after = equations.error(start_flat, start_delta), equations.error(fitted, delta)
        better = after < before
        weights[consumer.name] = fitted.T.reshape(out, len(keep_idx), taps).to(consumer.weight) if better else start
        if better and delta is not None:  # a consumer without bias: into the BatchNorm that follows it
            base = consumer.bias if consumer.bias is not None else torch.zeros_like(consumer.output_scale)
            biases[consumer.name] = (base.double().cpu() + delta).to(base)
        report[consumer.name] = {"error_before": before, "error_after": min(after, before), "applied": better,
                                 "target_energy": float((equations.scale_sq * equations.target_sq).sum())}
    return Selection(selection.keep_idx, weights, {**selection.stats, "refit": report}, biases or None)


def _solve(eq: NormalEquations, prior: Tensor, ridge: float, fit_bias: bool) -> tuple[Tensor, Tensor | None]:
    """Weights (F, O) and, with ``fit_bias``, the bias change (O) minimising the error plus
    λ·‖W' − prior‖² (λ = ``ridge`` × the mean eigenvalue of the Gram)."""
    size = eq.gram.shape[0] if fit_bias else eq.gram.shape[0] - 1
    gram = eq.gram[:size, :size]
    features = eq.gram.shape[0] - 1
    level = max(float(torch.diagonal(gram)[:features].mean()), 1e-30)
    lam = ridge * level
    for _ in range(8):  # Cholesky of the regularised Gram; more ridge only if it is numerically singular
        regularised = gram + lam * torch.diag(torch.cat([torch.ones(features, dtype=gram.dtype),
                                                         torch.zeros(size - features, dtype=gram.dtype)]))
        cross = eq.cross[:size].clone()
        cross[:features] += lam * prior
        factor, info = torch.linalg.cholesky_ex(regularised)
        if int(info) == 0:
            solution = torch.cholesky_solve(cross, factor)
            break
        lam *= 100
    else:
        solution = torch.linalg.lstsq(regularised, cross).solution
    return solution[:features], (solution[features] if fit_bias else None)


def relative_residuals(view: GroupView, selections: list[Selection]) -> list[float]:
    """‖Y − Ŷ‖/‖Y‖ over all consumers of the group for each selection, Ŷ using only its kept channels (and
    new weights and biases); the dense Y is computed once."""
    sq_errors, sq_dense = [0.0] * len(selections), 0.0
    for consumer in view.consumers:
        dense = consumer.output()
        sq_dense += float(dense.square().sum())
        for i, selection in enumerate(selections):
            approx = consumer.output(selection.keep_idx.to(dense.device),
                                     weight=(selection.consumer_weights or {}).get(consumer.name),
                                     bias=(selection.consumer_biases or {}).get(consumer.name))
            sq_errors[i] += float((dense - approx).square().sum())
    return [(e / sq_dense) ** 0.5 if sq_dense > 0 else 0.0 for e in sq_errors]
