"""PFP's sensitivities against the paper's formula, on issue 36's case (item 0).

A 3 → 16 → 32 stack of padded 3×3 convolutions (ReLU between), 128 random samples of 8×8: the second conv reads
8,192 output positions, of which the refit's capture keeps 4,608 (32 rows per captured input feature). For each
seed, the sensitivities of the first conv's 16 channels that ``structprune.prune(..., "pfp", zero_below=0)`` selects
with are compared to the definition evaluated densely in float64 over every position of every sample — and, for
contrast, to a maximum taken over the capture's row sample only (what PFP read from 7441809 until this check):
maximum relative error, and whether the top-8 (half) set is the same.

    cd benchmarks && ../.venv/bin/python pfp_faithful.py --out-dir results
"""

from __future__ import annotations

import argparse

import torch
from results_io import write_table
from torch import nn

import structprune
from structprune import methods
from structprune.capture import capture
from structprune.graph import PruningGraph
from structprune.sensitivity import consumer_sensitivity


def stack(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def definition(hidden: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """s_j = max over samples, positions, output units i and taps κ of W±[i, j, κ]·A[j, κ, p] / Σ W±·A (0 where the
    sum is 0), in float64, one output unit at a time (the input is post-ReLU, so non-negative)."""
    patches = nn.functional.unfold(hidden.double(), 3, padding=1).transpose(1, 2).reshape(-1, 16, 9)  # (P, C, K)
    weight = conv.weight.detach().double().reshape(32, 16, 9)
    best = torch.zeros(16, dtype=torch.float64)
    for w in (weight.clamp(min=0), (-weight).clamp(min=0)):
        for unit in range(len(w)):
            terms = patches * w[unit]  # (P, C, K)
            total = terms.sum(dim=(1, 2), keepdim=True)
            g = torch.where(total > 0, terms / total.clamp(min=1e-300), 0.0)
            best = torch.maximum(best, g.amax(dim=(0, 2)))
    return best


def compare(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, bool]:
    error = float(((ours.double() - reference).abs() / reference.clamp(min=1e-12)).max())
    half = len(reference) // 2
    same = set(ours.topk(half).indices.tolist()) == set(reference.topk(half).indices.tolist())
    return error, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write pfp_faithful.json/.md here")
    parser.add_argument("--seeds", type=int, default=30)
    args = parser.parse_args()
    seen = {}
    scores = methods.pfp.PFP.scores

    def spy(self, group):
        seen[group.name] = scores(self, group)
        return seen[group.name]

    methods.pfp.PFP.scores = spy
    rows = []
    for seed in range(args.seeds):
        net, x = stack(seed), torch.randn(128, 3, 8, 8)
        structprune.prune(net, [x], "pfp", 0.5, example_inputs=x[:1], progress=False, zero_below=0.0)
        with torch.no_grad():
            hidden = torch.relu(net[0](x))
        reference = definition(hidden, net[2])
        group = {g.name: g for g in PruningGraph(net, x[:1]).all_groups()}["0"]
        view = capture(net, group, [x]).consumers[0]  # the refit's rows: a sample of the positions
        sampled = consumer_sensitivity(view.inputs.reshape(len(view.inputs), -1), view.weight.reshape(32, -1),
                                       torch.arange(16 * 9).reshape(16, 9))
        (error, same), (sampled_error, sampled_same) = compare(seen["0"], reference), compare(sampled, reference)
        rows.append({"seed": seed, "rows_kept": len(view.inputs), "positions": len(hidden) * 64,
                     "max_rel_error": error, "same_top_half": same, "sampled_max_rel_error": sampled_error,
                     "sampled_same_top_half": sampled_same})
        print(rows[-1], flush=True)
    n = len(rows)
    table = ["| sensitivities | seeds matching (rel. error < 1e-5) | same top-8 set | max relative error |",
             "|---|---:|---:|---:|",
             f"| structprune.prune (pfp, zero_below=0) | {sum(r['max_rel_error'] < 1e-5 for r in rows)}/{n} | "
             f"{sum(r['same_top_half'] for r in rows)}/{n} | {max(r['max_rel_error'] for r in rows):.1e} |",
             f"| maximum over the refit's row sample ({rows[0]['rows_kept']:,} of {rows[0]['positions']:,}) | "
             f"{sum(r['sampled_max_rel_error'] < 1e-5 for r in rows)}/{n} | "
             f"{sum(r['sampled_same_top_half'] for r in rows)}/{n} | "
             f"{max(r['sampled_max_rel_error'] for r in rows):.2f} |"]
    write_table(args.out_dir, "pfp_faithful", "PFP's sensitivities vs the paper's formula (issue 36, item 0)",
                "cd benchmarks && ../.venv/bin/python pfp_faithful.py --out-dir results", rows, table)


if __name__ == "__main__":
    main()
