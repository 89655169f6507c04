"""``structprune distill``: recover a pruned model by training it to match the dense model it was pruned from, on
data without labels (images, tensors, a dataset function, or text for a Hugging Face model)."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.data import DataLoader

from .. import checkpoint, measure, models
from ..distill import check_pair, distill
from ..errors import StructPruneError
from ..finetune import ShardedBatches, process
from . import common, distill_text, options

DESCRIPTION = ("Train a pruned checkpoint (or Hugging Face directory) to reproduce the dense model it was pruned "
               "from, the teacher: its outputs are the targets, so no labels are needed. The loss follows the "
               "output (class or token logits: KL divergence at --temperature; hidden states: cosine). The "
               "training state is saved after every epoch next to --out, and --resume continues an interrupted run.")


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the pruned checkpoint, or Hugging Face model directory (not modified)")
    p.add_argument("--teacher", default=None, metavar="PATH",
                   help="the dense model to match: a checkpoint or a Hugging Face directory (default: the one the "
                        "pruned model records it was pruned from)")
    options.add_distill(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the state saved next to --out")
    options.add_dataset(p)
    distill_text.add_options(p)
    p.add_argument("--limit", type=options.positive, default=None, help="train on the first N samples only")
    p.add_argument("--eval-limit", type=options.positive, default=None,
                   help="measure before/after on the first N held-out samples only (default: all)")
    p.add_argument("--batch-size", type=options.positive, default=128, help="batch size (default: 128)")
    options.add_common(p)
    options.add_trust(p)
    options.add_output(p)


def run(args) -> int:
    if Path(args.checkpoint).is_dir():
        return distill_text.run(args)
    out, report_path = common.check_outputs(args, args.checkpoint, args.teacher)
    state = common.run_state(args, out)
    if args.text is not None or args.max_length is not None:
        raise StructPruneError(f"{'--text' if args.text is not None else '--max-length'} goes with a Hugging Face "
                               f"model directory; a checkpoint reads --data")
    settings = options.distill_config(args)  # the options checked before any work
    device = common.training_device(args)
    student = common.model_from(args, args.checkpoint, doing=None).to(device)
    teacher_path, teacher = teacher_of(args, common.read(args.checkpoint, args))
    teacher = teacher.to(device)
    example = common.example(args).to(device)
    common.check_fits(student, args, example)
    check_pair(student, teacher, example)
    found = common.source(args)
    dataset = found.load("train", args.limit)
    held_out = found.load("test", args.eval_limit)
    labelled = found.classes is not None
    judge = _judge(teacher, held_out, labelled, args, device)
    before = judge(student)
    batches = ShardedBatches(dataset, args.batch_size, seed=args.seed)
    result = distill(student, teacher, batches, settings, device=device, progress=not args.no_progress,
                     state_path=state.path, resume=args.resume, teacher_cache=args.teacher_cache)
    if not process().is_main:
        return 0
    after = judge(student)
    metric = "accuracy" if labelled else "agreement"
    report = {"command": "distill", "checkpoint": str(args.checkpoint), "teacher": teacher_path, "data": args.data,
              "train_samples": len(dataset), "held_out_samples": len(held_out), **result.to_dict(),
              "metric": metric, f"{metric}_before": before, f"{metric}_after": after, "seed": args.seed}
    if labelled:
        report["teacher_accuracy"] = judge(teacher)
    checkpoint.save(student.cpu(), out, force=True, extra={"report": report, "data": common.data_record(args)})
    common.write_json(report_path, report, True)
    what = "accuracy" if labelled else "top-1 agreement with the teacher"
    teacher_says = f" (teacher {report['teacher_accuracy']:.2f}%)" if labelled else ""
    print(f"distilled {result.steps} steps ({result.loss} loss): {what} {before:.2f}% -> {after:.2f}%"
          f"{teacher_says} in {result.seconds:.1f}s -> {out}")
    return 0


def _judge(teacher, held_out, labelled: bool, args, device):
    """Accuracy on the held-out split when it has labels, else top-1 agreement with the teacher there."""
    loader = DataLoader(held_out, batch_size=args.batch_size)
    if labelled:
        return lambda model: measure.accuracy(model, loader, device)
    return lambda model: measure.agreement(model, teacher, loader, device)


def teacher_of(args, record: dict):
    """(what to record of the teacher, the teacher model): --teacher, else what the pruned checkpoint records of the
    model it was pruned from (a checkpoint file, or --model SPEC with its weights)."""
    if args.teacher is not None:
        return {"checkpoint": str(Path(args.teacher).resolve())}, common.load(args.teacher, args)
    report = (record.get("extra") or {}).get("report") or {}
    source = report.get("teacher") or {k: report[k] for k in ("checkpoint", "model", "model_kwargs", "weights")
                                       if k in report}
    if report.get("command") not in ("prune", "distill") or not source:
        raise StructPruneError(f"{args.checkpoint} records no model it was pruned from; give the dense model with "
                               f"--teacher PATH")
    if source.get("checkpoint"):
        path = _recorded_path(source["checkpoint"], args.checkpoint)
        return {"checkpoint": str(path)}, common.load(path, args)
    model = models.create(source["model"], **(source.get("model_kwargs") or {}))
    if source.get("weights"):
        weights = _recorded_path(source["weights"], args.checkpoint)
        models.load_weights(model, weights, trust_checkpoint=args.trust_checkpoint)
    return {"model": source["model"], "model_kwargs": source.get("model_kwargs"),
            "weights": None if not source.get("weights") else str(weights)}, model.eval()


def _recorded_path(recorded: str, pruned: str) -> Path:
    """A path a checkpoint records: as written (absolute, or from the current folder), else beside the checkpoint."""
    for path in (Path(recorded), Path(pruned).parent / recorded):
        if path.exists():
            return path.resolve()
    raise StructPruneError(f"{pruned} was pruned from {recorded}, which is not there any more; give the dense model "
                           f"with --teacher PATH")
