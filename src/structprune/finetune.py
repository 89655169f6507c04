"""Training loop used by ``structprune train``: SGD with momentum and a cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import StructPruneError

_NO_DECAY = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on Conv/Linear weights only; none on biases or normalisation layers (by module type)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if isinstance(module, _NO_DECAY) or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(model: nn.Module, loader: Iterable, epochs: int, lr: float = 0.05, momentum: float = 0.9,
          weight_decay: float = 5e-4, label_smoothing: float = 0.0, device=None, progress: bool = True) -> list[float]:
    """Train ``model`` in place for ``epochs`` epochs; returns the mean loss of each epoch."""
    if epochs < 0:
        raise StructPruneError(f"epochs must be >= 0, got {epochs}")
    if lr <= 0:
        raise StructPruneError(f"lr must be positive, got {lr}")
    device = device or next(model.parameters()).device
    optimizer = torch.optim.SGD(parameter_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=True)
    steps = max(1, epochs * len(loader))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    losses = []
    model.train()
    for epoch in range(epochs):
        total, batches = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                   disable=None if progress else True)  # None: shown on a terminal only
        for inputs, targets in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(inputs.to(device)), targets.to(device))
            if not torch.isfinite(loss):
                raise StructPruneError(f"training diverged (loss {loss.item()}) in epoch {epoch + 1}; lower --lr")
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
            batches += 1
            bar.set_postfix(loss=f"{total / batches:.3f}")
        losses.append(total / max(batches, 1))
    model.eval()
    return losses
