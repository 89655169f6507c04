"""BatchNorm recalibration: the running statistics recomputed on calibration data after pruning.

Removing channels (and refitting the layers that read them) changes what every later BatchNorm
sees, while its running mean and variance still describe the dense network; in a residual network
pruned everywhere at once that mismatch alone can drop accuracy to chance. Recalibration passes the
calibration samples through the pruned model with every BatchNorm normalising by its batch's own
statistics (as in training; nothing else changes mode, no gradients), accumulates the exact mean and
unbiased variance of each BatchNorm's input over all samples and positions (float64), and writes them
as the running statistics. The model's modes are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import StructPruneError, first_line
from .graph import run_forward

_BATCHNORMS = nn.modules.batchnorm._BatchNorm


def _tracked_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms of ``model`` that keep running statistics (those a recalibration rewrites)."""
    return [m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm with running statistics to recalibrate."""
    return bool(_tracked_batchnorms(model))


class _Moments:
    """Forward pre-hook: Σx, Σx² and the count per channel of a BatchNorm's input, in float64."""

    def __init__(self, bn: nn.Module):
        self.bn = bn
        self.total = torch.zeros(bn.num_features, dtype=torch.float64, device=bn.running_mean.device)
        self.squares = torch.zeros_like(self.total)
        self.count = 0

    def __call__(self, _module, args) -> None:
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        self.total += x.sum(dim=dims)
        self.squares += x.square().sum(dim=dims)
        self.count += x.numel() // x.shape[1]

    def write(self) -> None:
        mean = self.total / self.count
        var = (self.squares - self.count * mean.square()).clamp(min=0) / max(self.count - 1, 1)
        self.bn.running_mean.copy_(mean.to(self.bn.running_mean))
        self.bn.running_var.copy_(var.to(self.bn.running_var))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable) -> dict:
    """Recompute every BatchNorm's running statistics of ``model`` (in place) on ``batches``.

    ``batches`` yields model inputs or (inputs, targets) pairs (a :class:`structprune.capture.Calibration`
    does). Returns {"batchnorms": how many, "samples": samples read}.
    """
    norms = _tracked_batchnorms(model)
    if not norms:
        return {"batchnorms": 0, "samples": 0}
    from .capture import batch_inputs, batch_size

    modes = {m: m.training for m in model.modules()}
    moments = [_Moments(bn) for bn in norms]
    hooks = [bn.register_forward_pre_hook(m) for bn, m in zip(norms, moments, strict=True)]
    samples = 0
    model.eval()
    for bn in norms:
        bn.train()  # normalise by the batch's statistics while the running ones are being measured
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
              if bn.num_batches_tracked is not None else None) for bn in norms]
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
        for bn, (mean, var, tracked) in zip(norms, saved, strict=True):  # undo training mode's own updates
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)
    if samples == 0:
        raise StructPruneError("BatchNorm recalibration: the calibration data yielded no samples")
    for m in moments:
        m.write()
    return {"batchnorms": len(norms), "samples": samples}
