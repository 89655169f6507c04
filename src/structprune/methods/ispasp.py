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

``proxy="cosamp"`` is the loop in CoSaMP's own form, of which i-SpaSP is the channel version: the
channels are identified by the group norm of the residual's correlation with their inputs, and the
merged support is thresholded by a least-squares estimate on it (each channel ranked by the energy of
its least-squares contribution), the residual of S being that of the least-squares fit on S. Selection
and reconstruction then optimise one objective, and the selection returns the fitted weights (and the
bias change, where the consumer has a bias). Everything is computed from the normal equations of all
the group's inputs, accumulated once; a consumer with more than ``COSAMP_MAX_FEATURES`` inputs
(channels·taps) makes the group fall back to the contribution proxy, and its stats say so.
"""

from __future__ import annotations

import torch

from ..errors import StructPruneError, check_positive_int
from .base import GroupView, MethodBase, Selection, top_k_sorted

PROXIES = ("paper", "contribution", "cosamp")
COSAMP_MAX_FEATURES = 8192


class ISpaSP(MethodBase):
    name = "ispasp"
    calib_samples = 1280

    def __init__(self, iterations: int = 20, proxy: str = "contribution"):
        check_positive_int(iterations, "iterations")
        if proxy not in PROXIES:
            raise StructPruneError(f"ispasp proxy must be one of {', '.join(PROXIES)}, got {proxy!r}")
        self.iterations = iterations
        self.proxy = proxy

    def select(self, group: GroupView, keep: int) -> Selection:
        if self.proxy == "cosamp":
            inputs = max(c.weight.shape[1] * c.weight.shape[2] for c in group.consumers)
            if inputs <= COSAMP_MAX_FEATURES:
                return self._select_cosamp(group, keep)
            selection = ISpaSP(self.iterations, "contribution").select(group, keep)
            selection.stats["fallback"] = (f"contribution proxy: {inputs} inputs, more than the cosamp proxy's "
                                           f"{COSAMP_MAX_FEATURES}")
            return selection
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

    def _select_cosamp(self, group: GroupView, keep: int) -> Selection:
        fits = [_LeastSquares(c) for c in group.consumers]
        dense_norm = max(sum(f.target_energy for f in fits) ** 0.5, 1e-30)
        support = torch.empty(0, dtype=torch.long)
        history = []  # relative residual of the least-squares fit on S after each iteration that changed S
        for step in range(self.iterations + 1):
            coefs = [f.fit(support) for f in fits]
            if len(support):
                history.append(sum(f.error(support, b) for f, b in zip(fits, coefs, strict=True)) ** 0.5 / dense_norm)
            if step == self.iterations:
                break
            correlation = sum(f.correlation(support, b) for f, b in zip(fits, coefs, strict=True))
            omega = top_k_sorted(correlation, min(2 * keep, group.channels))
            merged = torch.unique(torch.cat([omega, support]))
            energy = sum(f.energies(merged, f.fit(merged)) for f in fits)
            new_support = merged[top_k_sorted(energy, keep)]
            if torch.equal(new_support, support):
                break
            support = new_support
        weights, biases = {}, {}
        for fit, coef in zip(fits, coefs, strict=True):  # the loop always ends with the fits on S
            weights[fit.consumer.name], delta = fit.weights(support, coef)
            if delta is not None and fit.consumer.bias is not None:
                biases[fit.consumer.name] = (fit.consumer.bias.double().cpu() + delta).to(fit.consumer.bias)
        return Selection(keep_idx=support, consumer_weights=weights, consumer_biases=biases or None,
                         stats={"iterations": len(history), "residual_history": history})


class _LeastSquares:
    """One consumer's least-squares reconstruction objective over channel supports S (CoSaMP's estimates),
    from the normal equations of all its inputs and a constant (see ``ConsumerView.normal_equations``).
    Each output's error is weighted by the BatchNorm scale² after the consumer, as the refit weighs it."""

    def __init__(self, consumer):
        self.consumer = consumer
        _, self.channels, self.taps = consumer.inputs.shape
        self.eq = consumer.normal_equations(torch.arange(self.channels, device=consumer.inputs.device))
        self.intercept = consumer.bias is not None or consumer.normalized
        self.target_energy = float((self.eq.scale_sq * self.eq.target_sq).sum())

    def _features(self, support: torch.Tensor) -> torch.Tensor:
        idx = (support[:, None] * self.taps + torch.arange(self.taps)).flatten()
        return torch.cat([idx, torch.tensor([self.channels * self.taps])]) if self.intercept else idx

    def fit(self, support: torch.Tensor) -> torch.Tensor:
        """The least-squares coefficients (|S|·taps [+1], out) on S's inputs (and the constant)."""
        idx = self._features(support)
        if not len(idx):
            return torch.zeros(0, self.eq.cross.shape[1], dtype=torch.float64)
        gram, cross = self.eq.gram[idx][:, idx], self.eq.cross[idx]
        ridge = 1e-8 * max(float(torch.diagonal(gram).mean()), 1e-30)  # numerical only: S is overdetermined
        factor, info = torch.linalg.cholesky_ex(gram + ridge * torch.eye(len(idx), dtype=gram.dtype))
        if int(info) == 0:
            return torch.cholesky_solve(cross, factor)
        return torch.linalg.lstsq(gram, cross).solution

    def error(self, support: torch.Tensor, coef: torch.Tensor) -> float:
        idx = self._features(support)
        gram, cross = self.eq.gram[idx][:, idx], self.eq.cross[idx]
        per_output = self.eq.target_sq - 2 * (coef * cross).sum(0) + (coef * (gram @ coef)).sum(0)
        return float((self.eq.scale_sq * per_output.clamp(min=0)).sum())

    def correlation(self, support: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """Per channel, the norm of the error's gradient with respect to its weights at the fit on S."""
        every = self.channels * self.taps
        gradient = (self.eq.cross[:every] - self.eq.gram[:every, self._features(support)] @ coef) * self.eq.scale_sq
        return gradient.reshape(self.channels, -1).norm(dim=1)

    def energies(self, support: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """Per channel of S, the energy Σ_o scale_o²·‖Z_c·b_c,o‖² of its contribution to the fit."""
        b = coef[:len(support) * self.taps].reshape(len(support), self.taps, -1)
        feature = support[:, None] * self.taps + torch.arange(self.taps)  # (|S|, taps)
        blocks = self.eq.gram[feature[:, :, None], feature[:, None, :]]  # each channel's (taps, taps) block
        return torch.einsum("sko,skl,slo,o->s", b, blocks, b, self.eq.scale_sq)

    def weights(self, support: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fit as canonical consumer weights (out, |S|, taps) and the bias change (out), if fitted."""
        w = coef[:len(support) * self.taps].reshape(len(support), self.taps, -1).permute(2, 0, 1)
        return w.to(self.consumer.weight), (coef[-1] if self.intercept else None)


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
    weight = consumer.weight.reshape(len(consumer.weight), -1).T  # (c·k, out)
    for start in range(0, consumer.inputs.shape[0], chunk):
        z = consumer.inputs[start:start + chunk]
        # Σ_m Σ_k Z[m, c, k]·Σ_o W[o, c, k]·R'[m, o] = Σ_{k, o} (Zᵀ R')[(c, k), o]·W[o, (c, k)]: one (c·k, m)×(m, out)
        # product, no (m, c, k) temporary
        moments = z.reshape(len(z), -1).T @ (residual[start:start + chunk] * consumer.output_scale)
        out += (moments * weight).reshape(z.shape[1], -1).sum(dim=1).double().cpu()
    return out


def ispasp(iterations: int = 20, proxy: str = "contribution") -> ISpaSP:
    """iterations: T, the number of identify-merge-threshold rounds (20 in the paper's code).
    proxy: "contribution" (default: the correlation ⟨x_c, R⟩ of each channel's contribution x_c to the
    layer's output with the residual, ranking by ‖x_c‖; measured best with the default pipeline at keep
    ratios of 1/2 and above in benchmarks/README.md, and right for signed representations such as attention
    heads and GELU FFNs) or
    "paper" (the released code: the signed gradient summed over samples and positions, ranking by the
    aggregate activation Σ H) or "cosamp" (CoSaMP's form: threshold by the least-squares estimate on the
    merged support, and return the least-squares weights; see the module docstring)."""
    return ISpaSP(iterations, proxy)
