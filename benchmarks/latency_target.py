"""Latency targets: ask for a fraction of the dense model's latency, get it, measured on this machine.

``structprune.Target(F, metric="latency")`` (``--target-latency F``) finds the allocation by timing pruned copies
of the model during its search (median of ``torch.utils.benchmark`` runs at batch 64). Here each zoo CNN
(ResNet-20, ResNet-56 and VGG-16 from the committed Fashion-MNIST checkpoints, MobileNetV2 at width 1.0 with
random weights) is pruned to half and to 70% of its latency (magnitude selection, no recovery: latency depends
only on the widths), then dense and pruned are timed afresh and the measured ratio is compared with the target:
in pairs of blocks, 30 pairs and at least 5 s (:func:`structprune.measure.latency_ratio`, what the search uses
on each candidate with 10 pairs; the machine's drift cancels within a pair), and, as a second reading, in turn,
three rounds, the fastest median of each. The MACs ratio it took is reported next to it:
latency does not follow the MACs, so a MACs target would miss.

    cd benchmarks && ../.venv/bin/python latency_target.py --out-dir results     # 20 min or more on 2 CPU cores
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings

import torch
from results_io import write_table

import structprune
from structprune.measure import fastest_medians, latency_ratio, repeat_batch

MODELS = {
    "ResNet-20": lambda: structprune.load("checkpoints/resnet20-fmnist.pt"),
    "ResNet-56": lambda: structprune.load("checkpoints/resnet56-fmnist.pt"),
    "VGG-16 (half width)": lambda: structprune.load("checkpoints/vgg16-fmnist.pt"),
    "MobileNetV2": lambda: structprune.models.create("mobilenetv2", in_channels=1).eval(),
}
COMMAND = "cd benchmarks && ../.venv/bin/python latency_target.py"


def timed(dense, pruned, batch, rounds: int = 3) -> tuple[float, float]:
    """The fastest median of each model over ``rounds`` rounds, timed in turn."""
    dense_ms, pruned_ms = fastest_medians([lambda: dense(batch), lambda: pruned(batch)], rounds, min_seconds=0.5)
    return dense_ms, pruned_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="write latency_target.json and .md here")
    parser.add_argument("--targets", default="0.5,0.7", help="latency fractions to keep (default: 0.5,0.7)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    args = parser.parse_args()
    torch.manual_seed(0)
    example = torch.randn(1, 1, 28, 28)
    calib = [(torch.randn(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))]
    batch = repeat_batch(example, 64)  # what the search times: 64 copies of the example input
    rows = []
    for name in args.models.split(","):
        dense = MODELS[name]()
        for target in map(float, args.targets.split(",")):
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = structprune.prune(dense, calib, "magnitude", structprune.Target(target, "latency"), example,
                                           refit=False, recalibrate=False, progress=False)
            seconds = time.perf_counter() - start
            paired = latency_ratio(result.model, dense, batch, min_pairs=30, min_seconds=5.0)
            measured = paired["ratio"]
            dense_ms, pruned_ms = timed(dense, result.model, batch)
            rows.append({"model": name, "target": target, "search_estimate": result.budget["achieved"],
                         "measured": measured, "measured_iqr": paired["iqr"], "relative_error":
                         abs(measured - target) / target, "in_turn": pruned_ms / dense_ms,
                         "in_turn_error": abs(pruned_ms / dense_ms - target) / target,
                         "macs_ratio": result.after["macs"] / result.before["macs"], "dense_ms": dense_ms,
                         "pruned_ms": pruned_ms, "evaluations": result.budget["size_evaluations"],
                         "prune_seconds": seconds, "scope": result.scope,
                         "inner_scope_achieved": result.budget.get("inner_scope_achieved"),
                         "warnings": [str(w.message) for w in caught if "structprune" in str(w.message)]})
            r = rows[-1]
            print(f"{name} target {target}: measured {measured:.3f}, in turn {r['in_turn']:.3f} (search "
                  f"{r['search_estimate']:.3f}), MACs "
                  f"{r['macs_ratio']:.3f}, {dense_ms:.1f} -> {pruned_ms:.1f} ms, {seconds:.0f} s", flush=True)
    table = ["| model | target | measured latency ratio (pairs; IQR) | error | in turn (error) | search's estimate | "
             "MACs ratio taken | scope | dense → pruned in turn (ms) | prune time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    table += [f"| {r['model']} | {r['target']:.2f} | {r['measured']:.3f} ({r['measured_iqr']:.3f}) | "
              f"{r['relative_error']:.1%} | {r['in_turn']:.3f} ({r['in_turn_error']:.1%}) | "
              f"{r['search_estimate']:.3f} | {r['macs_ratio']:.3f} | {_scope(r)} | "
              f"{r['dense_ms']:.1f} → {r['pruned_ms']:.1f} | "
              f"{r['prune_seconds']:.0f} |" for r in rows]
    write_table(args.out_dir, "latency_target", "Latency targets at batch 64", f"{COMMAND} {shlex.join(sys.argv[1:])}",
                rows, table)


def _scope(row: dict) -> str:
    """The groups pruned; where the inner ones were searched first and missed, what they reached."""
    inner = row.get("inner_scope_achieved")
    return row["scope"] if inner is None else f"{row['scope']} (inner groups: {inner:.3f})"


if __name__ == "__main__":
    main()
