"""BatchNorm recalibration samples: accuracy of the default pipeline when the recalibration reads fewer samples.

For each Fashion-MNIST checkpoint (``benchmarks/checkpoints``), i-SpaSP and PFP with the default pipeline to 50%
of the dense MACs on the first 2,048 training images, scored on the test split with no fine-tune. The selection
and the refit run once (``recalibrate=False``); then the pruned model is recalibrated on the first N of the same
calibration batches (what the pipeline's recalibration does with N samples), for N = 2,048 (the default today:
``recovery_samples``), 1,024, 512 and 256, each on a fresh copy; "none" is the pruned model before any
recalibration. The time of each recalibration is reported next to it.

    python benchmarks/recal_samples.py --out-dir benchmarks/results        # ~8 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

from results_io import write_table
from rows import accuracy, fashion_mnist

import structprune
from structprune.recalibrate import recalibrate_batchnorm

HERE = Path(__file__).resolve().parent
SAMPLES = (2048, 1024, 512, 256)
BATCH = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="directory for recal_samples.json and recal_samples.md")
    parser.add_argument("--models", default="resnet20,resnet56,vgg16", help="checkpoints (default: %(default)s)")
    parser.add_argument("--test-limit", type=int, default=None, help="score on the first N test images only")
    args = parser.parse_args()
    calib, test = fashion_mnist(args.test_limit, max(SAMPLES), BATCH)
    rows = []
    for name in args.models.split(","):
        dense = structprune.load(HERE / "checkpoints" / f"{name}-fmnist.pt").eval()
        for method in ("ispasp", "pfp"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = structprune.prune(dense, calib, method, structprune.Target(0.5, "flops"),
                                           recalibrate=False, progress=False)
            rows.append({"model": name, "method": method, "samples": "none", "accuracy": accuracy(result.model, test),
                         "seconds": 0.0})
            print(rows[-1], flush=True)
            for n in SAMPLES:
                model = copy.deepcopy(result.model)
                start = time.perf_counter()
                recalibrate_batchnorm(model, calib[:n // BATCH])
                seconds = time.perf_counter() - start
                rows.append({"model": name, "method": method, "samples": n, "accuracy": accuracy(model, test),
                             "seconds": seconds})
                print(rows[-1], flush=True)
    table = ["| model | method | recalibration samples | accuracy (%) | recalibration s |", "|---|---|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['method']} | {r['samples']} | {r['accuracy']:.2f} | {r['seconds']:.2f} |"
              for r in rows]
    write_table(args.out_dir, "recal_samples", "BatchNorm recalibration samples (default pipeline otherwise, 50% of "
                "the MACs, no fine-tune)", "python " + " ".join(sys.argv), rows, table)


if __name__ == "__main__":
    main()
