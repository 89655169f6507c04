"""``structprune train``: train a zoo model on a dataset and save a checkpoint."""

from __future__ import annotations

import time

from .. import checkpoint, measure, models
from ..errors import StructPruneError
from ..finetune import process
from . import common, options

DESCRIPTION = "Train a model from the zoo on a dataset and save a structprune checkpoint."


def register(p) -> None:
    p.add_argument("--model", required=True, choices=models.available(), help="architecture")
    p.add_argument("--width-mult", type=float, default=None,
                   help="channel width multiplier (vgg16, resnet*, mobilenetv2)")
    options.add_training_run(p, "training epochs", lr=0.05)
    options.add_data(p, "train on the first N training samples only")
    options.add_common(p)
    options.add_output(p)


def run(args) -> int:
    out, report_path = common.check_outputs(args)
    state = common.run_state(args, out)
    if args.epochs < 1:
        raise StructPruneError(f"--epochs must be at least 1, got {args.epochs}")
    device = common.training_device(args)
    kwargs = {}
    if args.width_mult is not None:
        if not models.accepts(args.model, "width_mult"):
            raise StructPruneError(f"--width-mult: model {args.model} has no width multiplier")
        kwargs["width_mult"] = args.width_mult
    model = common.zoo_model(args.model, args, **kwargs).to(device)
    example = common.example(args)
    common.check_fits(model, args, example)
    start = time.perf_counter()
    losses, samples = common.fit(model, args, args.epochs, device, state.path, args.resume, limit=args.limit)
    seconds = time.perf_counter() - start
    if not process().is_main:
        return 0  # rank 0 evaluates, saves and reports
    accuracy = measure.accuracy(model, common.loader(args, "test"), device)
    model.structprune_example_input = {"shape": list(example.shape), "dtype": "float32"}
    size = measure.count(model.cpu(), example)
    report = {"command": "train", "model": args.model, "arch": model.structprune_arch, "data": args.data,
              "epochs": args.epochs, "train_samples": samples, "losses": losses,
              "test_accuracy": accuracy, **size, "train_seconds": seconds, "seed": args.seed}
    checkpoint.save(model, out, force=True, extra={"report": report, "data": common.data_record(args)})
    common.write_json(report_path, report, True)
    print(f"{args.model} on {args.data}: test accuracy {accuracy:.2f}%, {size['params']:,} params, "
          f"{size['macs']:,} MACs, trained in {seconds:.1f}s -> {out}")
    return 0
