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


#: the batch sizes latency is measured at, in PyTorch and in the exported file's runtime
BATCHES = (1, 64)


def register(p) -> None:
    p.add_argument("checkpoint", nargs="?", metavar="MODEL",
                   help="checkpoint (.pt) or Hugging Face model directory to export (or --model SPEC with --weights)")
    options.add_model(p)
    options.add_model_options(p)
    options.add_dataset(p)
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
    source = args.checkpoint if args.checkpoint is not None else args.model
    out, report_path = common.check_outputs(args, args.checkpoint, args.weights,
                                            report=Path(args.out + ".json"))  # OUT.onnx.json
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise StructPruneError(f"{args.checkpoint} does not exist")
    model = common.model_from(args, args.checkpoint, doing="exports")
    example = checkpoint.example_input(model)  # None for a language model: no latency at a made-up length
    if example is None and args.checkpoint is None:  # --model SPEC: the input of --data
        example = common.example(args)
        common.check_fits(model, args, example)
    result = exporter.export(model, out, args.format, example_inputs=example if args.checkpoint is None else None,
                             opset=args.opset, check=not args.no_check, atol=args.atol, force=args.force,
                             seed=args.seed, source=str(source))
    report = {"command": "export", "model": str(source), **result.to_dict()}
    exported = None
    if not args.no_latency and example is not None and (result.format == "torchscript" or exporter.has_onnxruntime()):
        exported = exporter.ExportedModel(out, trust_checkpoint=True)  # the file we have just written
    latency = ""
    if exported is not None:
        for batch in BATCHES:
            inputs = measure.repeat_batch(example, batch)
            report[f"latency_pytorch_batch{batch}"] = measure.latency_stats(model, inputs)
            report[f"latency_{exported.runtime}_batch{batch}"] = exported.latency_stats(inputs)
        latency = "; latency (ms, median ± IQR): " + ", ".join(
            f"{name} {_ms(report[f'latency_{key}_batch1'])} at 1 sample, {_ms(report[f'latency_{key}_batch64'])} "
            f"at 64" for name, key in (("PyTorch", "pytorch"), (exported.runtime, exported.runtime)))
    common.write_json(report_path, report, args.force)
    what = f"ONNX opset {result.opset}" if result.format == "onnx" else "TorchScript"
    check = ("not checked" if result.checked_with is None else
             f"checked with {result.checked_with} on a random batch: max abs difference {result.max_abs_diff:.2g} "
             f"(atol {result.atol:g})")
    print(f"{source} -> {out} ({what}, inputs {', '.join(result.inputs)} with a dynamic batch axis; {check})"
          f"{latency}")
    return 0


def _ms(stats: dict) -> str:
    return f"{stats['median_ms']:.3f} ± {stats['iqr_ms']:.3f}"
