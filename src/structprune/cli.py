"""The ``structprune`` command: train, prune, eval, info.

Every command validates its input first and fails with one line naming the argument (exit code 2);
outputs are written to a temporary file and renamed, and existing outputs are kept unless --force.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import checkpoint, data, measure, methods, models
from .api import prune
from .errors import StructPruneError
from .graph import PruningGraph


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (the fraction of channels kept), got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must look like KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.replace("-", "_"), value


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StructPruneError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise StructPruneError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None


def _add_data_args(p: argparse.ArgumentParser, limit_help: str) -> None:
    p.add_argument("--data", default="fashion-mnist", choices=sorted(data.DATASETS),
                   help="dataset (default: fashion-mnist, from Debian's dataset-fashion-mnist)")
    p.add_argument("--data-dir", default=None,
                   help=f"directory with the dataset files (default for fashion-mnist: "
                        f"{data.fashion_mnist.DEFAULT_ROOT})")
    p.add_argument("--limit", type=_positive, default=None, help=limit_help)
    p.add_argument("--batch-size", type=_positive, default=128, help="batch size (default: 128)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N] (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same result (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output checkpoint (.pt); a JSON report is written next to it")
    p.add_argument("--force", action="store_true", help="overwrite --out and its report if they exist")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a zoo model and save a checkpoint",
                       description="Train a model from the zoo on a dataset and save a structprune checkpoint.")
    p.add_argument("--model", required=True, choices=models.available(), help="architecture")
    p.add_argument("--width-mult", type=float, default=None,
                   help="channel width multiplier (vgg16, resnet*, mobilenetv2)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the cosine schedule (default: 0.05)")
    p.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay on conv/linear weights (default: 5e-4)")
    _add_data_args(p, "train on the first N training samples only")
    _add_common(p)
    _add_output(p)

    p = sub.add_parser("prune", help="prune a checkpoint and save the smaller model",
                       description="Prune every prunable group of a checkpoint to --ratio of its channels, "
                                   "shallow to deep, with a data-informed (ispasp, pfp, pfp-rand) or weight-only "
                                   "(magnitude, random) method; channels are physically removed.")
    p.add_argument("checkpoint", help="checkpoint written by `structprune train` or structprune.save")
    p.add_argument("--method", default="ispasp", choices=methods.available(), help="pruning method (default: ispasp)")
    p.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of each group's channels to keep, in (0, 1] "
                                                             "(default: 0.5)")
    p.add_argument("--calib-samples", type=_positive, default=None,
                   help="calibration samples from the training split (default: the method's own: ispasp 1280, "
                        "others 256)")
    p.add_argument("--option", "-o", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable: ispasp iterations=20; pfp/pfp-rand max_rows=2048; "
                        "magnitude norm=1|2")
    p.add_argument("--ignore", action="append", default=[], metavar="LAYER",
                   help="layer name whose output channels are kept whole (repeatable); the output layer always is")
    p.add_argument("--no-eval", action="store_true", help="skip test accuracy before/after")
    _add_data_args(p, "evaluate on the first N test samples only")
    _add_common(p)
    _add_output(p)

    p = sub.add_parser("eval", help="accuracy, params, MACs and latency of checkpoints",
                       description="Print a table of test accuracy, parameters, MACs and CPU/GPU latency.")
    p.add_argument("checkpoints", nargs="+", help="checkpoints to evaluate")
    p.add_argument("--json", dest="json_out", default=None, help="also write the table as JSON to this file")
    p.add_argument("--force", action="store_true", help="overwrite --json if it exists")
    _add_data_args(p, "evaluate on the first N test samples only")
    _add_common(p)

    p = sub.add_parser("info", help="list the prunable groups of a model",
                       description="List the prunable groups of a checkpoint (or a zoo model): channels, "
                                   "producers and consumers.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("checkpoint", nargs="?", help="checkpoint to inspect")
    src.add_argument("--model", choices=models.available(), help="inspect a fresh zoo model instead")
    p.add_argument("--data", default="fashion-mnist", choices=sorted(data.DATASETS),
                   help="dataset whose input shape --model is built for (default: fashion-mnist)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        torch.manual_seed(getattr(args, "seed", 0))
        return {"train": cmd_train, "prune": cmd_prune, "eval": cmd_eval, "info": cmd_info}[args.command](args)
    except StructPruneError as exc:
        print(f"structprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"structprune {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130


# -- commands ------------------------------------------------------------------------------------

def _report_path(out: Path) -> Path:
    return out.with_suffix(".json") if out.suffix != ".json" else out.with_suffix(".report.json")


def _check_outputs(args) -> tuple[Path, Path]:
    """Refuse early (before any work) to overwrite outputs without --force."""
    out = Path(args.out)
    report = _report_path(out)
    for path in (out, report):
        if path.exists() and not args.force:
            raise StructPruneError(f"--out: {path} already exists; pass --force to overwrite it")
    return out, report


def _write_json(path: Path, payload: dict, force: bool) -> None:
    text = json.dumps(payload, indent=2, default=str)
    checkpoint.write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n"), force=force)


def _loader(args, split: str, shuffle: bool = False, limit=None) -> DataLoader:
    dataset = data.load(args.data, split=split, root=args.data_dir, limit=limit, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, generator=gen)


def _example(args_data: str) -> torch.Tensor:
    return torch.zeros(1, *data.shape(args_data))


def _zoo_model(name: str, dataset: str, **kwargs):
    """A fresh zoo model shaped for ``dataset``'s images and classes."""
    channels, height, _ = data.shape(dataset)
    if models.accepts(name, "input_size"):
        kwargs["input_size"] = height
    return models.create(name, num_classes=data.classes(dataset), in_channels=channels, **kwargs)


