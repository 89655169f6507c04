"""Filter-norm pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

Each channel's score is the Lp norm of the filters that produce it, summed over every producer of
the group (a residual stream has several). Data is not used.

``coupled=True`` scores a channel by every weight that is removed with it — the rows that produce it
and the columns of every layer that reads it — as one Lp norm, as Torch-Pruning's group importance
does: measured 73.0% → 76.9% on the demo's LeNet-5 at half its channels with no recovery
(benchmarks/results/demo.md, 2026-12-01), where the producer-only score trails Torch-Pruning's MagnitudePruner
(77.6%).
"""

from __future__ import annotations

from ..errors import StructPruneError
from .base import GroupView, MethodBase, Needs, Selection, top_k_sorted


class MagnitudeSelection(MethodBase):
    name = "magnitude"
    needs = Needs(activations=False)

    def __init__(self, norm: int = 1, coupled: bool = False):
        if norm not in (1, 2):
            raise StructPruneError(f"norm must be 1 or 2, got {norm!r}")
        if not isinstance(coupled, bool):
            raise StructPruneError(f"coupled must be True or False, got {coupled!r}")
        self.norm = norm
        self.coupled = coupled

    def select(self, group: GroupView, keep: int) -> Selection:
        if not group.producers:
            raise StructPruneError(f"magnitude: group {group.name} has no Conv/Linear producer to score")
        if not self.coupled:
            scores = sum(p.weight.norm(p=self.norm, dim=1) for p in group.producers)
            return Selection(keep_idx=top_k_sorted(scores, keep))
        powered = sum(p.weight.abs().pow(self.norm).sum(dim=1) for p in group.producers)
        powered = powered + sum(c.weight.abs().pow(self.norm).sum(dim=(0, 2)).to(powered) for c in group.consumers)
        return Selection(keep_idx=top_k_sorted(powered.pow(1 / self.norm), keep))


def magnitude(norm: int = 1, coupled: bool = False) -> MagnitudeSelection:
    """norm: 1 for the L1 filter norm (the paper's choice) or 2. coupled: score each channel by all the weights
    removed with it (producer rows and consumer columns), as Torch-Pruning's group importance does."""
    return MagnitudeSelection(norm, coupled)
