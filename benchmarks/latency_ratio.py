"""How steady a measured latency ratio is: the same two models read six times three ways.

A pruned model's latency ratio to its dense model (what a latency target searches on) is read six times on each
of the Fashion-MNIST ResNet-20 and ResNet-56 against a copy at a keep ratio of 0.6 (magnitude, no recovery), batch
64: as two separate medians (``latency_stats`` of each), in pairs of blocks (``latency_ratio``, 10 pairs, what
the search uses) and in pairs of single runs (one run of each in turn). Reported: the readings' mean and relative
standard deviation, and the range of the dense model's median over the run (the machine's drift).

    cd benchmarks && ../.venv/bin/python latency_ratio.py --out-dir results     # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import timeit
import warnings

import torch
from results_io import write_table

import structprune
from structprune.measure import latency_ratio, latency_stats, repeat_batch

COMMAND = "cd benchmarks && ../.venv/bin/python latency_ratio.py --out-dir results"


def single_runs(model, reference, batch, pairs: int = 40) -> float:
    """Median ratio of one run of each, in turn (which goes first alternates)."""
    def once(m):
        start = timeit.default_timer()
        m(batch)
        return timeit.default_timer() - start

    ratios = []
    for i in range(pairs):
        if i % 2:
            r = once(reference)
            ratios.append(once(model) / r)
        else:
            m = once(model)
            ratios.append(m / once(reference))
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="write latency_ratio.json and .md here")
    parser.add_argument("--readings", type=int, default=6)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    batch = repeat_batch(torch.randn(1, 1, 28, 28), 64)
    calib = [(torch.randn(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))]
    rows = []
    with torch.no_grad():
        for name in ("resnet20", "resnet56"):
            dense = structprune.load(f"checkpoints/{name}-fmnist.pt").eval()
            pruned = structprune.prune(dense, calib, "magnitude", 0.6, refit=False, recalibrate=False,
                                       progress=False).model.eval()
            readings = {"separate medians": [], "pairs of blocks": [], "pairs of single runs": []}
            dense_ms = []
            for _ in range(args.readings):
                d = latency_stats(dense, batch)["median_ms"]
                dense_ms.append(d)
                readings["separate medians"].append(latency_stats(pruned, batch)["median_ms"] / d)
                readings["pairs of blocks"].append(latency_ratio(pruned, dense, batch)["ratio"])
                readings["pairs of single runs"].append(single_runs(pruned, dense, batch))
            for how, values in readings.items():
                mean = statistics.mean(values)
                rows.append({"model": name, "how": how, "readings": values, "mean": mean,
                             "relative_sd": statistics.stdev(values) / mean,
                             "dense_ms_range": [min(dense_ms), max(dense_ms)]})
                print(f"{name} {how}: " + " ".join(f"{v:.3f}" for v in values), flush=True)
    table = ["| model | how | readings | mean | relative s.d. | dense median over the run (ms) |",
             "|---|---|---|---:|---:|---|"]
    table += [f"| {r['model']} | {r['how']} | {' '.join(f'{v:.3f}' for v in r['readings'])} | {r['mean']:.3f} | "
              f"{r['relative_sd']:.1%} | {r['dense_ms_range'][0]:.1f}–{r['dense_ms_range'][1]:.1f} |" for r in rows]
    write_table(args.out_dir, "latency_ratio", "Latency ratio readings, batch 64", COMMAND, rows, table)


if __name__ == "__main__":
    main()
