"""Greedy forward selection (Ye et al., "Good Subnetworks Provably Exist: Pruning via Greedy Forward
Selection", ICML 2020), layer-wise: the provable baseline i-SpaSP is compared with.

The kept set grows one channel at a time; each step adds the channel that most reduces the residual
between the dense consumer output and the output restricted to the kept set:

    S = ∅;  repeat keep times:  S ← S ∪ {argmin_i ‖Y − f(H_{S ∪ {i}})‖²}

With x_j channel j's contribution and G their Gram matrix, ‖Y − f(H_S)‖² = Σ_{i,j ∉ S} G[i, j], so each
step is exact in O(C) after G is built (one pass over the calibration rows, O(rows·out·C²); beyond
``max_pairs`` (row, output) pairs, on about max_pairs / out rows drawn at random, all outputs of each).
Ye et al. select against the network's final loss on a mini-batch; this is the layer-wise residual
objective that i-SpaSP bounds, which makes the two directly comparable.
"""

from __future__ import annotations

import torch

from .base import GramSelection, GroupView, Selection


class GFS(GramSelection):
    name = "gfs"
    calib_samples = 1280

    def select(self, group: GroupView, keep: int) -> Selection:
        gram = group.contribution_gram(self.max_pairs, whole_rows=True)  # rows with all their outputs: no gather
        channels = group.channels
        kept = torch.zeros(channels, dtype=torch.bool)
        # residual(S) = 1ᵀG1 − 2·Σ_{i∈S} (G1)_i + 1_SᵀG1_S; adding i changes it by −2(G1)_i + 2(G1_S)_i + G_ii
        row_sums = gram.sum(dim=1)
        cross = torch.zeros(channels, dtype=torch.float64)  # G 1_S
        diagonal = torch.diagonal(gram)
        for _ in range(keep):
            change = -2 * row_sums + 2 * cross + diagonal
            change[kept] = float("inf")
            i = int(torch.argmin(change))
            kept[i] = True
            cross += gram[:, i]
        return Selection(keep_idx=kept.nonzero().flatten())


def gfs(max_pairs: int = 65536) -> GFS:
    """Grow the kept set greedily, each time adding the channel that most reduces the output residual.

    max_pairs: (calibration row, output unit) pairs the residual is computed on (sampled when there are more).
    """
    return GFS(max_pairs)
