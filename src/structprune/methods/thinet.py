"""ThiNet (Luo et al., ICCV 2017): greedy channel selection from the next layer's statistics.

ThiNet removes channels one at a time, each time the channel whose removal, together with those
already removed, changes the consumer's output least on calibration data:

    T = ∅;  repeat C − keep times:  T ← T ∪ {argmin_i ‖Σ_{j ∈ T ∪ {i}} x_j‖²}

where x_j is channel j's contribution to the consumer outputs (all calibration rows and output units;
the paper samples some of them: ``max_pairs``). With G the Gram matrix of the contributions the objective is
1_Tᵀ G 1_T, so every step is exact and O(C). The paper's optional least-squares rescaling of the kept
channels is ``prune(..., refit=True)``.
"""

from __future__ import annotations

import torch

from .base import GramSelection, GroupView, Selection


class ThiNet(GramSelection):
    name = "thinet"
    calib_samples = 256

    def select(self, group: GroupView, keep: int) -> Selection:
        gram = group.contribution_gram(self.max_pairs)
        channels = group.channels
        removed = torch.zeros(channels, dtype=torch.bool)
        cross = torch.zeros(channels, dtype=torch.float64)  # G 1_T
        diagonal = torch.diagonal(gram)
        for _ in range(channels - keep):
            cost = 2 * cross + diagonal  # ‖Σ_T x + x_i‖² − ‖Σ_T x‖²
            cost[removed] = float("inf")
            i = int(torch.argmin(cost))
            removed[i] = True
            cross += gram[:, i]
        keep_idx = (~removed).nonzero().flatten()
        return Selection(keep_idx=keep_idx, stats={"removed_energy": float(cross[removed].sum())})


def thinet(max_pairs: int = 65536) -> ThiNet:
    """Greedily remove the channels that change the consumer output least.

    max_pairs: (calibration row, output unit) pairs the contribution statistics are computed on (sampled
    when there are more).
    """
    return ThiNet(max_pairs)
