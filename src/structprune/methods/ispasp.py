"""i-SpaSP: iterative Sparse Structured Pruning (Wolfe & Kyrillidis, L4DC 2022).

Pruning as sparse signal recovery, as in the authors' released code, generalised to any group of
consumers. With Y = f(H) the dense consumer output and a[c] = Σ H[:, c] the aggregate activation:

    S = ∅
    repeat T times:
        R = Y − f(H_S)                       (R = Y while S is empty, as in the released code)
        g = ∂(½‖f(H) − f(H_S)‖²)/∂H summed over rows and taps   (= fᵀR: signed, no abs)
        Ω = top-2s channels by g
        S = top-s channels of Ω ∪ S ranked by a

Residuals and gradients are summed over all consumers of a coupled group. The BatchNorm directly
after a consumer is part of f (its γ/σ scale), the skip connection is not. Once S repeats, every
later iteration would repeat it too (each step is a deterministic function of S), so the loop stops
early without changing the result.
"""

from __future__ import annotations

import torch

from ..errors import check_positive_int
from . import register
from .base import GroupView, Selection, top_k_sorted


class ISpaSP:
    name = "ispasp"
    calib_samples = 1280
    data_informed = True

    def __init__(self, iterations: int = 20):
        check_positive_int(iterations, "iterations")
        self.iterations = iterations

    def select(self, group: GroupView, keep: int) -> Selection:
        dense = [c.output() for c in group.consumers]
        dense_norm = max(sum(float(y.square().sum()) for y in dense) ** 0.5, 1e-30)
        activation = group.activation
        support = torch.empty(0, dtype=torch.long)
        history = []  # relative residual ‖Y − f(H_S)‖/‖Y‖ of S after each iteration that changed S
        for step in range(self.iterations + 1):
            residuals = [y if len(support) == 0 else y - c.output(support.to(y.device))
                         for c, y in zip(group.consumers, dense, strict=False)]
            if len(support):
                history.append(sum(float(r.square().sum()) for r in residuals) ** 0.5 / dense_norm)
            if step == self.iterations:
                break
            # gradient of ½‖R‖² w.r.t. each consumer's input rows, summed over rows and taps:
            # Σ_m R[m] first, then back through the (linear) consumer and its BatchNorm scale
            gradient = sum(torch.einsum("o,ock->c", c.output_scale * r.sum(dim=0), c.weight).double().cpu()
                           for c, r in zip(group.consumers, residuals, strict=False))
            omega = top_k_sorted(gradient, min(2 * keep, group.channels))
            merged = torch.unique(torch.cat([omega, support]))
            new_support = merged[top_k_sorted(activation[merged.to(activation.device)].cpu(), keep)]
            if torch.equal(new_support, support):
                break
            support = new_support
        return Selection(keep_idx=support, stats={"iterations": len(history), "residual_history": history})


@register("ispasp")
def ispasp(iterations: int = 20) -> ISpaSP:
    """iterations: T, the number of identify-merge-threshold rounds (20 in the paper's code)."""
    return ISpaSP(iterations)
