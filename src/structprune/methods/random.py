"""Random channel selection: the baseline every criterion must beat."""

from __future__ import annotations

import torch

from .base import GroupView, MethodBase, Needs, Selection


class RandomSelection(MethodBase):
    """Keep a uniformly random subset of channels (seeded per group)."""

    name = "random"
    needs = Needs(activations=False)

    def select(self, group: GroupView, keep: int) -> Selection:
        order = torch.randperm(group.channels, generator=group.generator())[:keep]
        return Selection(keep_idx=torch.sort(order).values)


def random() -> RandomSelection:
    return RandomSelection()
