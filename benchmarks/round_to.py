"""Kept widths as they fall or rounded to multiples: accuracy and CPU latency of the default pipeline.

For each Fashion-MNIST checkpoint (``benchmarks/checkpoints``), i-SpaSP and PFP with the default pipeline to 50% of
the dense MACs on the first 2,048 training images, with each of ``--roundings``: ``none`` (``round_to=None``, the
widths as the allocation gives them), a multiple (every group rounded) and ``auto`` (the default: the CPU's
multiple, ``structprune.allocate.HARDWARE_MULTIPLE``, in the groups at least four multiples wide), scored on the test
split with no fine-tune. MobileNetV2 (width 1.0, random weights: no accuracy) is pruned by magnitude without
recovery, for its latency. Each pruned model is timed at batch 64 against its dense model, in eager PyTorch and,
where onnxruntime is installed, in ONNX Runtime (``structprune.export``): ``structprune.measure.latency_ratio``,
30 pairs of blocks (the two in turn; the ratio the median of the pairs', the milliseconds each one's median).

    cd benchmarks && ../.venv/bin/python round_to.py --out-dir results        # ~20 min on 2 CPU cores
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
from structprune.measure import latency_ratio

COMMAND = "cd benchmarks && ../.venv/bin/python round_to.py --out-dir results"
CHECKPOINTS = ("resnet20", "resnet56", "vgg16")
ROUNDINGS = "none,8,16,auto"
PAIRS = 30
BATCH = 64


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def timed(pruned, dense, batch) -> tuple[float, float, float]:
    """(dense ms, pruned ms, pruned/dense ratio) at ``batch``, in pairs of blocks."""
    out = latency_ratio(pruned, dense, batch, min_pairs=PAIRS)
    return out["reference_ms"], out["model_ms"], out["ratio"]


def latencies(dense, pruned, batch: torch.Tensor, directory: Path, tag: str) -> dict:
    """Eager PyTorch (and ONNX Runtime) medians of the dense and the pruned model at ``batch``, and their ratio."""
    dense.eval()
    pruned.eval()
    out = dict(zip(("eager_dense_ms", "eager_pruned_ms", "eager_ratio"), timed(pruned, dense, batch), strict=True))
    if onnxruntime_available():
        sessions = []
        for label, model in (("dense", dense), ("pruned", pruned)):
            path = directory / f"{tag}-{label}.onnx"
            structprune.export(model, path, "onnx", example_inputs=batch[:1])
            sessions.append(ExportedModel(path, trust_checkpoint=True))  # written just now, by us
        out.update(zip(("onnx_dense_ms", "onnx_pruned_ms", "onnx_ratio"), timed(sessions[1], sessions[0], batch),
                       strict=True))
    return out


def rounding(text: str) -> int | str | None:
    text = text.strip().lower()
    return None if text == "none" else "auto" if text == "auto" else int(text)


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
    parser.add_argument("--roundings", default=ROUNDINGS,
                        help="round_to values to compare: none, auto or a multiple (default: %(default)s)")
    args = parser.parse_args()
    roundings = [rounding(r) for r in args.roundings.split(",")]
    wanted = set(args.models.split(","))
    calib, test = fashion_mnist(args.test_limit, 2048, 128)
    batch = torch.cat([x for x, _ in calib])[:BATCH]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, dense, method, options, scored in cases():
            if name not in wanted:
                continue
            dense_accuracy = accuracy(dense, test) if scored else None
            for round_to in roundings:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = structprune.prune(dense, calib, method, structprune.Target(0.5, "flops"),
                                               round_to=round_to, progress=False, **options)
                row = {"model": name, "method": method, "round_to": round_to,
                       "round_to_used": result.budget.get("round_to"), "seconds": result.seconds,
                       "macs_ratio": result.after["macs"] / result.before["macs"],
                       "params_ratio": result.after["params"] / result.before["params"],
                       "dense_accuracy": dense_accuracy,
                       "accuracy": accuracy(result.model, test) if scored else None,
                       **latencies(dense, result.model, batch, Path(tmp), f"{name}-{method}-{round_to}")}
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    write_table(args.out_dir, "round_to", "Kept widths as they fall or rounded to multiples", COMMAND, rows,
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
        rounded = r["round_to"] or "–"
        if r["round_to"] == "auto":
            rounded = f"auto ({r.get('round_to_used') or 'none'})"
        cells = [r["model"], r["method"], str(rounded), f"{r['macs_ratio']:.1%}",
                 f"{r['params_ratio']:.1%}", acc]
        for runtime in ("eager",) + (("onnx",) if onnx else ()):
            d, p, speedup = r[f"{runtime}_dense_ms"], r[f"{runtime}_pruned_ms"], 1 / r[f"{runtime}_ratio"]
            cells += [f"{d:.1f} → {p:.1f}", f"×{speedup:.2f} ({speedup / macs:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
