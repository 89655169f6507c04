"""Filter-norm pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

Each channel's score is the Lp norm of the filters that produce it, summed over every producer of
the group (a residual stream has several). Data is not used.
"""

from __future__ import annotations

from ..errors import StructPruneError
from . import register
from .base import GroupView, Selection, top_k_sorted


class MagnitudeSelection:
    name = "magnitude"
    calib_samples = 256
    data_informed = False

    def __init__(self, norm: int = 1):
        if norm not in (1, 2):
            raise StructPruneError(f"norm must be 1 or 2, got {norm!r}")
        self.norm = norm

    def select(self, group: GroupView, keep: int) -> Selection:
        if not group.producers:
            raise StructPruneError(f"magnitude: group {group.name} has no Conv/Linear producer to score")
        scores = sum(p.weight.norm(p=self.norm, dim=1) for p in group.producers)
        return Selection(keep_idx=top_k_sorted(scores, keep))


@register("magnitude")
def magnitude(norm: int = 1) -> MagnitudeSelection:
    """norm: 1 for the L1 filter norm (the paper's choice) or 2."""
    return MagnitudeSelection(norm)
