"""First-order Taylor importance (Molchanov et al., "Importance Estimation for Neural Network
Pruning", CVPR 2019).

Removing channel c changes the loss by about −Σ w·∂L/∂w over its filter weights; the importance is
the square of that sum, summed over the producers of the group. ∂L/∂w is the gradient of the loss
(cross-entropy by default) on the labelled calibration batches, taken on the network as pruned so far.
"""

from __future__ import annotations

from ..errors import StructPruneError
from .base import GroupView, MethodBase, Needs, Selection, top_k_sorted


class Taylor(MethodBase):
    name = "taylor"
    needs = Needs(gradients=True)

    def select(self, group: GroupView, keep: int) -> Selection:
        if not group.producers:
            raise StructPruneError(f"taylor: group {group.name} has no Conv/Linear producer to score")
        if any(p.weight_grad is None for p in group.producers):
            raise StructPruneError("taylor needs the loss gradients: call it through structprune.prune "
                                   "with labelled calibration batches")
        scores = sum((p.weight.double() * p.weight_grad.double()).sum(dim=1).square() for p in group.producers)
        return Selection(keep_idx=top_k_sorted(scores.cpu(), keep))


def taylor() -> Taylor:
    """Keep the channels whose removal changes the calibration loss most (first-order estimate)."""
    return Taylor()
