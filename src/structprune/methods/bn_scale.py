"""BatchNorm scale pruning, as in network slimming (Liu et al., ICCV 2017).

Each channel's score is |γ| of the BatchNorm on it, summed over every BatchNorm of the group (a
residual stream has one per block). The paper trains with an L1 penalty on γ first; this criterion
applies to any trained network. A group without a BatchNorm (e.g. a Linear layer's outputs) is
scored by the L1 norm of its filters instead, and its report entry says so.
"""

from __future__ import annotations

from ..errors import StructPruneError
from .base import GroupView, MethodBase, Needs, Selection, top_k_sorted


class BNScale(MethodBase):
    name = "bn-scale"
    needs = Needs(activations=False)

    def select(self, group: GroupView, keep: int) -> Selection:
        if group.bn_scale is not None:
            return Selection(keep_idx=top_k_sorted(group.bn_scale.cpu(), keep), stats={"criterion": "bn-scale"})
        if not group.producers:
            raise StructPruneError(f"bn-scale: group {group.name} has neither a BatchNorm nor a producer to score")
        scores = sum(p.weight.abs().sum(dim=1) for p in group.producers)
        return Selection(keep_idx=top_k_sorted(scores.cpu(), keep), stats={"criterion": "magnitude (no BatchNorm)"})


def bn_scale() -> BNScale:
    """Keep the channels with the largest BatchNorm |γ| (L1 filter norm where there is no BatchNorm)."""
    return BNScale()
