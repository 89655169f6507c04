"""``structprune compare``: several methods at several targets on one checkpoint (or a Hugging Face model directory,
judged on held-out text by perplexity or embedding cosine similarity), the same calibration data for all; a table,
JSON, a plot and a self-contained HTML page. Resumable: every finished run is kept."""

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
from . import common, distill_text, options, prune_hf

log = logging.getLogger("structprune")

DESCRIPTION = ("Prune one checkpoint (or --hf-model DIR) with several methods to several targets (fractions of the "
               "dense MACs or params), on the same calibration data; report accuracy (a Hugging Face model: held-out "
               "perplexity or embedding cosine similarity) before and after an optional fine-tune (and distillation) "
               "and the pruning time, as Markdown, JSON and a plot.")


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
    options.add_data(p, "evaluate on the first N test samples (held-out sentences with --hf-model) only")
    options.add_common(p)
    options.add_trust(p)
    g = p.add_argument_group("Hugging Face language models (instead of a checkpoint; heads and FFN neurons)")
    g.add_argument("--hf-model", default=None, metavar="DIR", help="a local model directory (config.json, "
                                                                   "safetensors, tokenizer)")
    options.add_dtype(g)
    options.add_text(g, "for calibration, the held-out metric (perplexity for a causal language model, else the "
                        "sentence embeddings' cosine similarity) and --distill-steps", "80%% calibrates, 20%% is "
                     "held out")
    g.add_argument("--max-length", type=options.positive, default=128,
                   help="tokens per sentence at most; MACs are counted for one sequence of this length (default: 128)")


