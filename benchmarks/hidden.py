"""Width (hidden-size) pruning of a decoder LM (issue 35, item 2): the residual stream's channels removed.

The byte-level Llama-style decoder that ``distill.py --part decoder`` trains on Debian's fortunes (cached in
runs/distill/decoder; trained the same way if absent), its hidden size cut to 75% and 50% by
``structprune.hidden.prune_hidden`` on 512 calibration sentences: the channels of most energy in the norms' outputs
(Minitron's importance), with and without the least-squares refit of the layers that read the stream; held-out
perplexity (every held-out sentence), params, no training. The issue's target: ≤ 1.15 × dense at 75% of the width.

    cd benchmarks && ../.venv/bin/python hidden.py --out-dir results
"""

from __future__ import annotations

import argparse
import time

from distill import decoder_benchmark
from results_io import write_table

from structprune import measure
from structprune.hidden import prune_hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write hidden.json/.md here")
    parser.add_argument("--keeps", default="0.75,0.5", help="fractions of the hidden size kept")
    args = parser.parse_args()
    case = decoder_benchmark(512)
    model, calib, test, dense, params = (case[k] for k in ("model", "calib", "test", "dense", "params"))
    rows = [{"keep": 1.0, "hidden": model.config.hidden_size, "refit": None, "perplexity": dense, "params": params,
             "seconds": 0.0}]
    print(f"dense: perplexity {dense:.3f}, {params:,} params", flush=True)
    for keep in (float(k) for k in args.keeps.split(",")):
        for refit in (False, True):
            start = time.perf_counter()
            result = prune_hidden(model, calib, keep, refit=refit, progress=False)
            rows.append({"keep": keep, "hidden": result.model.config.hidden_size, "refit": refit,
                         "perplexity": measure.perplexity(result.model, test),
                         "params": sum(p.numel() for p in result.model.parameters()),
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    table = ["| hidden size | readers refitted | perplexity | × dense | params | seconds |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        refit = "–" if row["refit"] is None else ("yes" if row["refit"] else "no")
        table.append(f"| {row['hidden']} ({row['keep']:.0%}) | {refit} | {row['perplexity']:.3f} | "
                     f"{row['perplexity'] / dense:.3f} | {row['params']:,} | {row['seconds']:.0f} |")
    write_table(args.out_dir, "hidden", "Width pruning of the byte-level decoder (issue 35)",
                f"cd benchmarks && ../.venv/bin/python hidden.py --out-dir results --keeps {args.keeps}", rows, table)


if __name__ == "__main__":
    main()
