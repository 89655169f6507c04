"""``structprune prune``: prune a checkpoint (or a model by name with its weights) to a budget and save it.

Two paths with their own option sets: a checkpoint or ``--model SPEC`` (data from ``--data``, accuracy on its test
split, schedules and fine-tuning), and a Hugging Face model directory (``--hf-model DIR`` or ``--model hf:DIR``:
:mod:`structprune.cli.prune_hf`, calibration on ``--text``). An option of one path given to the other is refused
with its name, never ignored.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .. import checkpoint, measure, methods, schedule
from ..allocate import Uniform
from ..distill import distill
from ..errors import StructPruneError
from ..finetune import ShardedBatches
from . import common, options, prune_hf

log = logging.getLogger("structprune")

DESCRIPTION = ("Prune a checkpoint's prunable groups, shallow to deep, to a budget (a keep ratio, per-layer ratios, "
               "or a target fraction of MACs/params) with a data-informed or weight-only method; channels are "
               "physically removed. Optionally refit, fine-tune, and prune in steps (--schedule).")


def register(p: argparse.ArgumentParser) -> None:
    _shared(p)
    prune_hf.add_options(p)
    _checkpoint_only(p)


def _shared(p: argparse.ArgumentParser) -> None:
    """The options of both paths."""
    p.add_argument("checkpoint", nargs="?", help="checkpoint written by `structprune train` or structprune.save")
    options.add_model(p)
    p.add_argument("--method", default="ispasp", choices=methods.available(), help="pruning method (default: ispasp)")
    options.add_budget(p)
    p.add_argument("--ignore", action="append", default=[], metavar="LAYER",
                   help="layer name whose output channels are kept whole (repeatable); the output layer always is")
    options.add_batches(p, "evaluate on the first N test samples (held-out sentences with --hf-model) only")
    options.add_common(p)
    options.add_trust(p)
    options.add_output(p)
    p.add_argument("--distill-steps", type=int, default=0, metavar="N",
                   help="last stage: N optimizer steps of distillation from the dense model on the training split "
                        "(--train-limit samples; with --hf-model, the calibration sentences; no labels needed; the "
                        "--distill-* options below) (default: 0)")
    options.add_distill(p, prefix="distill-")


def _checkpoint_only(p: argparse.ArgumentParser) -> None:
    """The options of a checkpoint or --model SPEC, which a Hugging Face directory does not take."""
    options.add_model_options(p)
    p.add_argument("--schedule", default="oneshot", choices=schedule.SCHEDULES,
                   help="oneshot: one pass; sequential: fine-tune after every group (--layer-finetune-epochs); "
                        "cascade: --steps passes towards the budget, fine-tuning after each (default: oneshot)")
    p.add_argument("--steps", type=options.positive, default=3,
                   help="prune passes of the cascade schedule (default: 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted cascade after its last finished step (state saved next to --out)")
    options.add_finetune(p, "after pruning (after each step with cascade)")
    p.add_argument("--layer-finetune-epochs", type=int, default=0,
                   help="fine-tune epochs after each group (sequential schedule) (default: 0)")
    p.add_argument("--no-eval", action="store_true", help="skip test accuracy before/after")
    options.add_dataset(p)


def path_parser(hugging_face: bool) -> argparse.ArgumentParser:
    """The options one path takes: the shared ones, and the Hugging Face or the checkpoint ones."""
    parser = argparse.ArgumentParser(prog="structprune prune", add_help=False)
    _shared(parser)
    (prune_hf.add_options if hugging_face else _checkpoint_only)(parser)
    p = parser.add_argument_group()
    p.add_argument("-q", "--quiet", action="store_true")
    return parser


def run(args) -> int:
    if sum(x is not None for x in (args.checkpoint, args.hf_model, args.model)) != 1:
        raise StructPruneError("give either a checkpoint, --model SPEC or --hf-model DIR")
    if args.model is not None and args.model.startswith("hf:"):
        args.hf_model, args.model = args.model[len("hf:"):], None
    hugging_face = args.hf_model is not None
    _refuse_other_paths_options(args, hugging_face)
    if args.distill_steps < 0:
        raise StructPruneError(f"--distill-steps must be >= 0, got {args.distill_steps}")
    if args.distill_steps:
        options.distill_config(args, "distill-", args.distill_steps)  # checked before any work
    return prune_hf.run(args) if hugging_face else _run(args)


def _refuse_other_paths_options(args, hugging_face: bool) -> None:
    """A flag of the other path is an error naming it (it would otherwise be silently ignored)."""
    _, extra = path_parser(hugging_face).parse_known_args(getattr(args, "argv", []))
    flags = [token.split("=")[0] for token in extra if token.startswith("-")]
    if flags and hugging_face:
        raise StructPruneError(f"{flags[0]}: not available with --hf-model (a Hugging Face model is pruned in one "
                               f"shot, calibrated and judged on --text; its options: structprune prune --help)")
    if flags:
        raise StructPruneError(f"{flags[0]} goes with --hf-model DIR (a Hugging Face model directory), not with a "
                               f"checkpoint or --model SPEC")


def _run(args) -> int:
    """A checkpoint or --model SPEC on --data: prune with the schedule, evaluate, save the model and its report."""
    if args.model is None and (args.weights is not None or args.model_kwargs):
        raise StructPruneError("--weights and --model-kwargs go with --model SPEC")
    out, report_path = common.check_outputs(args, args.checkpoint if args.model is None else args.weights)
    source = {"checkpoint": str(args.checkpoint)} if args.model is None else {
        "model": args.model, "model_kwargs": args.model_kwargs, "weights": args.weights}
    common.use_recorded_data(args, args.checkpoint)
    state = common.run_state(args, out)
    device = options.device(args.device)
    budget = options.budget(args)
    method_options = options.method_options(args)
    for flag in ("finetune_epochs", "layer_finetune_epochs"):
        if getattr(args, flag) < 0:
            raise StructPruneError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.schedule == "sequential" and args.layer_finetune_epochs == 0:
        raise StructPruneError("--schedule sequential fine-tunes after every group: give --layer-finetune-epochs")
    model = common.model_from(args, args.checkpoint).to(device)
    example = common.example(args)
    common.check_fits(model, args, example)
    test_loader = None if args.no_eval else common.loader(args, "test", limit=args.limit)
    evaluate = None if test_loader is None else (lambda m: measure.accuracy(m, test_loader, device))
    dense_accuracy = None if evaluate is None else evaluate(model)

    def tune(epochs):
        return None if epochs == 0 else (lambda m: common.fit(m, args, epochs, device, limit=args.train_limit))

    final, steps, results = schedule.run(
        model, common.loader(args, "train"), args.method, budget, schedule=args.schedule, steps=args.steps,
        finetune=tune(args.finetune_epochs), layer_finetune=tune(args.layer_finetune_epochs), evaluate=evaluate,
        progress=not args.no_progress, example_inputs=example.to(device), **options.recovery(args),
        round_to=args.round_to, calib_samples=args.calib_samples, ignored_layers=args.ignore, seed=args.seed,
        stream=args.stream, state_path=state.path, resume=args.resume,
        state_key={"source": source, "data": args.data, "finetune_epochs": args.finetune_epochs,
                   "layer_finetune_epochs": args.layer_finetune_epochs, "train_limit": args.train_limit,
                   "train": vars(options.train_config(args, 1))},
        **method_options)
    first, last = results[0], results[-1]
    report = {"command": "prune", **source, "teacher": _teacher(source), "data": args.data, "schedule": args.schedule,
              **last.to_dict(), "before": first.before, "seconds": sum(r.seconds for r in results),
              "params_ratio": last.after["params"] / first.before["params"],
              "macs_ratio": last.after["macs"] / first.before["macs"], "steps": steps,
              "warnings": list(dict.fromkeys(w for r in results for w in r.warnings))}
    if evaluate is not None:
        report["accuracy_before"] = dense_accuracy
        report["accuracy_after"] = evaluate(final)
    if args.distill_steps:
        _distill(args, final, model, device, evaluate, report)
    checkpoint.save(final.cpu(), out, force=args.force, extra={"report": report, "data": common.data_record(args)})
    common.write_json(report_path, report, args.force)
    acc = "" if evaluate is None else (f", accuracy {report['accuracy_before']:.2f}% -> "
                                       f"{report['accuracy_after']:.2f}%")
    if "accuracy_distilled" in report:
        acc += f" ({report['accuracy_distilled']:.2f}% after {args.distill_steps} distillation steps)"
    print(f"{args.method} ({args.schedule}): params {first.before['params']:,} -> {last.after['params']:,} "
          f"({report['params_ratio']:.1%}), MACs {first.before['macs']:,} -> {last.after['macs']:,} "
          f"({report['macs_ratio']:.1%}){acc}, pruned in {report['seconds']:.1f}s -> {out}")
    if "measured_error" in last.budget:
        total = last.budget.get("predicted_error_total")
        print(f"error allocation ({last.budget.get('chosen', 'error')} kept of the candidates): network output "
              f"error {'' if total is None else f'predicted {total:.2e} (groups alone, summed), '}measured "
              f"{last.budget['measured_error']:.2e}; the width of every group: structprune info {out}")
    if isinstance(budget, Uniform):
        log.info(f"--ratio {budget.ratio:g} keeps that share of every group's channels; a layer between two pruned "
                 f"groups loses rows and columns, keeping about {budget.ratio ** 2:.0%} of its weights: "
                 f"--target-params or --target-flops set the model's own share")
    return 0


def _teacher(source: dict) -> dict:
    """The dense model a later ``structprune distill`` matches by default: the source, its paths made absolute."""
    return {k: str(Path(v).resolve()) if k in ("checkpoint", "weights") and v is not None else v
            for k, v in source.items()}


def _distill(args, pruned, dense, device, evaluate, report: dict) -> None:
    """The last stage, --distill-steps: the pruned model trained to match the dense one on the training split."""
    dataset = common.source(args).load("train", args.train_limit)
    batches = ShardedBatches(dataset, args.batch_size, seed=args.seed)
    result = distill(pruned, dense, batches, options.distill_config(args, "distill-", args.distill_steps),
                     device=device, progress=not args.no_progress, teacher_cache=args.distill_teacher_cache)
    report["distill"] = result.to_dict()
    if evaluate is not None:
        report["accuracy_distilled"] = evaluate(pruned)
