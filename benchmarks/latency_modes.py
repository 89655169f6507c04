"""Latency of pruned CNNs in PyTorch's execution modes: eager, channels_last, torch.compile (inductor) and frozen
TorchScript.

Each model is pruned to 50% of its MACs with the defaults (``Target(0.5)``: ``round_to="auto"``, ``scope="auto"``;
magnitude, no recovery: latency depends only on the widths), then timed at batch 64 in each mode next to its
dense model (median of ``torch.utils.benchmark`` runs, dense and pruned in turn, three rounds, the fastest of
each). ``freeze``: ``torch.jit.trace``, ``torch.jit.freeze`` and ``torch.jit.optimize_for_inference`` (BatchNorm
folded into the convolutions, which then run on oneDNN's blocked layout from one to the next instead of converting
every activation to it and back). The issue's target: a speed-up of at least 0.9 × the MACs ratio (dense MACs /
pruned MACs) at half the MACs. ResNet-20/56 and VGG-16 are the committed Fashion-MNIST checkpoints, MobileNetV2
width 1.0 with random weights; 1×28×28 inputs.

    cd benchmarks && ../.venv/bin/python latency_modes.py --out-dir results     # 10–30 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import warnings

import torch
from results_io import write_table

import structprune
from structprune.measure import fastest_medians

MODELS = {
    "ResNet-20": lambda: structprune.load("checkpoints/resnet20-fmnist.pt"),
    "ResNet-56": lambda: structprune.load("checkpoints/resnet56-fmnist.pt"),
    "VGG-16 (half width)": lambda: structprune.load("checkpoints/vgg16-fmnist.pt"),
    "MobileNetV2": lambda: structprune.models.create("mobilenetv2", in_channels=1).eval(),
}
MODES = ("eager", "channels_last", "compile", "freeze")
COMMAND = "cd benchmarks && ../.venv/bin/python latency_modes.py"


def in_mode(model: torch.nn.Module, mode: str, batch: torch.Tensor):
    """The model (and how to shape its input) for an execution mode."""
    if mode == "channels_last":  # a copy: .to() converts the module itself, which the other modes time too
        return copy.deepcopy(model).to(memory_format=torch.channels_last), torch.channels_last
    if mode == "compile":
        return torch.compile(model), torch.contiguous_format
    if mode == "freeze":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 deprecates TorchScript; it still runs it
            frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model).eval(), batch))
            return torch.jit.optimize_for_inference(frozen), torch.contiguous_format
    return model, torch.contiguous_format


def timed(dense, pruned, mode: str, batch: torch.Tensor, rounds: int = 3) -> tuple[float, float]:
    runs = []
    for model in (dense, pruned):
        compiled, layout = in_mode(model, mode, batch)
        runs.append((compiled, batch.contiguous(memory_format=layout)))
    dense_ms, pruned_ms = fastest_medians([lambda m=m, x=x: m(x) for m, x in runs], rounds, warmup=5, min_seconds=0.5)
    return dense_ms, pruned_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=None, help="write latency_modes.json and .md here")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    args = parser.parse_args()
    torch.manual_seed(0)
    calib = [(torch.randn(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))]
    batch = torch.randn(64, 1, 28, 28)
    rows = []
    for name in args.models.split(","):
        dense = MODELS[name]()
        for options in ({}, {"round_to": None}):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = structprune.prune(dense, calib, "magnitude", structprune.Target(0.5), refit=False,
                                           recalibrate=False, progress=False, **options)
            round_to = result.budget["round_to"]
            widths = "as they fall" if options else f"defaults (round_to {round_to})"
            macs_ratio = result.before["macs"] / result.after["macs"]
            for mode in MODES:
                dense_ms, pruned_ms = timed(dense, result.model, mode, batch)
                speedup = dense_ms / pruned_ms
                rows.append({"model": name, "widths": widths, "round_to": round_to, "mode": mode, "dense_ms": dense_ms,
                             "pruned_ms": pruned_ms, "speedup": speedup, "macs_ratio": macs_ratio,
                             "of_macs_ratio": speedup / macs_ratio})
                print(f"{name} {widths} {mode}: {dense_ms:.1f} -> {pruned_ms:.1f} ms, x{speedup:.2f} "
                      f"(MACs x{macs_ratio:.2f}, {speedup / macs_ratio:.2f} of it)", flush=True)
    table = ["| model | widths | mode | dense → pruned (ms) | speed-up | MACs ratio | speed-up / MACs ratio |",
             "|---|---|---|---|---:|---:|---:|"]
    table += [f"| {r['model']} | {r['widths']} | {r['mode']} | "
              f"{r['dense_ms']:.1f} → {r['pruned_ms']:.1f} | ×{r['speedup']:.2f} | ×{r['macs_ratio']:.2f} | "
              f"{r['of_macs_ratio']:.2f} |" for r in rows]
    write_table(args.out_dir, "latency_modes", "Latency of pruned CNNs by execution mode, batch 64, half the MACs",
                f"{COMMAND} {shlex.join(sys.argv[1:])}", rows, table)


if __name__ == "__main__":
    main()
