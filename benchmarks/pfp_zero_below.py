"""PFP's "denominator ≈ 0" (``zero_below``) after the default recovery, on several calibration sets.

PFP's sensitivity of a channel is the largest share it takes, at any position of any calibration sample, of an
output unit's sum; the sum counts as ≈ 0 (the share as 0) below ``zero_below`` × that unit's mean over the sample's
positions (``structprune.methods.pfp``; 0: only below 1e-12, the definition read literally). Each model is pruned
with the default pipeline (``structprune.prune`` with no other option: selection → least-squares refit →
BatchNorm recalibration) to half its MACs (LeNet-5: half of every group's channels) on three calibration sets of
2,048 training images (starting at images 0, 20,000 and 40,000), by PFP at each ``zero_below``, and by the
default magnitude and i-SpaSP for reference; full 10,000-image test set, no fine-tune.

    cd benchmarks && ../.venv/bin/python pfp_zero_below.py --out-dir results     # ~25 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import warnings

from results_io import write_table
from torch.utils.data import DataLoader

import structprune
from structprune import data

MODELS = {"lenet5": ("checkpoints/lenet5-fmnist.pt", 0.5),
          "resnet20": ("checkpoints/resnet20-fmnist.pt", structprune.Target(0.5)),
          "resnet56": ("checkpoints/resnet56-fmnist.pt", structprune.Target(0.5))}
CALIB_SAMPLES = 2048
COMMAND = "cd benchmarks && ../.venv/bin/python pfp_zero_below.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="folder for pfp_zero_below.json/.md (default: print only)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--values", default="0,0.2,0.5,0.8", help="zero_below values, comma-separated")
    parser.add_argument("--offsets", default="0,20000,40000", help="first training image of each calibration set")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    for name in models:
        if name not in MODELS:
            sys.exit(f"--models: {name!r} is not one of {', '.join(MODELS)}")
    values = [float(v) for v in args.values.split(",")]
    offsets = [int(o) for o in args.offsets.split(",")]
    train = data.load("fashion-mnist", "train")
    test = DataLoader(data.load("fashion-mnist", "test"), batch_size=500)
    x, y = train.tensors
    if max(offsets) + CALIB_SAMPLES > len(x):
        sys.exit(f"--offsets: a calibration set of {CALIB_SAMPLES} images must fit in the {len(x)} training images")
    variants = [("magnitude", "magnitude", {}), ("ispasp", "ispasp", {})]
    variants += [(f"pfp zero_below={v:g}", "pfp", {"zero_below": v}) for v in values]
    rows = []
    for name in models:
        checkpoint, budget = MODELS[name]
        dense = structprune.load(checkpoint).eval()
        for offset in offsets:
            calib = [(x[i:i + 128], y[i:i + 128]) for i in range(offset, offset + CALIB_SAMPLES, 128)]
            for label, method, options in variants:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = structprune.prune(dense, calib, method, budget, example_inputs=calib[0][0][:1],
                                               progress=False, **options)
                accuracy = structprune.measure.accuracy(result.model, test)
                rows.append({"model": name, "offset": offset, "variant": label, "accuracy": accuracy,
                             "prune_seconds": result.seconds})
                print(f"{name} calib@{offset} {label}: {accuracy:.2f}% ({result.seconds:.1f} s)", flush=True)
    table = ["| model | variant | " + " | ".join(f"calib @{o:,}" for o in offsets) + " | mean |",
             "|---|---|" + "---:|" * (len(offsets) + 1)]
    for name in models:
        for label, _, _ in variants:
            accs = [r["accuracy"] for r in rows if r["model"] == name and r["variant"] == label]
            table.append(f"| {name} | {label} | " + " | ".join(f"{a:.2f}" for a in accs) +
                         f" | {statistics.mean(accs):.2f} |")
    command = COMMAND + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    write_table(args.out_dir, "pfp_zero_below", "PFP's zero_below after the default recovery, half the MACs",
                command, rows, table)


if __name__ == "__main__":
    main()
