"""``structprune export``: a checkpoint (or a Hugging Face directory) as ONNX or TorchScript, checked against
PyTorch, with both latencies."""

from __future__ import annotations

from pathlib import Path

from .. import checkpoint, exporter, measure
from ..errors import StructPruneError
from . import common, options

DESCRIPTION = ("Write a checkpoint (or a Hugging Face model directory) as ONNX or TorchScript with a dynamic batch "
               "axis (and sequence axis for token inputs), run the written file on a random batch and compare its "
               "outputs with PyTorch's (ONNX Runtime for ONNX: pip install 'structprune[onnx]'), and print both "
               "latencies. A JSON report is written next to --out (OUT.json).")


def register(p) -> None:
    p.add_argument("model", help="checkpoint (.pt) or Hugging Face model directory to export")
    p.add_argument("--out", required=True, help="the exported file (.onnx, or .ts for TorchScript)")
    p.add_argument("--format", default=None, choices=exporter.FORMATS,
                   help="onnx or torchscript (default: from --out's suffix: .ts/.torchscript/.jit TorchScript, "
                        "else ONNX)")
    p.add_argument("--opset", type=options.positive, default=None,
                   help="ONNX opset (default: torch.onnx's default for the installed torch)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest absolute difference allowed between the exported model's outputs and PyTorch's "
                        "(default: 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch after export")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batch (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite --out and its report if they exist")
    options.add_trust(p)


def run(args) -> int:
    out, report_path = common.check_outputs(args, args.model, report=Path(args.out + ".json"))  # OUT.onnx.json
    if not Path(args.model).exists():
        raise StructPruneError(f"{args.model} does not exist")
    model = checkpoint.load(args.model, trust_checkpoint=args.trust_checkpoint)
    result = exporter.export(model, out, args.format, opset=args.opset, check=not args.no_check, atol=args.atol,
                             force=args.force, seed=args.seed, source=str(args.model))
    report = {"command": "export", "model": str(args.model), **result.to_dict()}
    latency = ""
    example = checkpoint.example_input(model)  # None for a language model: no latency at a made-up length
    exported = None
    if not args.no_latency and example is not None and (result.format == "torchscript" or exporter.has_onnxruntime()):
        exported = exporter.ExportedModel(out, trust_checkpoint=True)  # the file we have just written
    if exported is not None:
        report["latency_pytorch_batch1"] = measure.latency_stats(model, example)
        report[f"latency_{exported.runtime}_batch1"] = exported.latency_stats(example)
        latency = (f"; latency at batch 1: PyTorch {report['latency_pytorch_batch1']['median_ms']:.3f} ms, "
                   f"{exported.runtime} {report[f'latency_{exported.runtime}_batch1']['median_ms']:.3f} ms")
    common.write_json(report_path, report, args.force)
    what = f"ONNX opset {result.opset}" if result.format == "onnx" else "TorchScript"
    check = ("not checked" if result.checked_with is None else
             f"checked with {result.checked_with} on a random batch: max abs difference {result.max_abs_diff:.2g} "
             f"(atol {result.atol:g})")
    print(f"{args.model} -> {out} ({what}, inputs {', '.join(result.inputs)} with a dynamic batch axis; {check})"
          f"{latency}")
    return 0
