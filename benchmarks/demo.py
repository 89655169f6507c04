"""The demo's table: one trained checkpoint pruned to a keep ratio by Torch-Pruning's MagnitudePruner and by
structprune's magnitude, i-SpaSP and PFP, each as the bare one-shot step and with the default pipeline.

    python benchmarks/demo.py runs/demo/lenet5.pt --out runs/demo/table     # make demo runs this

Every variant prunes the same checkpoint on the same calibration images (the first 2,048 of the
Fashion-MNIST training split) to the same keep ratio of every group's channels (so the same MACs), and
is scored on the whole test split, with no fine-tune. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import warnings
from datetime import date
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import structprune
from structprune import data
from structprune.recalibrate import has_batchnorm, recalibrate_batchnorm

CALIB_SAMPLES = 2048


def torch_pruning_magnitude(model: nn.Module, example, ratio: float) -> nn.Module:
    """Torch-Pruning's MagnitudePruner (L2 group magnitude) at ``ratio`` of every group, output layer kept."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    output = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=1 - ratio, ignored_layers=[output])
    pruner.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a trained Fashion-MNIST checkpoint")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of every group's channels kept")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    dense = structprune.load(args.checkpoint)
    train_set = data.load("fashion-mnist", "train")
    test = DataLoader(data.load("fashion-mnist", "test"), batch_size=1000)
    x, y = train_set.tensors
    calib = [(x[i:i + 128], y[i:i + 128]) for i in range(0, CALIB_SAMPLES, 128)]
    example = x[:1]
    size = structprune.measure.count(dense, example)
    rows = [{"variant": "dense", "recovery": "–", "accuracy": structprune.measure.accuracy(dense, test), **size}]

    def add(variant: str, recovery: str, model: nn.Module) -> None:
        rows.append({"variant": variant, "recovery": recovery, "accuracy": structprune.measure.accuracy(model, test),
                     **structprune.measure.count(model, example)})
        print(f"{variant} ({recovery}): {rows[-1]['accuracy']:.2f}%", file=sys.stderr, flush=True)

    tp_model = torch_pruning_magnitude(dense, example, args.ratio)
    add("Torch-Pruning MagnitudePruner", "none", tp_model)
    if has_batchnorm(tp_model):
        recalibrate_batchnorm(tp_model, calib)
        add("Torch-Pruning MagnitudePruner", "BatchNorm recalibration", tp_model)
    bare, default = ("none (bare one-shot step)", {"refit": False, "recalibrate": False}), ("default pipeline", {})
    variants = [("magnitude", {}, bare), ("magnitude", {"norm": 2, "coupled": True}, bare), ("magnitude", {}, default),
                ("ispasp", {}, bare), ("ispasp", {}, default), ("pfp", {}, bare), ("pfp", {}, default)]
    for method, method_options, (recovery, options) in variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = structprune.prune(dense, calib, method, args.ratio, example_inputs=example, progress=False,
                                       **options, **method_options)
        label = ", ".join(f"{k}={v}" for k, v in method_options.items())
        add(f"structprune {method}" + (f" ({label})" if label else ""), recovery, result.model)
    lines = [f"{Path(args.checkpoint).name} on Fashion-MNIST, every group pruned to {args.ratio:.0%} of its channels, "
             f"no fine-tuning ({CALIB_SAMPLES:,} calibration images; {len(test.dataset):,} test images):", "",
             "| model | recovery | accuracy (%) | params | MACs |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['recovery']} | {r['accuracy']:.2f} | {r['params']:,} | {r['macs']:,} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__, "command": "python benchmarks/demo.py " + " ".join(sys.argv[1:])}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
