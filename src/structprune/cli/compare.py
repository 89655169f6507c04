"""``structprune compare``: several methods at several targets on one checkpoint, the same calibration data for
all; a table, JSON, a plot and a self-contained HTML page. Resumable: every finished run is kept."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from .. import allocate, measure, report
from ..api import prune
from ..distill import DistillConfig, distill
from ..errors import StructPruneError
from ..finetune import ShardedBatches
from ..run_state import RunState
from ..safe_io import check_output, write_atomic
from . import common, options

log = logging.getLogger("structprune")

DESCRIPTION = ("Prune one checkpoint with several methods to several targets (fractions of the dense MACs or "
               "params), on the same calibration data; report accuracy before and after an optional fine-tune (and "
               "distillation) and the pruning time, as Markdown, JSON and a plot.")


def register(p) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint to prune (or --model SPEC with --weights)")
    options.add_model(p)
    options.add_model_options(p)
    p.add_argument("--methods", type=options.method_names, default=["ispasp", "pfp", "magnitude"],
                   help="comma-separated methods (default: ispasp,pfp,magnitude)")
    p.add_argument("--targets", type=options.fractions, default=[0.7, 0.5, 0.3],
                   help="comma-separated fractions of the dense MACs (or params) to keep (default: 0.7,0.5,0.3)")
    p.add_argument("--metric", default="flops", choices=sorted(allocate.METRICS),
                   help="what --targets measure (default: flops, i.e. MACs)")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "pfp", "error"],
                   help="how the target is split among groups: one ratio, PFP's δ rule, or by measured network error "
                        "(see structprune prune --help; default: uniform)")
    options.add_measured_widths(p)
    p.add_argument("--calib-samples", type=options.positive, default=None,
                   help="calibration samples every method selects on (default: each method's own)")
    options.add_recovery(p)
    options.add_finetune(p, "of each pruned model")
    p.add_argument("--distill-steps", type=int, default=0, metavar="N",
                   help="also distil each pruned model from the dense one for N optimizer steps on the training "
                        "split (--train-limit samples, no labels needed; the --distill-* options), a column of its "
                        "own (default: 0)")
    options.add_distill(p, prefix="distill-")
    p.add_argument("--out-dir", required=True,
                   help="directory for compare.md, compare.json, compare.png and compare.html (one self-contained "
                        "page: table and plot)")
    p.add_argument("--force", action="store_true", help="overwrite the outputs in --out-dir if they exist")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted compare: keep the runs it finished (saved after every run) and do "
                        "only the missing ones; the options must be the same")
    options.add_data(p, "evaluate on the first N test samples only")
    options.add_common(p)
    options.add_trust(p)


def run(args) -> int:
    out_dir = Path(args.out_dir)
    outputs = [out_dir / f"compare.{ext}" for ext in ("md", "json", "png", "html")]
    if outputs[1].exists() and not (args.force or args.resume):
        raise StructPruneError(f"--out-dir: {outputs[1]} already exists; pass --resume to continue an interrupted "
                               f"compare, or --force to start over")
    for path in outputs:
        common.refuse_input(path, [args.checkpoint, args.weights])
        check_output(path, args.force or args.resume, what="--out-dir:")
    if args.measured_widths is not None and args.allocation != "error":
        raise StructPruneError("--measured-widths goes with --allocation error")
    for flag in ("finetune_epochs", "distill_steps"):
        if getattr(args, flag) < 0:
            raise StructPruneError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    distilling = options.distill_config(args, "distill-", args.distill_steps) if args.distill_steps else None
    device = options.device(args.device)
    common.use_recorded_data(args, args.checkpoint)
    model = common.model_from(args, args.checkpoint).to(device)
    common.source(args)  # --data as given, or as the checkpoint records it
    source = {"checkpoint": str(args.checkpoint)} if args.checkpoint is not None else {
        "model": args.model, "model_kwargs": args.model_kwargs, "weights": args.weights}
    settings = {**source, "data": args.data, "limit": args.limit, "metric": args.metric,
                "allocation": args.allocation, "measured_widths": args.measured_widths, **options.recovery(args),
                "calib_samples": args.calib_samples,
                "finetune_epochs": args.finetune_epochs, "train_limit": args.train_limit, "seed": args.seed,
                "train": vars(options.train_config(args, max(args.finetune_epochs, 1))),
                "distill": None if distilling is None else vars(distilling)}
    state = RunState(out_dir / "compare.state", settings)
    state.refuse_unless(args.resume, args.force)
    args.state_file = state.path
    saved = state.load() if args.resume else None
    rows = saved[0]["rows"] if saved is not None else []
    example = common.example(args)
    common.check_fits(model, args, example)
    test_loader = common.loader(args, "test", limit=args.limit)
    dense_accuracy = measure.accuracy(model, test_loader, device)
    payload = {"command": "compare", **settings, "dense_accuracy": dense_accuracy, "device": str(device),
               "complete": False, "rows": rows}
    done = {(r["method"], r["target"]) for r in rows}
    calib = common.loader(args, "train")  # the same samples, in the same order, for every method
    for method in args.methods:
        for target in args.targets:
            if (method, target) not in done:
                rows.append(_row(args, model, calib, test_loader, example.to(device), device, method, target,
                                 distilling))
                state.save({"rows": rows})  # every finished run is kept: Ctrl-C loses only the current one
                common.write_json(outputs[1], payload, True)
    order = {(m, t): i for i, (m, t) in enumerate((m, t) for m in args.methods for t in args.targets)}
    rows.sort(key=lambda r: order.get((r["method"], r["target"]), len(order)))
    payload["complete"] = True
    name = Path(args.checkpoint).name if args.checkpoint is not None else args.model
    _write_outputs(outputs, rows, dense_accuracy, f"{name} on {args.data}", payload, settings,
                   "macs_ratio" if args.metric == "flops" else "params_ratio")
    state.clear()
    return 0


def _row(args, model, calib, test_loader, example, device, method: str, target: float,
         distilling: DistillConfig | None) -> dict:
    """One method at one target: prune (and fine-tune, and distil a copy of the pruned model), measure."""
    budget = allocate.Target(target, args.metric, args.allocation, measured_widths=args.measured_widths)
    result = prune(model, calib, method, budget, example_inputs=example, **options.recovery(args),
                   calib_samples=args.calib_samples, seed=args.seed, progress=not args.no_progress)
    row = {"method": method, "target": target, "metric": args.metric, "allocation": args.allocation,
           "params": result.after["params"], "macs": result.after["macs"],
           "params_ratio": result.after["params"] / result.before["params"],
           "macs_ratio": result.after["macs"] / result.before["macs"],
           "prune_seconds": result.seconds, "calib_samples": result.calib_samples,
           "accuracy_pruned": measure.accuracy(result.model, test_loader, device),
           "warnings": result.warnings}
    if distilling is not None:
        student = copy.deepcopy(result.model)
        batches = ShardedBatches(common.source(args).load("train", args.train_limit), args.batch_size,
                                 seed=args.seed)
        row["distill_seconds"] = distill(student, model, batches, distilling, device=device,
                                         progress=not args.no_progress,
                                         teacher_cache=args.distill_teacher_cache).seconds
        row["accuracy_distilled"] = measure.accuracy(student, test_loader, device)
    if args.finetune_epochs:
        start = time.perf_counter()
        common.fit(result.model, args, args.finetune_epochs, device, limit=args.train_limit)
        row["finetune_seconds"] = time.perf_counter() - start
        row["accuracy_finetuned"] = measure.accuracy(result.model, test_loader, device)
    log.info(f"{method} at {args.metric} {target}: accuracy {row['accuracy_pruned']:.2f}%"
             + (f" -> {row['accuracy_finetuned']:.2f}% fine-tuned" if "accuracy_finetuned" in row else "")
             + (f", {row['accuracy_distilled']:.2f}% distilled" if "accuracy_distilled" in row else "")
             + f", pruned in {result.seconds:.1f}s")
    return row


def _write_outputs(outputs: list[Path], rows: list[dict], dense_accuracy: float, title: str, payload: dict,
                   settings: dict, x: str) -> None:
    """compare.md, compare.json, compare.png and compare.html; the table printed."""
    table = report.compare_table(rows, dense_accuracy)
    print(table)
    common.write_json(outputs[1], payload, True)
    write_atomic(outputs[0], lambda tmp: Path(tmp).write_text(f"# {title}\n\n{table}\n"), force=True)
    write_atomic(outputs[2], lambda tmp: report.plot_compare(rows, tmp, title, dense_accuracy, x=x), force=True)
    page = report.compare_html(rows, dense_accuracy, title, outputs[2].read_bytes(), settings)
    write_atomic(outputs[3], lambda tmp: Path(tmp).write_text(page), force=True)
    print(f"-> {', '.join(map(str, outputs))}")
