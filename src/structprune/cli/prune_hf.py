"""``structprune prune --hf-model DIR``: attention heads and FFN neurons of a Hugging Face model, calibrated and
judged on held-out text by what it is (a causal language model by perplexity, any other by the cosine similarity of
its sentence embeddings to the dense model's), then optionally distilled from the dense model on the calibration
sentences (``--distill-steps``)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from .. import measure
from ..api import prune
from ..attention import PARTS, layer_sizes
from ..batches import first_batches
from ..data import text
from ..depth import prune_depth
from ..errors import StructPruneError
from ..hidden import prune_hidden
from ..models import hf
from . import common, distill_text, options


def add_options(p: argparse.ArgumentParser) -> None:
    """The options only a Hugging Face model takes (the checkpoint path refuses them)."""
    g = p.add_argument_group("Hugging Face language models: BERT, RoBERTa, ALBERT, DistilBERT, GPT-2, Llama-style "
                             "(instead of a checkpoint; needs structprune[transformers])")
    g.add_argument("--hf-model", default=None, metavar="DIR",
                   help="a local model directory (config.json, safetensors, tokenizer); --out is then a directory "
                        "written with save_pretrained")
    g.add_argument("--prune", type=options.parts, default=list(PARTS), metavar="PARTS",
                   help="what to prune, comma-separated: heads, ffn, layers, hidden (default: heads,ffn); the groups "
                        "are the attention and FFN modules, named as in the model (BERT: LAYER.attention, "
                        "LAYER.intermediate; Llama: LAYER.self_attn, LAYER.mlp; `structprune info --hf-model` lists "
                        "them) for --layer-ratio; layers: whole transformer layers, the least block influence first; "
                        "hidden: channels of the residual stream (embeddings, norms, every projection; causal LMs of "
                        "the Llama family), the least energy in the norms' outputs first, readers refitted; in that "
                        "order, before the heads and FFN neurons of the rest")
    options.add_dtype(g)
    g.add_argument("--layers-keep", type=options.layer_count, default=None, metavar="N",
                   help="with --prune layers: the transformer layers kept, a number or a fraction of them (0.75)")
    g.add_argument("--layers-criterion", choices=("influence", "loss"), default=None,
                   help="with --prune layers: which layers go; influence: the least block influence (1 - cosine of "
                        "each layer's input and output), one pass; loss: greedily, the layer whose removal leaves the "
                        "least loss (perplexity; else the embeddings' distance to the dense model's) on the first 128 "
                        "calibration sentences, a pass per layer and dropped layer (default: influence)")
    g.add_argument("--hidden-keep", type=options.layer_count, default=None, metavar="N",
                   help="with --prune hidden: the residual stream's channels kept (hidden_size), a number or a "
                        "fraction of them (0.75); read on the first 512 calibration sentences (--calib-samples)")
    options.add_text(g, "for calibration and the held-out metric (perplexity for a causal language model, else the "
                        "sentence embeddings' cosine similarity)", "80%% calibrates, 20%% is held out")
    g.add_argument("--max-length", type=options.positive, default=128,
                   help="tokens per sentence at most; MACs are counted for one sequence of this length (default: 128)")


def run(args) -> int:
    out, report_path = common.check_outputs(args, args.hf_model, directory=True)
    if ("layers" in args.prune) != (args.layers_keep is not None):
        raise StructPruneError("--prune layers needs --layers-keep N" if args.layers_keep is None else
                               "--layers-keep goes with --prune layers (e.g. --prune layers or layers,heads,ffn)")
    if args.layers_criterion is not None and "layers" not in args.prune:
        raise StructPruneError("--layers-criterion goes with --prune layers and --layers-keep N")
    if ("hidden" in args.prune) != (args.hidden_keep is not None):
        raise StructPruneError("--prune hidden needs --hidden-keep N" if args.hidden_keep is None else
                               "--hidden-keep goes with --prune hidden (e.g. --prune hidden or hidden,heads,ffn)")
    device = options.device(args.device)
    budget, method_options = options.budget(args), options.method_options(args)  # checked before any work
    model, tokenizer, calib_text, calib, test, example = load_text_model(args, device)
    metric, judge = common.text_metric(model, test)
    dense = judge(model) if metric == "perplexity" else 1.0
    pruned, summary = _prune(args, model, calib, example, budget, method_options)
    report = {"command": "prune", "hf_model": str(args.hf_model), "teacher": str(Path(args.hf_model).resolve()),
              "prune": args.prune,
              "text": args.text or str(text.FORTUNES), "held_out_sentences": len(test.texts),
              "max_length": args.max_length, **summary,
              "layer_sizes": layer_sizes(pruned), "dtype": str(next(pruned.parameters()).dtype).split(".")[-1],
              "metric": metric, metric: judge(pruned)}
    if metric == "perplexity":
        report["dense_perplexity"] = dense
    distilled = ""
    if args.distill_steps:
        settings = options.distill_config(args, "distill-", args.distill_steps)
        done = distill_text.on_text(pruned, model, calib_text, tokenizer, args.max_length, args, settings,
                                    device, teacher_cache=args.distill_teacher_cache)
        report["distill"] = done.to_dict()
        report[f"{metric}_distilled"] = judge(pruned)
        distilled = f" ({report[f'{metric}_distilled']:.4f} after {done.steps} distillation steps)"
    report.update(common.peak_memory(device))
    hf.save_pretrained(pruned.cpu(), out, force=args.force, tokenizer=tokenizer, extra={"report": report})
    common.write_json(report_path, report, args.force)
    says = (f"held-out perplexity {dense:.4f} -> {report[metric]:.4f}" if metric == "perplexity" else
            f"embedding cosine similarity to the dense model {report[metric]:.4f}")
    depth, width = report.get("depth"), report.get("hidden")
    layers = "" if depth is None else (f"layers {depth['layers_before']} -> {depth['layers_after']} (dropped "
                                       f"{depth['dropped']}), ")
    layers += "" if width is None else f"hidden size {width['hidden_before']} -> {width['hidden_after']}, "
    before, after = report["before"], report["after"]
    print(f"{report['method']} ({'+'.join(args.prune)}): {layers}params {before['params']:,} -> "
          f"{after['params']:,} ({report['params_ratio']:.1%}), MACs at {args.max_length} tokens "
          f"{before['macs']:,} -> {after['macs']:,} ({report['macs_ratio']:.1%}), {says}{distilled} "
          f"on {len(test.texts)} held-out sentences, pruned in {report['seconds']:.1f}s -> {out}")
    return 0


def load_text_model(args, device) -> tuple:
    """--hf-model's model (in --dtype, on ``device``) and tokenizer, and --text split into calibration and held-out
    sentences: (model, tokenizer, calibration sentences, their token batches, the held-out ones' (the first --limit),
    a one-sequence example of --max-length tokens). What prune and compare read."""
    calib_text, held_out = text.split(text.read(args.text), seed=args.seed)
    transformers = hf.transformers_module()
    transformers.utils.logging.disable_progress_bar()  # its per-file loading bars; ours shows the pruning
    model = common.hf_model(args.hf_model, args.trust_checkpoint, args.dtype).to(device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_model)
    except Exception as exc:
        raise StructPruneError(f"--hf-model {args.hf_model}: no usable tokenizer there ({exc})") from None
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    limit = common.max_positions(model)
    if args.max_length > limit:
        warnings.warn(f"--max-length {args.max_length}: the model reads at most {limit} tokens; using {limit}",
                      stacklevel=1)
        args.max_length = limit
    calib = text.TokenBatches(calib_text, tokenizer, args.batch_size, args.max_length, device)
    test = text.TokenBatches(held_out[:args.limit], tokenizer, args.batch_size, args.max_length, device)
    example = {k: v.to(device) for k, v in tokenizer(calib_text[:1], padding="max_length", truncation=True,
                                                        max_length=args.max_length, return_tensors="pt").items()}
    return model, tokenizer, calib_text, calib, test, example


def _in_place(args, budget) -> bool:
    """The model is held once (pruned in place) unless something reads the dense model after the pruning starts:
    the distillation's teacher, the error allocation's candidates, a refit to the original outputs."""
    return not args.distill_steps and getattr(budget, "allocation", "uniform") != "error" and (
        args.reconstruct != "original")


#: what chose the channels of a structural stage alone (the report's "method"): depth by its criterion, width
STAGE_METHODS = {"influence": "block influence", "loss": "measured loss", "hidden": "stream energy"}

#: calibration sentences the width pruning reads (its importance and refit: two passes)
HIDDEN_SENTENCES = 512


def _prune(args, model, calib, example, budget, method_options: dict) -> tuple:
    """Layers first (``--prune layers``: block influence on the calibration sentences), then the residual stream's
    width (``--prune hidden``), then heads and FFN neurons of what is left (when --prune names them); the pruned
    model and the report's part about it."""
    stages, working = {}, model
    if "layers" in args.prune:
        stages["depth"] = prune_depth(working, calib, args.layers_keep, criterion=args.layers_criterion or "influence",
                                      progress=not args.no_progress)
        working = stages["depth"].model
    if "hidden" in args.prune:
        sentences = args.calib_samples or HIDDEN_SENTENCES
        stages["hidden"] = prune_hidden(working, first_batches(calib, sentences), args.hidden_keep,
                                        refit=args.refit, progress=not args.no_progress)
        working = stages["hidden"].model
    reports = {name: stage.to_dict() for name, stage in stages.items()}
    seconds = sum(stage.seconds for stage in stages.values())
    before = measure.count(model, example) if stages else None  # else prune's own report counts it
    if not any(part in PARTS for part in args.prune):
        after = measure.count(working, example)
        method = " + ".join(STAGE_METHODS[stage.criterion if name == "depth" else name]
                            for name, stage in stages.items())
        return working, {"method": method, "before": before, "after": after, "seconds": seconds,
                         "params_ratio": after["params"] / before["params"],
                         "macs_ratio": after["macs"] / before["macs"], **reports}
    ignored = [n for part in PARTS if part not in args.prune for n in hf.part_names(working, part)]
    result = prune(working, calib, args.method, budget, example, **options.recovery(args), round_to=args.round_to,
                   calib_samples=args.calib_samples, ignored_layers=ignored + list(args.ignore), seed=args.seed,
                   stream=args.stream, progress=not args.no_progress, in_place=_in_place(args, budget),
                   **method_options)
    summary = {**result.to_dict(), "calibration_sentences": result.calib_samples}
    if stages:
        summary.update(before=before, seconds=result.seconds + seconds, **reports,
                       params_ratio=result.after["params"] / before["params"],
                       macs_ratio=result.after["macs"] / before["macs"])
    return result.model, summary
