"""i-SpaSP: iterative Sparse Structured Pruning (Wolfe & Kyrillidis, L4DC 2022).

Pruning as sparse signal recovery, as in the authors' released code, generalised to any group of
consumers. With Y = f(H) the dense consumer output and a[c] = Σ H[:, c] the aggregate activation:

    S = ∅
    repeat T times:
        R = Y − f(H_S)                       (R = Y while S is empty, as in the released code)
        g = ∂(½‖R‖²)/∂H summed over samples and positions   (= fᵀR: signed, no abs)
        Ω = top-2s channels by g
        S = top-s channels of Ω ∪ S ranked by a

Residuals and gradients are summed over all consumers of a coupled group. The BatchNorm directly
after a consumer is part of f (γ/σ and β − γμ/σ), the skip connection is not; while S is empty the
residual is the layer's whole output, BatchNorm shift included, as the released code computes it
(later the shift cancels). On a convolution, g is the gradient with respect to the hidden
representation itself: a patch tap on the zero padding is not a position of H and adds nothing, and
a[c] counts each position of H once (not once per patch that covers it). Once S repeats, every later
iteration would repeat it too (each step is a deterministic function of S), so the loop stops early
without changing the result.
"""

from __future__ import annotations

import torch

from ..errors import StructPruneError, check_positive_int
from . import register
from .base import GroupView, Selection, top_k_sorted

PROXIES = ("paper", "contribution")


class ISpaSP:
    name = "ispasp"
    calib_samples = 1280
    data_informed = True

    def __init__(self, iterations: int = 20, proxy: str = "contribution"):
        check_positive_int(iterations, "iterations")
        if proxy not in PROXIES:
            raise StructPruneError(f"ispasp proxy must be one of {', '.join(PROXIES)}, got {proxy!r}")
        self.iterations = iterations
        self.proxy = proxy

    def select(self, group: GroupView, keep: int) -> Selection:
        dense = [c.output() for c in group.consumers]
        whole = [c.full_output() for c in group.consumers]  # the first residual
        dense_norm = max(sum(float(y.square().sum()) for y in dense) ** 0.5, 1e-30)
        if self.proxy == "paper":
            activation = group.activation
        else:  # ‖x_c‖: the size of each channel's contribution to the consumers' outputs
            activation = sum(contribution_norms(c) for c in group.consumers)
        support = torch.empty(0, dtype=torch.long)
        history = []  # relative residual ‖Y − f(H_S)‖/‖Y‖ of S after each iteration that changed S
        for step in range(self.iterations + 1):
            residuals = [w if len(support) == 0 else y - c.output(support.to(y.device))
                         for c, y, w in zip(group.consumers, dense, whole, strict=False)]
            if len(support):
                history.append(sum(float(r.square().sum()) for r in residuals) ** 0.5 / dense_norm)
            if step == self.iterations:
                break
            # gradient of ½‖R‖² w.r.t. each consumer's input rows, summed over rows and taps:
            # Σ_m R[m] first, then back through the (linear) consumer and its BatchNorm scale
            if self.proxy == "paper":
                gradient = sum(hidden_gradient(c, r) for c, r in zip(group.consumers, residuals, strict=False))
            else:  # ⟨x_c, R⟩ row by row: the correlation of each channel's contribution with the residual
                gradient = sum(residual_correlation(c, r) for c, r in zip(group.consumers, residuals, strict=False))
            omega = top_k_sorted(gradient, min(2 * keep, group.channels))
            merged = torch.unique(torch.cat([omega, support]))
            new_support = merged[top_k_sorted(activation[merged.to(activation.device)].cpu(), keep)]
            if torch.equal(new_support, support):
                break
            support = new_support
        return Selection(keep_idx=support, stats={"iterations": len(history), "residual_history": history})


def hidden_gradient(consumer, residual) -> torch.Tensor:
    """∂(½‖R‖²)/∂H summed over samples and positions, per channel: Σ_m Σ_k real[m, k]·Σ_o W[o, c, k]·scale[o]·R[m, o]
    (a tap on the padding, real = 0, is no position of H)."""
    scaled = residual * consumer.output_scale
    if consumer.tap_mask is None:
        per_tap = scaled.sum(dim=0)[None].expand(consumer.weight.shape[2], -1)  # (taps, out)
    else:
        per_tap = consumer.tap_mask.to(scaled).T @ scaled
    return torch.einsum("ko,ock->c", per_tap, consumer.weight).double().cpu()


def contribution_norms(consumer, chunk: int = 4096) -> torch.Tensor:
    """‖x_c‖ for every channel c, x_c[m, o] = scale[o]·Σ_k Z[m, c, k]·W[o, c, k] its contribution to the output.

    ‖x_c‖² = Σ_m z_mcᵀ Q_c z_mc with Q_c = W_cᵀ diag(scale²) W_c (taps × taps), so no (rows, C, out)
    tensor is ever formed.
    """
    q = torch.einsum("ock,o,ocl->ckl", consumer.weight, consumer.output_scale.square(), consumer.weight)
    out = torch.zeros(consumer.inputs.shape[1], dtype=torch.float64)
    for start in range(0, consumer.inputs.shape[0], chunk):
        z = consumer.inputs[start:start + chunk]
        out += torch.einsum("mck,ckl,mcl->c", z, q, z).double().cpu()
    return out.clamp(min=0).sqrt()


def residual_correlation(consumer, residual, chunk: int = 4096) -> torch.Tensor:
    """⟨x_c, R⟩ for every channel c (see :func:`contribution_norms`), computed through the taps."""
    out = torch.zeros(consumer.inputs.shape[1], dtype=torch.float64)
    for start in range(0, consumer.inputs.shape[0], chunk):
        back = torch.einsum("mo,ock->mck", residual[start:start + chunk] * consumer.output_scale, consumer.weight)
        out += (consumer.inputs[start:start + chunk] * back).sum(dim=(0, 2)).double().cpu()
    return out


@register("ispasp")
def ispasp(iterations: int = 20, proxy: str = "contribution") -> ISpaSP:
    """iterations: T, the number of identify-merge-threshold rounds (20 in the paper's code).
    proxy: "contribution" (default: the correlation ⟨x_c, R⟩ of each channel's contribution x_c to the
    layer's output with the residual, ranking by ‖x_c‖; measured better on every model in
    benchmarks/README.md, and right for signed representations such as attention heads and GELU FFNs) or
    "paper" (the released code: the signed gradient summed over samples and positions, ranking by the
    aggregate activation Σ H)."""
    return ISpaSP(iterations, proxy)