def _check_fits(model, args, example: torch.Tensor) -> None:
    """The model must accept the data's images and have as many outputs as it has classes."""
    try:
        with torch.no_grad():
            out = model.eval()(example.to(next(model.parameters()).device))
    except Exception as exc:
        raise StructPruneError(f"--data {args.data}: the model does not accept its {tuple(example.shape[1:])} "
                               f"inputs ({str(exc).splitlines()[0]})") from None
    if out.dim() != 2 or out.shape[1] != data.classes(args.data):
        raise StructPruneError(f"--data {args.data}: it has {data.classes(args.data)} classes but the model "
                               f"outputs {tuple(out.shape[1:])}")


def cmd_train(args) -> int:
    out, report_path = _check_outputs(args)
    if args.epochs < 0:
        raise StructPruneError(f"--epochs must be >= 0, got {args.epochs}")
    device = _device(args.device)
    kwargs = {}
    if args.width_mult is not None:
        if not models.accepts(args.model, "width_mult"):
            raise StructPruneError(f"--width-mult: model {args.model} has no width multiplier")
        kwargs["width_mult"] = args.width_mult
    model = _zoo_model(args.model, args.data, **kwargs).to(device)
    train_loader = _loader(args, "train", shuffle=True, limit=args.limit)
    test_loader = _loader(args, "test")
    example = _example(args.data)
    _check_fits(model, args, example)
    from .finetune import train

    start = time.perf_counter()
    losses = train(model, train_loader, args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                   device=device, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    accuracy = measure.accuracy(model, test_loader, device)
    model.structprune_example_input = {"shape": list(example.shape), "dtype": "float32"}
    size = measure.count(model.cpu(), example)
    report = {"command": "train", "model": args.model, "arch": model.structprune_arch, "data": args.data,
              "epochs": args.epochs, "train_samples": len(train_loader.dataset), "losses": losses,
              "test_accuracy": accuracy, **size, "train_seconds": seconds, "seed": args.seed}
    checkpoint.save(model, out, force=args.force, extra={"report": report})
    _write_json(report_path, report, args.force)
    print(f"{args.model} on {args.data}: test accuracy {accuracy:.2f}%, {size['params']:,} params, "
          f"{size['macs']:,} MACs, trained in {seconds:.1f}s -> {out}")
    return 0


def cmd_prune(args) -> int:
    out, report_path = _check_outputs(args)
    device = _device(args.device)
    model = checkpoint.load(args.checkpoint).to(device)
    example = _example(args.data)
    _check_fits(model, args, example)
    options = dict(args.option)
    try:  # validate the options before any data is read
        methods.get(args.method, **options)
    except StructPruneError as exc:
        raise StructPruneError(f"--option: {exc}") from None
    calib = _loader(args, "train")
    test_loader = None if args.no_eval else _loader(args, "test", limit=args.limit)
    dense_accuracy = None if test_loader is None else measure.accuracy(model, test_loader, device)
    result = prune(model, calib, method=args.method, ratio=args.ratio, example_inputs=example.to(device),
                   calib_samples=args.calib_samples, ignored_layers=args.ignore, seed=args.seed,
                   progress=not args.no_progress, **options)
    report = {"command": "prune", "checkpoint": str(args.checkpoint), "data": args.data, **result.to_dict()}
    if test_loader is not None:
        report["accuracy_before"] = dense_accuracy
        report["accuracy_after"] = measure.accuracy(result.model, test_loader, device)
    checkpoint.save(result.model.cpu(), out, force=args.force, extra={"report": report})
    _write_json(report_path, report, args.force)
    acc = "" if test_loader is None else (f", accuracy {report['accuracy_before']:.2f}% -> "
                                          f"{report['accuracy_after']:.2f}%")
    print(f"{args.method} at ratio {args.ratio}: params {result.before['params']:,} -> {result.after['params']:,}, "
          f"MACs {result.before['macs']:,} -> {result.after['macs']:,}{acc}, {result.seconds:.1f}s -> {out}")
    return 0


def cmd_eval(args) -> int:
    json_path = Path(args.json_out) if args.json_out else None
    if json_path is not None and json_path.exists() and not args.force:
        raise StructPruneError(f"--json: {json_path} already exists; pass --force to overwrite it")
    device = _device(args.device)
    test_loader = _loader(args, "test", limit=args.limit)
    example = _example(args.data)
    rows = []
    for path in args.checkpoints:
        model = checkpoint.load(path).to(device)
        _check_fits(model, args, example)
        size = measure.count(model, example.to(device))
        rows.append({
            "checkpoint": str(path),
            "accuracy": measure.accuracy(model, test_loader, device),
            **size,
            "latency_ms_batch1": measure.latency(model, example.to(device)),
        })
    print(format_table(rows))
    if json_path is not None:
        _write_json(json_path, {"command": "eval", "data": args.data, "device": str(device), "rows": rows}, args.force)
    return 0


def format_table(rows: list[dict]) -> str:
    """A Markdown table of eval rows, with params and MACs relative to the first row."""
    base = rows[0]
    lines = ["| checkpoint | accuracy (%) | params | MACs | params kept | MACs kept | latency b=1 (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['checkpoint']} | {row['accuracy']:.2f} | {row['params']:,} | {row['macs']:,} | "
                     f"{row['params'] / base['params']:.1%} | {row['macs'] / base['macs']:.1%} | "
                     f"{row['latency_ms_batch1']:.3f} |")
    return "\n".join(lines)


def cmd_info(args) -> int:
    if args.checkpoint:
        model = checkpoint.load(args.checkpoint)
        example = checkpoint.example_input(model)
        if example is None:
            raise StructPruneError(f"{args.checkpoint} does not record its input shape")
        title = args.checkpoint
    else:
        model = _zoo_model(args.model, args.data)
        example = _example(args.data)
        title = f"{args.model} (fresh, {args.data} inputs)"
    graph = PruningGraph(model, example)
    groups = graph.all_groups()
    size = measure.count(model, example)
    print(f"{title}: {size['params']:,} params, {size['macs']:,} MACs, {len(groups)} prunable groups")
    print("| # | group | channels | producers | consumers |")
    print("|---:|---|---:|---|---|")
    for i, group in enumerate(groups):
        print(f"| {i} | {group.name} | {group.channels} | {', '.join(p.name for p in group.producers)} | "
              f"{', '.join(c.name for c in group.consumers)} |")
    outputs = ", ".join(graph.name_of(m) for m in graph.output_layers)
    print(f"output layers (never pruned): {outputs}")
    for name, reason in graph.skipped:
        print(f"skipped: {name}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
