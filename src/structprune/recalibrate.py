"""BatchNorm recalibration: the running statistics recomputed on calibration data after pruning.

Removing channels (and refitting the layers that read them) changes what every later BatchNorm
sees, while its running mean and variance still describe the dense network; in a residual network
pruned everywhere at once that mismatch alone can drop accuracy to chance. Recalibration passes the
calibration samples through the pruned model with every BatchNorm normalising by its batch's own
statistics (as in training; nothing else changes mode, no gradients), accumulates the mean and
unbiased variance of each BatchNorm's input over all samples and positions, and writes them as the
running statistics. The model's modes are restored afterwards.

Each batch's mean and variance per channel come from torch's own BatchNorm kernel: a native BatchNorm
(``nn.BatchNorm1d/2d/3d``) runs with momentum 1, so right after each call its running statistics are the
batch's mean and unbiased variance, with no second pass over the activations. Any other BatchNorm class
(its forward may differ) is measured before the call by ``torch.var_mean`` in the input's precision.
Batches are combined in float64 by the pairwise update of Chan, Golub and LeVeque ("Algorithms for
computing the sample variance", 1983): with counts n_a, n_b, means μ_a, μ_b and sums of squared deviations
M_a, M_b, M = M_a + M_b + (μ_b − μ_a)²·n_a·n_b/(n_a + n_b), so unequal batches weigh by their counts.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .batches import batch_inputs, batch_size, run_forward
from .errors import StructPruneError, first_line

_BATCHNORMS = nn.modules.batchnorm._BatchNorm


def _tracked_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms of ``model`` that keep running statistics (those a recalibration rewrites)."""
    return [m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm with running statistics to recalibrate."""
    return bool(_tracked_batchnorms(model))


#: BatchNorms whose training-mode forward is torch's own: with momentum 1 their running statistics are the
#: batch's mean and unbiased variance right after each call, computed by the BatchNorm kernel itself
_NATIVE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Moments:
    """The count, mean and sum of squared deviations per channel of a BatchNorm's input, combined over
    batches in float64 (module docstring). A forward hook reading the batch's statistics from the running
    ones for a native BatchNorm run with momentum 1; a pre-hook computing them for any other."""

    def __init__(self, bn: nn.Module):
        self.bn = bn
        self.native = type(bn) in _NATIVE
        self.mean = torch.zeros(bn.num_features, dtype=torch.float64, device=bn.running_mean.device)
        self.deviations = torch.zeros_like(self.mean)  # Σ (x − mean)²
        self.count = 0

    def register(self):
        if self.native:
            return self.bn.register_forward_hook(self._after)
        return self.bn.register_forward_pre_hook(self._before)

    def _after(self, _module, args, _output) -> None:
        n = args[0].numel() // args[0].shape[1]
        if n > 1:  # torch stores the unbiased variance
            self._add(n, self.bn.running_mean, self.bn.running_var * (n - 1))

    def _before(self, _module, args) -> None:
        x = args[0].detach()
        n = x.numel() // x.shape[1]
        if n:
            var, mean = torch.var_mean(x if x.is_floating_point() else x.double(),
                                       dim=[d for d in range(x.dim()) if d != 1], correction=0)
            self._add(n, mean, var * n)

    def _add(self, n: int, mean: Tensor, deviations: Tensor) -> None:
        total = self.count + n
        delta = mean.double() - self.mean
        self.deviations += deviations.double() + delta.square() * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def write(self) -> None:
        var = self.deviations.clamp(min=0) / max(self.count - 1, 1)
        self.bn.running_mean.copy_(self.mean.to(self.bn.running_mean))
        self.bn.running_var.copy_(var.to(self.bn.running_var))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable) -> dict:
    """Recompute every BatchNorm's running statistics of ``model`` (in place) on ``batches``.

    ``batches`` yields model inputs or (inputs, targets) pairs (a :class:`structprune.batches.Calibration`
    does). Returns {"batchnorms": how many, "samples": samples read}.
    """
    norms = _tracked_batchnorms(model)
    if not norms:
        return {"batchnorms": 0, "samples": 0}
    modes = {m: m.training for m in model.modules()}
    moments = [_Moments(bn) for bn in norms]
    hooks = [m.register() for m in moments]
    samples = 0
    model.eval()
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
              if bn.num_batches_tracked is not None else None, bn.momentum) for bn in norms]
    for bn in norms:
        bn.train()  # normalise by the batch's statistics while the running ones are being measured
        if type(bn) in _NATIVE:
            bn.momentum = 1.0  # the running statistics become each batch's own (read by _Moments)
    try:
        for batch in batches:
            inputs = batch_inputs(batch)
            try:
                run_forward(model, inputs)
            except ValueError as exc:  # e.g. a batch of one sample with 1×1 feature maps
                raise StructPruneError(f"BatchNorm recalibration: the model cannot run in training-mode "
                                       f"BatchNorm on the calibration batches ({first_line(exc)}); use larger "
                                       f"calibration batches or recalibrate=False") from None
            samples += batch_size(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
        for bn, (mean, var, tracked, momentum) in zip(norms, saved, strict=True):  # undo training mode's updates
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.momentum = momentum
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)
    if samples == 0:
        raise StructPruneError("BatchNorm recalibration: the calibration data yielded no samples")
    for m in moments:
        m.write()
    return {"batchnorms": len(norms), "samples": samples}
