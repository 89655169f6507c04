"""Error-aware allocation vs one ratio for every group (issue 36, items 1, 2 and 5 in part).

The trained Fashion-MNIST checkpoints of benchmarks/checkpoints pruned to 50% / 30% / 20% of their MACs with the
default pipeline (refit, BatchNorm recalibration; 2,048 calibration images, the first of the training split), the
budget split among the groups by ``Target(allocation="uniform")`` (the default: one ratio, scope "auto") or
``Target(allocation="error")`` (each group's network output error at 16 candidate widths, the least summed error
that meets the target, every group in scope); no fine-tuning; accuracy on all 10,000 test images; seconds to
prune (curves included).

    cd benchmarks && ../.venv/bin/python allocation.py --out-dir results --methods ispasp,pfp,magnitude
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from results_io import write_table
from torch.utils.data import DataLoader

import structprune
from structprune import data, measure

HERE = Path(__file__).resolve().parent
CHECKPOINTS = {"resnet20": "resnet20-fmnist.pt", "resnet56": "resnet56-fmnist.pt", "vgg16": "vgg16-fmnist.pt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write allocation.json/.md here")
    parser.add_argument("--models", default="resnet20", help="comma-separated, of " + ", ".join(CHECKPOINTS))
    parser.add_argument("--methods", default="ispasp", help="comma-separated pruning methods")
    parser.add_argument("--targets", default="0.5,0.3,0.2", help="fractions of the dense MACs kept")
    parser.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10,000)")
    args = parser.parse_args()
    train = data.load("fashion-mnist", "train", limit=2048)
    x, y = train.tensors
    calib = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 2048, 128)]
    test = DataLoader(data.load("fashion-mnist", "test", limit=args.test_limit), batch_size=500)
    rows = []
    for name in args.models.split(","):
        dense = structprune.load(HERE / "checkpoints" / CHECKPOINTS[name]).eval()
        dense_accuracy = measure.accuracy(dense, test)
        for method in args.methods.split(","):
            for target in (float(t) for t in args.targets.split(",")):
                for allocation in ("uniform", "error"):
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        budget = structprune.Target(target, allocation=allocation)
                        result = structprune.prune(dense, calib, method, budget, example_inputs=x[:1], progress=False)
                    seconds = time.perf_counter() - start
                    rows.append({"model": name, "dense_accuracy": dense_accuracy, "method": method, "target": target,
                                 "allocation": allocation, "scope": result.scope,
                                 "macs_ratio": result.after["macs"] / result.before["macs"],
                                 "accuracy": measure.accuracy(result.model, test), "seconds": seconds,
                                 "kept": {layer["group"]: layer["kept"] for layer in result.layers}})
                    print({k: v for k, v in rows[-1].items() if k != "kept"}, flush=True)
                    report(rows, args)  # after every row: an interrupted run keeps what it measured


def report(rows: list[dict], args) -> None:
    table = ["| model (dense) | method | MACs kept | uniform | error | gain | seconds uniform / error |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row["allocation"] != "error":
            continue
        uniform = next(r for r in rows if r["allocation"] == "uniform" and
                       (r["model"], r["method"], r["target"]) == (row["model"], row["method"], row["target"]))
        table.append(f"| {row['model']} ({row['dense_accuracy']:.2f}) | {row['method']} | {row['target']:.0%} "
                     f"({uniform['macs_ratio']:.1%} / {row['macs_ratio']:.1%}) | {uniform['accuracy']:.2f} | "
                     f"{row['accuracy']:.2f} | {row['accuracy'] - uniform['accuracy']:+.2f} | "
                     f"{uniform['seconds']:.0f} / {row['seconds']:.0f} |")
    write_table(args.out_dir, "allocation", "Error-aware allocation vs uniform (issue 36)",
                "cd benchmarks && ../.venv/bin/python allocation.py --out-dir results --models "
                f"{args.models} --methods {args.methods} --targets {args.targets}", rows, table)


if __name__ == "__main__":
    main()
