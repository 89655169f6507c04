"""Kept widths as they fall or rounded to multiples of 8: accuracy and CPU latency of the default pipeline.

For each Fashion-MNIST checkpoint (``benchmarks/checkpoints``), i-SpaSP and PFP with the default pipeline to 50% of
the dense MACs on the first 2,048 training images, once with ``round_to=None`` (the widths as the allocation gives
them) and once with ``round_to=8`` (what ``round_to="auto"`` takes on a CPU), scored on the test split with no
fine-tune. MobileNetV2 (width 1.0, random weights: no accuracy) is pruned by magnitude without recovery, for its
latency. Each pruned model is timed at batch 64 next to its dense model, in eager PyTorch and, where onnxruntime is
installed, in ONNX Runtime (``structprune.export``): median of ``torch.utils.benchmark`` runs, dense and pruned in
turn, three rounds, the fastest of each.

    cd benchmarks && ../.venv/bin/python round_to.py --out-dir results        # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from results_io import write_table
from rows import accuracy, fashion_mnist

import structprune
from structprune.exporter import ExportedModel
from structprune.measure import time_call

COMMAND = "cd benchmarks && ../.venv/bin/python round_to.py --out-dir results"
CHECKPOINTS = ("resnet20", "resnet56", "vgg16")
ROUNDINGS = (None, 8)
BATCH = 64


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def fastest_medians(runs: list, rounds: int = 3) -> list[float]:
    """The fastest median (ms) of each callable over ``rounds`` rounds, the callables timed in turn."""
    best = [float("inf")] * len(runs)
    with torch.no_grad():
        for _ in range(rounds):
            for i, run in enumerate(runs):
                best[i] = min(best[i], time_call(run, min_runs=10, warmup=3, min_seconds=0.5)["median_ms"])
    return best


def latencies(dense, pruned, batch: torch.Tensor, directory: Path, tag: str) -> dict:
    """Eager PyTorch (and ONNX Runtime) medians of the dense and the pruned model at ``batch``."""
    dense.eval()
    pruned.eval()
    out = dict(zip(("eager_dense_ms", "eager_pruned_ms"),
                   fastest_medians([lambda: dense(batch), lambda: pruned(batch)]), strict=True))
    if onnxruntime_available():
        sessions = []
        for label, model in (("dense", dense), ("pruned", pruned)):
            path = directory / f"{tag}-{label}.onnx"
            structprune.export(model, path, "onnx", example_inputs=batch[:1])
            sessions.append(ExportedModel(path, trust_checkpoint=True))  # written just now, by us
        out.update(zip(("onnx_dense_ms", "onnx_pruned_ms"),
                       fastest_medians([lambda: sessions[0](batch), lambda: sessions[1](batch)]), strict=True))
    return out


def cases() -> list[tuple[str, torch.nn.Module, str, dict, bool]]:
    """(model, dense model, method, prune options, scored)."""
    out = []
    for name in CHECKPOINTS:
        dense = structprune.load(f"checkpoints/{name}-fmnist.pt").eval()
        out += [(name, dense, method, {}, True) for method in ("ispasp", "pfp")]
    torch.manual_seed(0)
    mobilenet = structprune.models.create("mobilenetv2", in_channels=1).eval()
    out.append(("mobilenetv2", mobilenet, "magnitude", {"refit": False, "recalibrate": False}, False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="directory for round_to.json and round_to.md")
    parser.add_argument("--models", default=",".join((*CHECKPOINTS, "mobilenetv2")),
                        help="subset of the models (default: %(default)s)")
    parser.add_argument("--test-limit", type=int, default=None, help="score on the first N test images only")
    args = parser.parse_args()
    wanted = set(args.models.split(","))
    calib, test = fashion_mnist(args.test_limit, 2048, 128)
    batch = torch.cat([x for x, _ in calib])[:BATCH]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, dense, method, options, scored in cases():
            if name not in wanted:
                continue
            dense_accuracy = accuracy(dense, test) if scored else None
            for round_to in ROUNDINGS:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = structprune.prune(dense, calib, method, structprune.Target(0.5, "flops"),
                                               round_to=round_to, progress=False, **options)
                row = {"model": name, "method": method, "round_to": round_to, "seconds": result.seconds,
                       "macs_ratio": result.after["macs"] / result.before["macs"],
                       "params_ratio": result.after["params"] / result.before["params"],
                       "dense_accuracy": dense_accuracy,
                       "accuracy": accuracy(result.model, test) if scored else None,
                       **latencies(dense, result.model, batch, Path(tmp), f"{name}-{method}-{round_to}")}
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    write_table(args.out_dir, "round_to", "Kept widths as they fall or rounded to multiples of 8", COMMAND, rows,
                table(rows))


def table(rows: list[dict]) -> list[str]:
    onnx = any("onnx_dense_ms" in r for r in rows)
    lines = ["| model | method | round to | MACs kept | params kept | accuracy (dense → pruned) | eager b64 (ms) | "
             "eager speed-up (/ MACs ratio)" + (" | ONNX Runtime b64 (ms) | ONNX Runtime speed-up (/ MACs ratio)"
                                               if onnx else "") + " |",
             "|---|---|---:|---:|---:|---|---|---:" + ("|---|---:" if onnx else "") + "|"]
    for r in rows:
        macs = 1 / r["macs_ratio"]
        acc = "–" if r["accuracy"] is None else f"{r['dense_accuracy']:.2f} → {r['accuracy']:.2f}"
        cells = [r["model"], r["method"], str(r["round_to"] or "–"), f"{r['macs_ratio']:.1%}",
                 f"{r['params_ratio']:.1%}", acc]
        for runtime in ("eager",) + (("onnx",) if onnx else ()):
            d, p = r[f"{runtime}_dense_ms"], r[f"{runtime}_pruned_ms"]
            cells += [f"{d:.1f} → {p:.1f}", f"×{d / p:.2f} ({d / p / macs:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
