"""FPGM: filter pruning via geometric median (He et al., CVPR 2019).

Filters close to the geometric median of their layer are the most replaceable by the others, so
each channel is scored by the sum of Euclidean distances from its filter to every other filter (the
filters of all producers of a group concatenated); the channels with the largest sums are kept.
Data is not used.
"""

from __future__ import annotations

import torch

from ..errors import StructPruneError
from .base import GroupView, MethodBase, Needs, Selection, top_k_sorted


class FPGM(MethodBase):
    name = "fpgm"
    needs = Needs(activations=False)

    def select(self, group: GroupView, keep: int) -> Selection:
        if not group.producers:
            raise StructPruneError(f"fpgm: group {group.name} has no Conv/Linear producer to score")
        filters = torch.cat([p.weight for p in group.producers], dim=1).double()
        scores = torch.cdist(filters, filters).sum(dim=1)
        return Selection(keep_idx=top_k_sorted(scores.cpu(), keep))


def fpgm() -> FPGM:
    """Keep the filters farthest (in summed L2 distance) from the others."""
    return FPGM()
