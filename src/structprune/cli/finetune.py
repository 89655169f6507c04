"""``structprune finetune``: fine-tune a (pruned) checkpoint on the training split, resumable."""

from __future__ import annotations

import time

from .. import checkpoint, measure
from ..errors import StructPruneError
from ..finetune import process
from . import common, options

DESCRIPTION = ("Fine-tune a checkpoint on the training split; the training state is saved after every epoch next "
               "to --out, and --resume continues an interrupted run.")


def register(p) -> None:
    p.add_argument("checkpoint", help="checkpoint to fine-tune (it is not modified)")
    options.add_training_run(p, "fine-tuning epochs", lr=0.01)
    options.add_data(p, "fine-tune on the first N training samples only")
    options.add_common(p)
    options.add_trust(p)
    options.add_output(p)


def run(args) -> int:
    out, report_path = common.check_outputs(args, args.checkpoint)
    state = common.run_state(args, out)
    if args.epochs < 1:
        raise StructPruneError(f"--epochs must be at least 1, got {args.epochs}")
    device = common.training_device(args)
    model = common.model_from(args, args.checkpoint).to(device)
    example = common.example(args)
    common.check_fits(model, args, example)
    test_loader = common.loader(args, "test")
    before = measure.accuracy(model, test_loader, device)
    start = time.perf_counter()
    losses, _ = common.fit(model, args, args.epochs, device, state.path, args.resume, limit=args.limit)
    seconds = time.perf_counter() - start
    if not process().is_main:
        return 0
    after = measure.accuracy(model, test_loader, device)
    report = {"command": "finetune", "checkpoint": str(args.checkpoint), "data": args.data, "epochs": args.epochs,
              "config": vars(options.train_config(args, args.epochs)), "losses": losses, "accuracy_before": before,
              "accuracy_after": after, "finetune_seconds": seconds, "seed": args.seed}
    checkpoint.save(model.cpu(), out, force=True, extra={"report": report, "data": common.data_record(args)})
    common.write_json(report_path, report, True)
    print(f"fine-tuned {args.epochs} epochs: accuracy {before:.2f}% -> {after:.2f}% in {seconds:.1f}s -> {out}")
    return 0
