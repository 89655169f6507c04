"""``structprune prune --hf-model DIR``: attention heads and FFN neurons of a Hugging Face model, calibrated and
judged on held-out text by what it is (a causal language model by perplexity, any other by the cosine similarity of
its sentence embeddings to the dense model's), then optionally distilled from the dense model on the calibration
sentences (``--distill-steps``)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ..api import prune
from ..attention import PARTS, layer_sizes
from ..data import text
from ..errors import StructPruneError
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
                   help="what to prune: heads, ffn or heads,ffn (default: heads,ffn); the groups are the attention "
                        "and FFN modules, named as in the model (BERT: LAYER.attention, LAYER.intermediate; Llama: "
                        "LAYER.self_attn, LAYER.mlp; `structprune info --hf-model` lists them) for --layer-ratio")
    g.add_argument("--text", default=None, metavar="PATH",
                   help="English text for calibration and the held-out metric (perplexity for a causal language "
                        "model, else the sentence embeddings' cosine similarity): a file (one sentence per "
                        "line, or %%-separated blocks) or a directory of fortune files (default: Debian's "
                        "fortunes, /usr/share/games/fortunes); 80%% calibrates, 20%% is held out")
    g.add_argument("--max-length", type=options.positive, default=128,
                   help="tokens per sentence at most; MACs are counted for one sequence of this length (default: 128)")


def run(args) -> int:
    out, report_path = common.check_outputs(args, args.hf_model)
    device = options.device(args.device)
    budget = options.budget(args)
    method_options = options.method_options(args)
    calib_text, held_out = text.split(text.read(args.text), seed=args.seed)
    transformers = hf.transformers_module()
    transformers.utils.logging.disable_progress_bar()  # its per-file loading bars; ours shows the pruning
    model = common.hf_model(args.hf_model, args.trust_checkpoint).to(device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_model)
    except Exception as exc:
        raise StructPruneError(f"--hf-model {args.hf_model}: no usable tokenizer there ({exc})") from None
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    ignored = [n for part in PARTS if part not in args.prune for n in hf.part_names(model, part)]
    limit = common.max_positions(model)
    if args.max_length > limit:
        warnings.warn(f"--max-length {args.max_length}: the model reads at most {limit} tokens; using {limit}",
                      stacklevel=1)
        args.max_length = limit
    calib = text.TokenBatches(calib_text, tokenizer, args.batch_size, args.max_length, device)
    test = text.TokenBatches(held_out[:args.limit], tokenizer, args.batch_size, args.max_length, device)
    example = {k: v.to(device) for k, v in tokenizer(calib_text[:1], padding="max_length", truncation=True,
                                                        max_length=args.max_length, return_tensors="pt").items()}
    metric, judge = common.text_metric(model, test)
    dense = judge(model) if metric == "perplexity" else 1.0
    result = prune(model, calib, args.method, budget, example, **options.recovery(args), round_to=args.round_to,
                   calib_samples=args.calib_samples, ignored_layers=ignored + list(args.ignore), seed=args.seed,
                   stream=args.stream, progress=not args.no_progress, **method_options)
    report = {"command": "prune", "hf_model": str(args.hf_model), "teacher": str(Path(args.hf_model).resolve()),
              "prune": args.prune,
              "text": args.text or str(text.FORTUNES), "calibration_sentences": result.calib_samples,
              "held_out_sentences": len(test.texts), "max_length": args.max_length, **result.to_dict(),
              "layer_sizes": layer_sizes(result.model), "metric": metric, metric: judge(result.model)}
    if metric == "perplexity":
        report["dense_perplexity"] = dense
    distilled = ""
    if args.distill_steps:
        settings = options.distill_config(args, "distill-", args.distill_steps)
        done = distill_text.on_text(result.model, model, calib_text, tokenizer, args.max_length, args, settings,
                                    device, teacher_cache=args.distill_teacher_cache)
        report["distill"] = done.to_dict()
        report[f"{metric}_distilled"] = judge(result.model)
        distilled = f" ({report[f'{metric}_distilled']:.4f} after {done.steps} distillation steps)"
    hf.save_pretrained(result.model.cpu(), out, force=args.force, tokenizer=tokenizer, extra={"report": report})
    common.write_json(report_path, report, args.force)
    says = (f"held-out perplexity {dense:.4f} -> {report[metric]:.4f}" if metric == "perplexity" else
            f"embedding cosine similarity to the dense model {report[metric]:.4f}")
    print(f"{args.method} ({'+'.join(args.prune)}): params {result.before['params']:,} -> "
          f"{result.after['params']:,} ({report['params_ratio']:.1%}), MACs at {args.max_length} tokens "
          f"{result.before['macs']:,} -> {result.after['macs']:,} ({report['macs_ratio']:.1%}), {says}{distilled} "
          f"on {len(test.texts)} held-out sentences, pruned in {result.seconds:.1f}s -> {out}")
    return 0