def run(args) -> int:
    out_dir = Path(args.out_dir)
    outputs = [out_dir / f"compare.{ext}" for ext in ("md", "json", "png", "html")]
    if outputs[1].exists() and not (args.force or args.resume):
        raise StructPruneError(f"--out-dir: {outputs[1]} already exists; pass --resume to continue an interrupted "
                               f"compare, or --force to start over")
    for path in outputs:
        common.refuse_input(path, [args.checkpoint, args.weights, args.hf_model])
        check_output(path, args.force or args.resume, what="--out-dir:")
    if args.hf_model is not None:
        if args.checkpoint is not None or args.model is not None:
            raise StructPruneError("give either a checkpoint, --model SPEC or --hf-model DIR")
        if args.finetune_epochs:
            raise StructPruneError("--finetune-epochs: labelled fine-tuning is for classifiers; a Hugging Face model "
                                   "trains with --distill-steps N (on the calibration sentences, no labels)")
    options.measured_widths(args)
    for flag in ("finetune_epochs", "distill_steps"):
        if getattr(args, flag) < 0:
            raise StructPruneError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    distilling = options.distill_config(args, "distill-", args.distill_steps) if args.distill_steps else None
    device = options.device(args.device)
    subject = _text_subject(args, device) if args.hf_model is not None else _subject(args, device)
    settings = {**subject["source"], "data": args.data, "limit": args.limit, "metric": args.metric,
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
    metric, dense_value = subject["metric"], subject["dense"]()  # after the checks: an evaluation pass
    payload = {"command": "compare", **settings, "metric_name": metric, f"dense_{metric}": dense_value,
               "device": str(device), "complete": False, "rows": rows}
    done = {(r["method"], r["target"]) for r in rows}
    for method in args.methods:
        for target in args.targets:
            if (method, target) not in done:
                rows.append(_row(args, subject, device, method, target, distilling))
                state.save({"rows": rows})  # every finished run is kept: Ctrl-C loses only the current one
                common.write_json(outputs[1], payload, True)
    order = {(m, t): i for i, (m, t) in enumerate((m, t) for m in args.methods for t in args.targets)}
    rows.sort(key=lambda r: order.get((r["method"], r["target"]), len(order)))
    payload["complete"] = True
    _write_outputs(outputs, rows, dense_value, subject["title"], payload, settings,
                   "macs_ratio" if args.metric == "flops" else "params_ratio", metric)
    state.clear()
    return 0


def _subject(args, device) -> dict:
    """A checkpoint or --model SPEC on --data: the model, its calibration batches (the same samples, in the same
    order, for every method), an example input, test accuracy, and how a pruned copy is distilled."""
    common.use_recorded_data(args, args.checkpoint)
    model = common.model_from(args, args.checkpoint).to(device)
    common.source(args)  # --data as given, or as the checkpoint records it
    example = common.example(args)
    common.check_fits(model, args, example)
    test_loader = common.loader(args, "test", limit=args.limit)

    def evaluate(m):
        return measure.accuracy(m, test_loader, device)

    def train_student(student, settings: DistillConfig) -> float:
        batches = ShardedBatches(common.source(args).load("train", args.train_limit), args.batch_size, seed=args.seed)
        return distill(student, model, batches, settings, device=device, progress=not args.no_progress,
                       teacher_cache=args.distill_teacher_cache).seconds

    name = Path(args.checkpoint).name if args.checkpoint is not None else args.model
    return {"model": model, "calib": common.loader(args, "train"), "example": example.to(device),
            "metric": "accuracy", "evaluate": evaluate, "dense": lambda: evaluate(model), "distil": train_student,
            "title": f"{name} on {args.data}",
            "source": {"checkpoint": str(args.checkpoint)} if args.checkpoint is not None else {
                "model": args.model, "model_kwargs": args.model_kwargs, "weights": args.weights}}


def _text_subject(args, device) -> dict:
    """--hf-model DIR on --text: the same, judged by held-out perplexity (a causal language model) or the sentence
    embeddings' cosine similarity to the dense model's, distilled on the calibration sentences."""
    model, tokenizer, calib_text, calib, test, example = prune_hf.load_text_model(args, device)
    metric, judge = common.text_metric(model, test)

    def train_student(student, settings: DistillConfig) -> float:
        return distill_text.on_text(student, model, calib_text, tokenizer, args.max_length, args, settings, device,
                                    teacher_cache=args.distill_teacher_cache).seconds

    return {"model": model, "calib": calib, "example": example, "metric": metric, "evaluate": judge,
            "dense": lambda: judge(model) if metric == "perplexity" else 1.0, "distil": train_student,
            "title": f"{Path(args.hf_model).name} on {Path(args.text).name if args.text else 'fortunes'}",
            "source": {"hf_model": str(args.hf_model), "text": args.text, "max_length": args.max_length,
                       "dtype": args.dtype}}


def _row(args, subject: dict, device, method: str, target: float, distilling: DistillConfig | None) -> dict:
    """One method at one target: prune (and fine-tune, and distil a copy of the pruned model), measure."""
    metric, evaluate, model = subject["metric"], subject["evaluate"], subject["model"]
    budget = allocate.Target(target, args.metric, args.allocation, measured_widths=args.measured_widths)
    result = prune(model, subject["calib"], method, budget, example_inputs=subject["example"],
                   **options.recovery(args), calib_samples=args.calib_samples, seed=args.seed,
                   progress=not args.no_progress)
    row = {"method": method, "target": target, "metric": args.metric, "allocation": args.allocation,
           "params": result.after["params"], "macs": result.after["macs"],
           "params_ratio": result.after["params"] / result.before["params"],
           "macs_ratio": result.after["macs"] / result.before["macs"],
           "prune_seconds": result.seconds, "calib_samples": result.calib_samples,
           f"{metric}_pruned": evaluate(result.model), "warnings": result.warnings}
    if result.budget.get("chosen"):
        row["allocation_chosen"] = result.budget["chosen"]
    if distilling is not None:
        student = copy.deepcopy(result.model)
        row["distill_seconds"] = subject["distil"](student, distilling)
        row[f"{metric}_distilled"] = evaluate(student)
    if args.finetune_epochs:
        start = time.perf_counter()
        common.fit(result.model, args, args.finetune_epochs, device, limit=args.train_limit)
        row["finetune_seconds"] = time.perf_counter() - start
        row[f"{metric}_finetuned"] = evaluate(result.model)
    unit = "%" if metric == "accuracy" else ""
    log.info(f"{method} at {args.metric} {target}: {metric} {row[f'{metric}_pruned']:.4g}{unit}"
             + (f" -> {row[f'{metric}_finetuned']:.4g}{unit} fine-tuned" if f"{metric}_finetuned" in row else "")
             + (f", {row[f'{metric}_distilled']:.4g}{unit} distilled" if f"{metric}_distilled" in row else "")
             + f", pruned in {result.seconds:.1f}s")
    return row


def _write_outputs(outputs: list[Path], rows: list[dict], dense_value: float, title: str, payload: dict,
                   settings: dict, x: str, metric: str) -> None:
    """compare.md, compare.json, compare.png and compare.html; the table printed."""
    table = report.compare_table(rows, dense_value, metric)
    print(table)
    common.write_json(outputs[1], payload, True)
    write_atomic(outputs[0], lambda tmp: Path(tmp).write_text(f"# {title}\n\n{table}\n"), force=True)
    write_atomic(outputs[2], lambda tmp: report.plot_compare(rows, tmp, title, dense_value, x=x, metric=metric),
                 force=True)
    page = report.compare_html(rows, dense_value, title, outputs[2].read_bytes(), settings, metric)
    write_atomic(outputs[3], lambda tmp: Path(tmp).write_text(page), force=True)
    print(f"-> {', '.join(map(str, outputs))}")
