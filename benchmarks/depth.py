"""Depth pruning by block influence vs dropping the last layers or random ones (issue 35, item 3).

The byte-level Llama-style decoder that ``distill.py --part decoder`` trains on Debian's fortunes (cached in
runs/distill/decoder; trained here the same way if absent): each of its layers removed alone (the true cost of
each, beside its block influence on 256 calibration sentences), then 25% and 50% of the layers dropped by block
influence (``structprune.prune_depth``), the last ones, and random ones (every choice of that many layers: the
mean, best and worst); held-out perplexity, no training.

    cd benchmarks && ../.venv/bin/python depth.py --out-dir results
"""

from __future__ import annotations

import argparse
import copy
import itertools
from pathlib import Path

from distill import byte_batch, trained_decoder
from results_io import write_table

import structprune
from structprune import depth, measure
from structprune.data import text

HERE = Path(__file__).resolve().parent


def decoder():
    train_text, held_out = text.split(text.read(), seed=0)
    return trained_decoder(train_text)[0], train_text, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write depth.json/.md here")
    args = parser.parse_args()
    model, train_text, held_out = decoder()
    calib = [byte_batch(train_text[i:i + 32]) for i in range(0, 256, 32)]
    test = [byte_batch(held_out[i:i + 64]) for i in range(0, len(held_out), 64)]
    layers = len(model.model.layers)
    dense = measure.perplexity(model, test)
    influence = depth.block_influence(model, calib, progress=False)
    rows = [{"drop": [], "criterion": "dense", "perplexity": dense}]

    def without(drop, criterion):
        pruned = copy.deepcopy(model)
        depth.drop_layers(pruned, drop)
        row = {"drop": list(drop), "criterion": criterion, "perplexity": measure.perplexity(pruned, test)}
        print(row, flush=True)
        return row

    single = [without([i], "each layer alone") for i in range(layers)]
    rows += single
    for share in (0.25, 0.5):
        count = round(share * layers)
        chosen = structprune.prune_depth(model, calib, layers - count, progress=False)
        rows.append({**without(chosen.dropped, "block influence"), "seconds": chosen.seconds})
        rows.append(without(list(range(layers - count, layers)), "last"))
        every = [without(list(c), "random (every choice)") for c in itertools.combinations(range(layers), count)]
        rows += every
    table = [f"Dense perplexity {dense:.3f}; block influence of layers 0–{layers - 1}: "
             + ", ".join(f"{b:.4f}" for b in influence), "",
             "| layers dropped | criterion | perplexity | × dense |", "|---|---|---:|---:|"]
    for row in rows[1:]:
        table.append(f"| {row['drop']} | {row['criterion']} | {row['perplexity']:.3f} | "
                     f"{row['perplexity'] / dense:.3f} |")
    for share in (0.25, 0.5):
        count = round(share * layers)
        randoms = [r["perplexity"] for r in rows if r["criterion"].startswith("random") and len(r["drop"]) == count]
        table.append(f"| {count} of {layers}: random choices | mean / best / worst | {sum(randoms) / len(randoms):.3f}"
                     f" / {min(randoms):.3f} / {max(randoms):.3f} | |")
    write_table(args.out_dir, "depth", "Depth pruning of the trained byte-level decoder (issue 35, item 3)",
                "cd benchmarks && ../.venv/bin/python depth.py --out-dir results",
                [{**r, "influence": influence} for r in rows], table)


if __name__ == "__main__":
    main()
