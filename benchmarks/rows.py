"""Captured rows per feature: accuracy and pruning time of the default pipeline with 32, 64 and as many rows as
the memory bound allows (structprune's default before 2026-12-01).

For each Fashion-MNIST checkpoint (``benchmarks/checkpoints``), i-SpaSP and PFP with the default pipeline
(selection → refit → BatchNorm recalibration) to 50% of the dense MACs, on the first 2,048 training images as
calibration data, scored on the test split with no fine-tune. Only ``structprune.capture.ROWS_PER_FEATURE``
changes between rows (0: the memory bound of 256 MiB per consumer alone).

    python benchmarks/rows.py --out-dir benchmarks/results        # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from results_io import write_table
from torch.utils.data import DataLoader

import structprune
from structprune import capture, data

HERE = Path(__file__).resolve().parent
SETTINGS = (0, 64, 32)


def fashion_mnist(test_limit: int | None = None, samples: int = 2048, batch: int = 128) -> tuple[list, DataLoader]:
    """The calibration batches (the first ``samples`` training images) and the test split, as these benchmarks
    use them."""
    x, y = next(iter(DataLoader(data.load("fashion-mnist", "train"), batch_size=samples)))
    calib = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    return calib, DataLoader(data.load("fashion-mnist", "test", limit=test_limit), batch_size=500)


def accuracy(model, test) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in test:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="directory for rows.json and rows.md")
    parser.add_argument("--models", default="resnet20,vgg16,resnet56", help="checkpoints (default: %(default)s)")
    parser.add_argument("--test-limit", type=int, default=None, help="score on the first N test images only")
    args = parser.parse_args()
    calib, test = fashion_mnist(args.test_limit)
    rows = []
    for name in args.models.split(","):
        dense = structprune.load(HERE / "checkpoints" / f"{name}-fmnist.pt").eval()
        for method in ("ispasp", "pfp"):
            for rho in SETTINGS:
                capture.ROWS_PER_FEATURE = rho
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = structprune.prune(dense, calib, method, structprune.Target(0.5, "flops"),
                                               progress=False)
                rows.append({"model": name, "method": method, "rows_per_feature": rho or "memory bound",
                             "accuracy": accuracy(result.model, test), "seconds": result.seconds,
                             "macs_ratio": result.after["macs"] / result.before["macs"]})
                print(rows[-1], flush=True)
    table = ["| model | method | rows per feature | accuracy (%) | prune s | MACs kept |",
             "|---|---|---:|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['method']} | {r['rows_per_feature']} | {r['accuracy']:.2f} | {r['seconds']:.1f} | "
              f"{r['macs_ratio']:.1%} |" for r in rows]
    write_table(args.out_dir, "rows", "Captured rows per feature (default pipeline, 50% of the MACs, no fine-tune)",
                "python " + " ".join(sys.argv), rows, table)


if __name__ == "__main__":
    main()
