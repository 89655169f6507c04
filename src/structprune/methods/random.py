"""Random channel selection: the baseline every criterion must beat."""

from __future__ import annotations

import torch

from . import register
from .base import GroupView, Selection


class RandomSelection:
    """Keep a uniformly random subset of channels (seeded per group)."""

    name = "random"
    calib_samples = 256
    data_informed = False

    def select(self, group: GroupView, keep: int) -> Selection:
        order = torch.randperm(group.channels, generator=group.generator())[:keep]
        return Selection(keep_idx=torch.sort(order).values)


@register("random")
def random() -> RandomSelection:
    return RandomSelection()
