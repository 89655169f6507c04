"""``structprune eval``: accuracy, parameters, MACs and latency of checkpoints (and exported files), as a table."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import exporter, measure, report
from ..errors import StructPruneError
from ..safe_io import check_output
from . import common, evaluate_text, options

DESCRIPTION = ("Print a table of test accuracy, parameters, MACs and CPU/GPU latency. Params and MACs kept: of the "
               "checkpoint's own dense model where it records its pruning, else (a dense checkpoint, an exported "
               "file) of the first checkpoint's dense model, or of the first checkpoint itself. Hugging Face model "
               "directories are judged on --text instead: causal language models by sliding-window perplexity, "
               "others by their sentence embeddings' cosine similarity to the first directory's.")


#: the batch sizes latency is measured at: one sample (interactive use) and a batch (throughput)
BATCHES = (1, 64)


def register(p) -> None:
    p.add_argument("checkpoints", nargs="*", help="checkpoints (or files written by structprune export, or Hugging "
                                                  "Face model directories with --text) to evaluate")
    options.add_model(p)
    options.add_model_options(p)
    p.add_argument("--json", dest="json_out", default=None, help="also write the table as JSON to this file")
    p.add_argument("--force", action="store_true", help="overwrite --json if it exists")
    options.add_data(p, "evaluate on the first N test samples only")
    options.add_common(p)
    options.add_trust(p)
    evaluate_text.add_options(p)


def run(args) -> int:
    json_path = Path(args.json_out) if args.json_out else None
    if json_path is not None:
        common.refuse_input(json_path, args.checkpoints)
        check_output(json_path, args.force, what="--json:")
    if evaluate_text.applies(args):
        return evaluate_text.run(args, json_path)
    if not args.checkpoints and args.model is None:
        raise StructPruneError("give checkpoints to evaluate, or --model SPEC (with --weights FILE)")
    common.refuse_model_options(args)
    device = options.device(args.device)
    files = [path for path in args.checkpoints if not exporter.is_exported(path)]
    common.use_recorded_data(args, files[0] if files else None)
    models = ([(args.model, common.model_from(args, doing="evaluates"))] if args.model is not None else [])
    test_loader = common.loader(args, "test", limit=args.limit)
    example = common.example(args)
    rows = [_row(name, model, args, test_loader, example, device) for name, model in models]
    rows += [_exported_row(path, args, test_loader, example) if exporter.is_exported(path)
             else _row(path, common.load(path, args), args, test_loader, example, device) for path in args.checkpoints]
    print(report.eval_table(rows))
    if json_path is not None:
        common.write_json(json_path, {"command": "eval", "data": args.data, "device": str(device), "rows": rows},
                          args.force)
    return 0


def _row(name, model, args, test_loader, example: torch.Tensor, device) -> dict:
    model = model.to(device)
    common.check_fits(model, args, example)
    size = measure.count(model, example.to(device))
    return {"checkpoint": str(name), "runtime": "pytorch", "accuracy": measure.accuracy(model, test_loader, device),
            **size, **common.dense_size(model, example, args),
            **_latencies(lambda batch: measure.latency_stats(model, batch.to(device)), example)}


def _latencies(time, example: torch.Tensor) -> dict:
    """Median and interquartile range (ms) of a forward pass at each of :data:`BATCHES` samples."""
    return {f"latency_{k}_batch{b}": v for b in BATCHES for k, v in time(measure.repeat_batch(example, b)).items()}


def _exported_row(path, args, test_loader, example: torch.Tensor) -> dict:
    """An ONNX (ONNX Runtime) or TorchScript file, on the CPU; its size as its export recorded it."""
    model = exporter.ExportedModel(path, trust_checkpoint=args.trust_checkpoint)
    common.check_fits(model, args, example)
    recorded = model.metadata
    if "params" not in recorded:
        raise StructPruneError(f"{path} was not written by structprune export: its size is not recorded")
    return {"checkpoint": str(path), "runtime": model.runtime,
            "accuracy": measure.accuracy(model, test_loader, torch.device("cpu")),
            "params": recorded["params"], "macs": recorded["macs"], **_latencies(model.latency_stats, example)}
