"""i-SpaSP's three proxies where the choice can matter: small keep ratios, and LeNet/MLP groups.

``proxy="paper"`` is the released code (signed gradient, threshold by aggregate activation),
``"contribution"`` the default (correlation of each channel's output contribution with the residual,
threshold by the contribution's norm), ``"cosamp"`` CoSaMP's own form (threshold by the least-squares
estimate on the merged support, which the selection returns as the consumer's weights). Each is run as
the bare selection (``refit=False, recalibrate=False``) and with the default pipeline (least-squares
refit and BatchNorm recalibration), on the Fashion-MNIST checkpoints in ``benchmarks/checkpoints``,
the first 2,048 training images as calibration and the full 10,000-image test set, no fine-tune.

    python benchmarks/ispasp_proxies.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import platform
import warnings
from datetime import date
from pathlib import Path

import torch
from results_io import write_results
from torch.utils.data import DataLoader

import structprune
from structprune import data

HERE = Path(__file__).resolve().parent
MODELS = {  # name: (checkpoint, budgets: keep ratios of every group, or MACs targets)
    "lenet300": ("lenet300-fmnist.pt", [0.5, 0.25, 0.1]),
    "lenet5": ("lenet5-fmnist.pt", [0.5, 0.25, 0.1]),
    "resnet20": ("resnet20-fmnist.pt", [structprune.Target(0.5), structprune.Target(0.3)]),
}
PROXIES = ("paper", "contribution", "cosamp")
PIPELINES = {"bare": {"refit": False, "recalibrate": False}, "default": {}}
CALIB_SAMPLES = 2048


def _budget_label(budget) -> str:
    return f"{budget.fraction:.0%} MACs" if isinstance(budget, structprune.Target) else f"{budget:.0%} channels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="directory for ispasp_proxies.json and .md")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all)")
    args = parser.parse_args()
    train = data.load("fashion-mnist", "train")
    x, y = train.tensors
    calib = [(x[i:i + 128], y[i:i + 128]) for i in range(0, CALIB_SAMPLES, 128)]
    test = DataLoader(data.load("fashion-mnist", "test"), batch_size=500)
    rows = []
    for name in args.models.split(","):
        checkpoint, budgets = MODELS[name]
        dense = structprune.load(HERE / "checkpoints" / checkpoint).eval()
        size = structprune.measure.count(dense, x[:1])
        dense_accuracy = structprune.measure.accuracy(dense, test)
        print(f"{name}: dense {dense_accuracy:.2f}%", flush=True)
        for budget in budgets:
            for proxy in PROXIES:
                for pipeline, options in PIPELINES.items():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        result = structprune.prune(dense, calib, "ispasp", budget, example_inputs=x[:1],
                                                   progress=False, proxy=proxy, **options)
                    row = {"model": name, "dense_accuracy": dense_accuracy, "budget": _budget_label(budget),
                           "proxy": proxy, "pipeline": pipeline, "seconds": result.seconds,
                           "macs_ratio": structprune.measure.count(result.model, x[:1])["macs"] / size["macs"],
                           "accuracy": structprune.measure.accuracy(result.model, test)}
                    rows.append(row)
                    print(f"  {row['budget']} {proxy} {pipeline}: {row['accuracy']:.2f}% "
                          f"(MACs {row['macs_ratio']:.1%}), {row['seconds']:.1f} s", flush=True)
    command = "python benchmarks/ispasp_proxies.py --out-dir benchmarks/results"
    payload = {"meta": {"date": date.today().isoformat(), "command": command, "calib_samples": CALIB_SAMPLES,
                        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                        "torch": torch.__version__}, "rows": rows}
    text = table(payload)
    print(text)
    write_results(args.out_dir, "ispasp_proxies", payload, text)


def table(payload: dict) -> str:
    meta = payload["meta"]
    lines = [f"{meta['date']}, {meta['machine']}, torch {meta['torch']}; `{meta['command']}`", "",
             f"Calibration: the first {meta['calib_samples']:,} training images; full test set; no fine-tune. "
             "Cells: test accuracy (%) of the bare selection / with the default pipeline (refit + BN recalibration).",
             "", "| model | budget | dense | " + " | ".join(f"proxy={p}" for p in PROXIES) + " |",
             "|---|---|---:|" + "---:|" * len(PROXIES)]
    rows = payload["rows"]
    for model, budget in dict.fromkeys((r["model"], r["budget"]) for r in rows):
        mine = {(r["proxy"], r["pipeline"]): r for r in rows if r["model"] == model and r["budget"] == budget}
        dense = next(iter(mine.values()))["dense_accuracy"]
        cells = [f"{mine[(p, 'bare')]['accuracy']:.2f} / {mine[(p, 'default')]['accuracy']:.2f}" for p in PROXIES]
        lines.append(f"| {model} | {budget} | {dense:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
