"""The ``structprune`` command: train, finetune, prune, compare, eval, info, convert, export.

Every command validates its input first and fails with one line naming the argument (exit code 2);
outputs are written to a temporary file and renamed, and existing outputs are kept unless --force.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import __version__, allocate, checkpoint, data, exporter, measure, methods, models, progress, report, schedule
from .api import RECALIBRATION_SAMPLES, RECONSTRUCT, RECOVERY_SAMPLES, SCOPES, prune
from .errors import StructPruneError, first_line, strip_ansi
from .finetune import ShardedBatches, TrainConfig, cuda_device_for, init_distributed, process, train
from .graph import build_graph

log = logging.getLogger("structprune")


def _fraction_of(what: str):
    """An argparse type: a number in (0, 1], the fraction of ``what`` kept (named in the error)."""
    def fraction(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"must be in (0, 1] (the fraction of {what} kept), got {value}")
        return value
    return fraction


_ratio = _fraction_of("channels")
_metric_fraction = _fraction_of("the dense model's --metric")  # compare --targets


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _round_to(text: str) -> int | str | None:
    if text == "auto":
        return text
    if text == "none":
        return None
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, auto or none, got {text!r}") from None


def _fractions(text: str) -> list[float]:
    try:
        return [_metric_fraction(part) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in (0, 1]: {exc}") from None


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in methods.available()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(methods.available())}")
    return names


def _layer_ratio(text: str) -> tuple[str, float]:
    pattern, sep, raw = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"must look like PATTERN=RATIO (e.g. 'layer3.*=0.25'), got {text!r}")
    return pattern, _ratio(raw)


def _option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must look like KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.replace("-", "_"), value


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StructPruneError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise StructPruneError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None


def _add_data_args(p: argparse.ArgumentParser, limit_help: str) -> None:
    p.add_argument("--data", default="fashion-mnist", metavar="DATA",
                   help="dataset: fashion-mnist (default, from Debian's dataset-fashion-mnist), digits, synthetic; "
                        "imagefolder:DIR (a sub-folder per class; DIR/train and DIR/test or DIR/val as the splits "
                        "when they exist, else a seeded 80/20 split), a .npz/.npy/.pt file of tensors (x and y, or "
                        "x_train, y_train, x_test, y_test), or module:function returning a Dataset")
    p.add_argument("--data-dir", default=None,
                   help=f"directory with the dataset files (default for fashion-mnist: "
                        f"{data.fashion_mnist.DEFAULT_ROOT})")
    _add_image_args(p)
    p.add_argument("--limit", type=_positive, default=None, help=limit_help)
    p.add_argument("--batch-size", type=_positive, default=128, help="batch size (default: 128)")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=_positive, default=None, metavar="N",
                   help="with --data imagefolder:DIR: images are resized to N×N (default: 224)")
    p.add_argument("--mean", type=_floats, default=None, metavar="R,G,B",
                   help="with --data imagefolder:DIR: per-channel mean subtracted (default: ImageNet's, "
                        "0.485,0.456,0.406)")
    p.add_argument("--std", type=_floats, default=None, metavar="R,G,B",
                   help="with --data imagefolder:DIR: per-channel std divided by (default: ImageNet's, "
                        "0.229,0.224,0.225)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None


def _add_model_spec(p: argparse.ArgumentParser, group) -> None:
    group.add_argument("--model", default=None, metavar="SPEC",
                       help="a model instead of a checkpoint: a zoo name, torchvision:NAME, timm:NAME (optional "
                            "extras), hf:DIR (a Hugging Face model directory) or package.module:Name (your class or "
                            "factory)")
    p.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="keyword options of --model, a JSON object (e.g. '{\"num_classes\": 10}')")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="trained weights for --model: a state dict in .safetensors, or a torch file of tensors "
                        "(a training checkpoint's 'state_dict' is taken from it)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N] (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same result (default: 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide progress (a bar on a terminal; elsewhere a log line every 5 s, "
                        "STRUCTPRUNE_PROGRESS_INTERVAL)")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the result, warnings and errors (no progress, no status lines)")


def _add_training_run_args(p: argparse.ArgumentParser, what: str, lr: float) -> None:
    """train and finetune: --epochs, --resume and the optimiser's options."""
    p.add_argument("--epochs", type=int, default=3, help=f"{what} (default: 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the training state saved next to --out")
    _add_train_args(p, lr)


def _add_finetune_args(p: argparse.ArgumentParser, when: str) -> None:
    """prune and compare: an optional fine-tune of the pruned model, on part of the training split."""
    p.add_argument("--finetune-epochs", type=int, default=0, help=f"fine-tune epochs {when} (default: 0)")
    p.add_argument("--train-limit", type=_positive, default=None,
                   help="fine-tune on the first N training samples only (default: all)")
    _add_train_args(p, lr=0.01)


def _add_train_args(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr})")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay on conv/linear weights, none on biases and norms (default: 5e-4)")
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "step"],
                   help="cosine, or step (×0.1 at 50%% and 75%% of the run) (default: cosine)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up (default: 0)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default: 0)")


def _train_config(args, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                       schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs,
                       label_smoothing=args.label_smoothing)


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget (one of --ratio/--layer-ratio, --target-flops, --target-params, "
                             "--target-latency)")
    g.add_argument("--ratio", type=_ratio, default=None,
                   help="fraction of each group's channels to keep, in (0, 1] (default: 0.5); with --layer-ratio, "
                        "the ratio of groups no pattern matches (default there: 1)")
    g.add_argument("--layer-ratio", type=_layer_ratio, action="append", default=[], metavar="PATTERN=RATIO",
                   help="keep ratio of the groups whose name (or a producer's) matches PATTERN (fnmatch, "
                        "first match wins), repeatable; see `structprune info` for the group names")
    g.add_argument("--target-flops", type=_fraction_of("the dense MACs"), default=None,
                   help="keep this fraction of the dense model's MACs, met on the real pruned model")
    g.add_argument("--target-params", type=_fraction_of("the dense parameters"), default=None,
                   help="keep this fraction of the dense model's parameters")
    g.add_argument("--target-latency", type=_fraction_of("the dense forward time"), default=None,
                   help="keep this fraction of the dense model's forward time, measured on this machine and "
                        "--device at --latency-batch samples (within 5%%: timing noise)")
    g.add_argument("--latency-batch", type=_positive, default=64, metavar="N",
                   help="samples per forward pass that --target-latency is measured at (default: 64)")
    g.add_argument("--allocation", default="uniform", choices=["uniform", "pfp"],
                   help="how a target is split among groups: one shared ratio, or PFP's δ-based allocation "
                        "(default: uniform)")
    g.add_argument("--delta", type=float, default=1e-16, help="PFP allocation's failure probability δ (default: 1e-16)")
    g.add_argument("--round-to", type=_round_to, default="auto", metavar="N|auto|none",
                   help="round every kept width up to a multiple of N; none: the widths as they fall; auto: with "
                        "--target-flops/--target-params, the multiple the device runs fastest (CPU: 16 with AVX-512, "
                        "else 8; CUDA 8: what ONNX Runtime needs) for the groups of at least 4 multiples (64 or 32 "
                        "channels), where it meets the target, else none (default: auto)")
    _add_recovery_args(p)
    p.add_argument("--calib-samples", type=_positive, default=None,
                   help="calibration samples the method selects on, from the training split (default: the "
                        "method's own: ispasp and gfs 1280, pfp* ⌈3·ln(8·η·η*/δ)⌉, others 256)")
    p.add_argument("--stream", action="store_true",
                   help="keep no calibration samples in memory: re-read them for every group (bounded memory "
                        "for large calibration sets; one pass over them per group)")
    p.add_argument("--option", "-o", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable: ispasp iterations=20 proxy=contribution|paper|cosamp; "
                        "pfp* delta=1e-16 zero_below=0.5 (a sensitivity's sum below this fraction of its "
                        "unit's mean over the sample's positions counts as 0); magnitude norm=1|2 coupled=True|False")


def _add_recovery_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recovery (the default pipeline: selection, refit, BatchNorm recalibration)")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                   help="least-squares reconstruction of the layers that read the pruned channels, on the kept "
                        "ones (default: on; --no-refit for the method's selection alone)")
    g.add_argument("--reconstruct", default="auto", choices=RECONSTRUCT,
                   help="what the refit reconstructs: each layer's output in the original model (undoes the "
                        "upstream error), or the dense layer on the already-pruned inputs; auto: original for "
                        "networks without residual streams, layer for those with (default: auto)")
    g.add_argument("--recalibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute the BatchNorm running statistics on the calibration images after pruning "
                        "(default: on when the model has BatchNorm)")
    g.add_argument("--recovery-samples", type=_positive, default=None,
                   help=f"calibration images the refit and the recalibration read (default: {RECOVERY_SAMPLES}, "
                        "and at least --calib-samples)")
    g.add_argument("--recalibration-samples", type=_positive, default=None,
                   help=f"of those, the images the BatchNorm recalibration reads (whole batches; default: "
                        f"{RECALIBRATION_SAMPLES}, measured as good as 2048)")
    g.add_argument("--scope", default="auto", choices=SCOPES,
                   help="all: every group; inner: only channels no residual stream shares (block-internal, as "
                        "i-SpaSP's paper prunes); auto: inner for a --target-* the inner groups can meet, else all "
                        "(default: auto)")


def _recovery(args) -> dict:
    return {"refit": args.refit, "reconstruct": args.reconstruct, "recalibrate": args.recalibrate,
            "recovery_samples": args.recovery_samples, "recalibration_samples": args.recalibration_samples,
            "scope": args.scope}


def _budget(args) -> allocate.Budget:
    targets = [(m, v) for m, v in (("flops", args.target_flops), ("params", args.target_params),
                                   ("latency", args.target_latency)) if v is not None]
    if len(targets) > 1:
        raise StructPruneError("give only one of --target-flops, --target-params and --target-latency")
    if targets:
        if args.ratio is not None or args.layer_ratio:
            raise StructPruneError("--ratio/--layer-ratio and --target-flops/--target-params/--target-latency "
                                   "exclude each other")
        metric, fraction = targets[0]
        return allocate.Target(fraction, metric, args.allocation, delta=args.delta, batch=args.latency_batch)
    if args.allocation != "uniform":
        raise StructPruneError("--allocation pfp needs --target-flops, --target-params or --target-latency")
    if args.layer_ratio:
        return allocate.PerLayer(dict(args.layer_ratio), 1.0 if args.ratio is None else args.ratio)
    return allocate.Uniform(0.5 if args.ratio is None else args.ratio)


def hf_parts() -> tuple[str, ...]:
    from .attention import PARTS

    return PARTS


def _parts(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or any(p not in hf_parts() for p in parts):
        raise argparse.ArgumentTypeError(f"must be heads, ffn or heads,ffn; got {text!r}")
    return list(dict.fromkeys(parts))


def _add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that holds pickled Python objects (structprune 0.1 files of models "
                        "outside the zoo, a pytorch_model.bin that is more than tensors) or names a constructor "
                        "that is not an nn.Module class: loading such a file can run any code in it, so only for "
                        "files from a source you trust (default: refused)")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output checkpoint (.pt); a JSON report is written next to it")
    p.add_argument("--force", action="store_true", help="overwrite --out and its report if they exist")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structprune",
        description="Make trained PyTorch networks physically smaller and faster by structured pruning (i-SpaSP, "
                    "PFP and baselines): whole channels are removed, then the layers are reconstructed and "
                    "BatchNorm recalibrated on calibration data. Every command has --help.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a zoo model and save a checkpoint",
                       description="Train a model from the zoo on a dataset and save a structprune checkpoint.")
    p.add_argument("--model", required=True, choices=models.available(), help="architecture")
    p.add_argument("--width-mult", type=float, default=None,
                   help="channel width multiplier (vgg16, resnet*, mobilenetv2)")
    _add_training_run_args(p, "training epochs", lr=0.05)
    _add_data_args(p, "train on the first N training samples only")
    _add_common(p)
    _add_output(p)

    p = sub.add_parser("finetune", help="fine-tune a (pruned) checkpoint",
                       description="Fine-tune a checkpoint on the training split; the training state is saved "
                                   "after every epoch next to --out, and --resume continues an interrupted run.")
    p.add_argument("checkpoint", help="checkpoint to fine-tune (it is not modified)")
    _add_training_run_args(p, "fine-tuning epochs", lr=0.01)
    _add_data_args(p, "fine-tune on the first N training samples only")
    _add_common(p)
    _add_trust(p)
    _add_output(p)

    p = sub.add_parser("prune", help="prune a checkpoint and save the smaller model",
                       description="Prune a checkpoint's prunable groups, shallow to deep, to a budget (a keep "
                                   "ratio, per-layer ratios, or a target fraction of MACs/params) with a "
                                   "data-informed or weight-only method; channels are physically removed. "
                                   "Optionally refit, fine-tune, and prune in steps (--schedule).")
    p.add_argument("checkpoint", nargs="?", help="checkpoint written by `structprune train` or structprune.save")
    _add_model_spec(p, p)
    p.add_argument("--method", default="ispasp", choices=methods.available(), help="pruning method (default: ispasp)")
    _add_budget_args(p)
    g = p.add_argument_group("Hugging Face language models: BERT, RoBERTa, ALBERT, DistilBERT, GPT-2, Llama-style "
                             "(instead of a checkpoint; needs structprune[transformers])")
    g.add_argument("--hf-model", default=None, metavar="DIR",
                   help="a local model directory (config.json, safetensors, tokenizer); --out is then a directory "
                        "written with save_pretrained")
    g.add_argument("--prune", type=_parts, default=list(hf_parts()), metavar="PARTS",
                   help="what to prune: heads, ffn or heads,ffn (default: heads,ffn); the groups are the attention "
                        "and FFN modules, named as in the model (BERT: LAYER.attention, LAYER.intermediate; Llama: "
                        "LAYER.self_attn, LAYER.mlp; `structprune info --hf-model` lists them) for --layer-ratio")
    g.add_argument("--text", default=None, metavar="PATH",
                   help="English text for calibration and the held-out similarity: a file (one sentence per "
                        "line, or %%-separated blocks) or a directory of fortune files (default: Debian's "
                        "fortunes, /usr/share/games/fortunes); 80%% calibrates, 20%% is held out")
    g.add_argument("--max-length", type=_positive, default=128,
                   help="tokens per sentence at most; MACs are counted for one sequence of this length (default: 128)")
    p.add_argument("--schedule", default="oneshot", choices=schedule.SCHEDULES,
                   help="oneshot: one pass; sequential: fine-tune after every group (--layer-finetune-epochs); "
                        "cascade: --steps passes towards the budget, fine-tuning after each (default: oneshot)")
    p.add_argument("--steps", type=_positive, default=3, help="prune passes of the cascade schedule (default: 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted cascade after its last finished step (state saved next to --out)")
    _add_finetune_args(p, "after pruning (after each step with cascade)")
    p.add_argument("--layer-finetune-epochs", type=int, default=0,
                   help="fine-tune epochs after each group (sequential schedule) (default: 0)")
    p.add_argument("--ignore", action="append", default=[], metavar="LAYER",
                   help="layer name whose output channels are kept whole (repeatable); the output layer always is")
    p.add_argument("--no-eval", action="store_true", help="skip test accuracy before/after")
    _add_data_args(p, "evaluate on the first N test samples only")
    _add_common(p)
    _add_trust(p)
    _add_output(p)

    p = sub.add_parser("compare", help="compare methods on one checkpoint at several targets",
                       description="Prune one checkpoint with several methods to several targets (fractions of "
                                   "the dense MACs or params), on the same calibration data; report accuracy "
                                   "before and after an optional fine-tune and the pruning time, as Markdown, JSON "
                                   "and a plot.")
    p.add_argument("checkpoint", help="checkpoint to prune")
    p.add_argument("--methods", type=_names, default=["ispasp", "pfp", "magnitude"],
                   help="comma-separated methods (default: ispasp,pfp,magnitude)")
    p.add_argument("--targets", type=_fractions, default=[0.7, 0.5, 0.3],
                   help="comma-separated fractions of the dense MACs (or params) to keep (default: 0.7,0.5,0.3)")
    p.add_argument("--metric", default="flops", choices=sorted(allocate.METRICS),
                   help="what --targets measure (default: flops, i.e. MACs)")
    p.add_argument("--allocation", default="uniform", choices=["uniform", "pfp"],
                   help="how the target is split among groups (default: uniform)")
    p.add_argument("--calib-samples", type=_positive, default=None,
                   help="calibration samples every method selects on (default: each method's own)")
    _add_recovery_args(p)
    _add_finetune_args(p, "of each pruned model")
    p.add_argument("--out-dir", required=True,
                   help="directory for compare.md, compare.json, compare.png and compare.html (one self-contained "
                        "page: table and plot)")
    p.add_argument("--force", action="store_true", help="overwrite the outputs in --out-dir if they exist")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted compare: keep the runs already in --out-dir/compare.json "
                        "(written after every run) and do only the missing ones; the options must be the same")
    _add_data_args(p, "evaluate on the first N test samples only")
    _add_common(p)
    _add_trust(p)

    p = sub.add_parser("eval", help="accuracy, params, MACs and latency of checkpoints",
                       description="Print a table of test accuracy, parameters, MACs and CPU/GPU latency. Params "
                                   "and MACs kept: of the checkpoint's own dense model where it records its "
                                   "pruning, else (a dense checkpoint, an exported file) of the first "
                                   "checkpoint's dense model, or of the first checkpoint itself.")
    p.add_argument("checkpoints", nargs="+", help="checkpoints to evaluate")
    p.add_argument("--json", dest="json_out", default=None, help="also write the table as JSON to this file")
    p.add_argument("--force", action="store_true", help="overwrite --json if it exists")
    _add_data_args(p, "evaluate on the first N test samples only")
    _add_common(p)
    _add_trust(p)

    p = sub.add_parser("info", help="list the prunable groups of a model",
                       description="List the prunable groups of a checkpoint (or a zoo model): channels, "
                                   "producers and consumers.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("checkpoint", nargs="?", help="checkpoint to inspect")
    src.add_argument("--model", metavar="SPEC", help="inspect a fresh model instead: a zoo name, torchvision:NAME, "
                                                     "timm:NAME or package.module:Name")
    src.add_argument("--hf-model", metavar="DIR", help="inspect a local Hugging Face language model directory "
                                                       "(sizes counted for one sequence of 128 tokens, or the "
                                                       "model's maximum if shorter)")
    p.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="keyword options of --model, a JSON object")
    p.add_argument("--data", default="fashion-mnist", metavar="DATA",
                   help="dataset whose input shape --model is built for (default: fashion-mnist; any --data of "
                        "prune)")
    p.add_argument("--data-dir", default=None, help="directory with the dataset files")
    _add_image_args(p)
    _add_trust(p)

    p = sub.add_parser("convert", help="rewrite a checkpoint in the current safe format",
                       description="Read a checkpoint (a structprune 0.1 file that stores a pickled model needs "
                                   "--trust-checkpoint) and write it as tensors plus JSON, which load without "
                                   "running code; the new file is read back and must give the same weights.")
    p.add_argument("checkpoint", help="checkpoint to convert (it is not modified)")
    p.add_argument("out", help="the converted checkpoint")
    p.add_argument("--arch", default=None, metavar="MODULE:NAME",
                   help="the model's importable class (or factory), when its class needs arguments to be rebuilt")
    p.add_argument("--arch-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="keyword arguments of --arch, as a JSON object (default: {})")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    _add_trust(p)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript, checked against PyTorch",
                       description="Write a checkpoint (or a Hugging Face model directory) as ONNX or TorchScript "
                                   "with a dynamic batch axis (and sequence axis for token inputs), run the written "
                                   "file on a random batch and compare its outputs with PyTorch's (ONNX Runtime for "
                                   "ONNX: pip install 'structprune[onnx]'), and print both latencies. A JSON report "
                                   "is written next to --out (OUT.json).")
    p.add_argument("model", help="checkpoint (.pt) or Hugging Face model directory to export")
    p.add_argument("--out", required=True, help="the exported file (.onnx, or .ts for TorchScript)")
    p.add_argument("--format", default=None, choices=exporter.FORMATS,
                   help="onnx or torchscript (default: from --out's suffix: .ts/.torchscript/.jit TorchScript, "
                        "else ONNX)")
    p.add_argument("--opset", type=_positive, default=None,
                   help="ONNX opset (default: torch.onnx's default for the installed torch)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest absolute difference allowed between the exported model's outputs and PyTorch's "
                        "(default: 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch after export")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check batch (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite --out and its report if they exist")
    _add_trust(p)

    for command in sub.choices.values():
        _add_quiet(command)
    return parser


def _paint(text: str, code: str) -> str:
    """``text`` in an ANSI colour on a terminal; plain when stderr is not one or NO_COLOR is set."""
    return f"\x1b[{code}m{text}\x1b[0m" if progress.color_enabled(sys.stderr) else text


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (skipped groups, missed targets) as one line each, without the source line."""
    text = strip_ansi(str(message))
    print(text if text.startswith("structprune") else f"{_paint('warning:', '33')} {text}", file=sys.stderr)


@contextlib.contextmanager
def _logging(quiet: bool):
    """Progress and status lines on stderr, ``structprune: ...``, for the command's duration; --quiet leaves
    warnings and errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("structprune: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    if getattr(args, "quiet", False):
        args.no_progress = True
    with _logging(getattr(args, "quiet", False)):
        return _run(args)


def _run(args) -> int:
    try:
        torch.manual_seed(getattr(args, "seed", 0))
        if process().distributed and args.command not in ("train", "finetune"):
            raise StructPruneError("only train and finetune run under torchrun (DDP); run the other commands "
                                   "in one process")
        commands = {"train": cmd_train, "finetune": cmd_finetune, "prune": cmd_prune, "compare": cmd_compare,
                    "eval": cmd_eval, "info": cmd_info, "convert": cmd_convert, "export": cmd_export}
        code = commands[args.command](args)
        if torch.distributed.is_initialized():
            # rank 0 still evaluates and saves after the others are done: leave together, so that no process
            # tears its connections down under one still using them (gloo aborts a peer then)
            torch.distributed.barrier()
        return code
    except StructPruneError as exc:
        print(f"structprune {args.command}: {_paint('error:', '1;31')} {strip_ansi(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        state = _state_path(Path(out)) if out else None
        hint = (f"; {state} holds the progress: rerun the same command with --resume"
                if state is not None and state.exists() else "")
        print(f"structprune {args.command}: interrupted; no output was written{hint}", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# -- commands ------------------------------------------------------------------------------------

def _report_path(out: Path) -> Path:
    return out.with_suffix(".json") if out.suffix != ".json" else out.with_suffix(".report.json")


def _check_outputs(args, *inputs, report: Path | None = None) -> tuple[Path, Path]:
    """Refuse early (before any work) outputs that cannot be written, that exist (without --force) or that
    are one of the command's inputs (even with --force: an input is never overwritten). The JSON report is
    ``report``, by default next to --out (:func:`_report_path`)."""
    out = Path(args.out)
    report = _report_path(out) if report is None else report
    for path in (out, report):
        _refuse_input(path, inputs)
        checkpoint.check_output(path, args.force, what="--out:")
    return out, report


def _refuse_input(path: Path, inputs) -> None:
    for source in inputs:
        if source is not None and path.resolve() == Path(source).resolve():
            raise StructPruneError(f"--out: {path} is the input {source}; write the result to another path "
                                   f"(an input is never overwritten, even with --force)")


def _load(path, args):
    return checkpoint.load(path, trust_checkpoint=args.trust_checkpoint)


def _write_json(path: Path, payload: dict, force: bool) -> None:
    text = json.dumps(payload, indent=2, default=str)
    checkpoint.write_atomic(path, lambda tmp: Path(tmp).write_text(text + "\n"), force=force)


def _source(args):
    """The dataset --data names (opened once per command)."""
    if getattr(args, "_data_source", None) is None:
        args._data_source = data.source(args.data, root=args.data_dir, seed=getattr(args, "seed", 0),
                                        image_size=args.image_size, mean=args.mean, std=args.std)
    return args._data_source


def _loader(args, split: str, shuffle: bool = False, limit=None) -> DataLoader:
    if split == "test" and _source(args).classes is None:
        no_eval = " (or pass --no-eval)" if hasattr(args, "no_eval") else ""
        raise StructPruneError(f"--data {args.data} has no labels, which measuring accuracy needs{no_eval}")
    dataset = _source(args).load(split, limit)
    gen = torch.Generator().manual_seed(args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, generator=gen)


def _example(args) -> torch.Tensor:
    return torch.zeros(1, *_source(args).shape)


def _zoo_model(name: str, args, **kwargs):
    """A fresh model: a zoo model shaped for --data's images and classes, or any other spec (models.create) with
    --model-kwargs."""
    if name not in models.available():
        return models.create(name, **dict(getattr(args, "model_kwargs", None) or {}), **kwargs)
    source = _source(args)
    if len(source.shape) != 3 or source.classes is None:
        raise StructPruneError(f"--data {args.data}: zoo models need labelled images (C, H, W); got samples of "
                               f"shape {source.shape}{'' if source.classes else ' without labels'}")
    channels, height, _ = source.shape
    if models.accepts(name, "input_size"):
        kwargs["input_size"] = height
    return models.create(name, num_classes=source.classes, in_channels=channels, **kwargs)


def _spec_model(args):
    """prune --model: the model the spec names, with --weights loaded (the CLI's other paths read checkpoints)."""
    model = _zoo_model(args.model, args)
    if args.weights is not None:
        models.load_weights(model, args.weights, trust_checkpoint=args.trust_checkpoint)
    else:
        warnings.warn(f"structprune: --model {args.model} without --weights prunes randomly initialised weights",
                      stacklevel=1)
    return model


def _check_fits(model, args, example: torch.Tensor) -> None:
    """The model must accept the data's images and have as many outputs as it has classes."""
    try:
        with torch.no_grad():
            out = model.eval()(example.to(next(model.parameters(), example).device))
    except Exception as exc:
        raise StructPruneError(f"--data {args.data}: the model does not accept its {tuple(example.shape[1:])} "
                               f"inputs ({first_line(exc)})") from None
    classes = _source(args).classes
    if classes is not None and (out.dim() != 2 or out.shape[1] != classes):
        raise StructPruneError(f"--data {args.data}: it has {classes} classes but the model "
                               f"outputs {tuple(out.shape[1:])}")


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state")


def _check_state(args, out: Path) -> Path:
    """The state file next to ``out``; an interrupted run's state is never silently discarded."""
    state = _state_path(out)
    if state.exists() and not args.resume and not args.force:
        raise StructPruneError(f"{state} holds the state of an interrupted run: pass --resume to continue it "
                               f"or --force to start over")
    if getattr(args, "epochs", 1) < 1:
        raise StructPruneError(f"--epochs must be at least 1, got {args.epochs}")
    return state


def _fit(model, args, epochs: int, device, state_path: Path | None = None, resume: bool = False,
         limit: int | None = None) -> tuple[list[float], int]:
    """Train ``model`` in place on the training split; returns the epoch losses and the samples used.

    The same global batches for one process or N under torchrun (each reads its share)."""
    dataset = _source(args).load("train", limit)
    loader = ShardedBatches(dataset, args.batch_size, seed=args.seed)
    losses = train(model, loader, _train_config(args, epochs), device=device, progress=not args.no_progress,
                   state_path=state_path, resume=resume)
    return losses, len(dataset)


def _training_device(args) -> torch.device:
    """--device, or under torchrun with CUDA the GPU of this process (cuda:LOCAL_RANK)."""
    device = _device(args.device)
    proc = process()
    if proc.distributed and device.type == "cuda":
        device = cuda_device_for(proc)
        torch.cuda.set_device(device)
    init_distributed(device)
    return device


def cmd_train(args) -> int:
    out, report_path = _check_outputs(args)
    state = _check_state(args, out)
    device = _training_device(args)
    kwargs = {}
    if args.width_mult is not None:
        if not models.accepts(args.model, "width_mult"):
            raise StructPruneError(f"--width-mult: model {args.model} has no width multiplier")
        kwargs["width_mult"] = args.width_mult
    model = _zoo_model(args.model, args, **kwargs).to(device)
    example = _example(args)
    _check_fits(model, args, example)
    start = time.perf_counter()
    losses, samples = _fit(model, args, args.epochs, device, state, args.resume, limit=args.limit)
    seconds = time.perf_counter() - start
    if not process().is_main:
        return 0  # rank 0 evaluates, saves and reports
    accuracy = measure.accuracy(model, _loader(args, "test"), device)
    model.structprune_example_input = {"shape": list(example.shape), "dtype": "float32"}
    size = measure.count(model.cpu(), example)
    report = {"command": "train", "model": args.model, "arch": model.structprune_arch, "data": args.data,
              "epochs": args.epochs, "train_samples": samples, "losses": losses,
              "test_accuracy": accuracy, **size, "train_seconds": seconds, "seed": args.seed}
    checkpoint.save(model, out, force=True, extra={"report": report})
    _write_json(report_path, report, True)
    print(f"{args.model} on {args.data}: test accuracy {accuracy:.2f}%, {size['params']:,} params, "
          f"{size['macs']:,} MACs, trained in {seconds:.1f}s -> {out}")
    return 0


def cmd_finetune(args) -> int:
    out, report_path = _check_outputs(args, args.checkpoint)
    state = _check_state(args, out)
    device = _training_device(args)
    model = _load(args.checkpoint, args).to(device)
    example = _example(args)
    _check_fits(model, args, example)
    test_loader = _loader(args, "test")
    before = measure.accuracy(model, test_loader, device)
    start = time.perf_counter()
    losses, _ = _fit(model, args, args.epochs, device, state, args.resume, limit=args.limit)
    seconds = time.perf_counter() - start
    if not process().is_main:
        return 0
    after = measure.accuracy(model, test_loader, device)
    report = {"command": "finetune", "checkpoint": str(args.checkpoint), "data": args.data, "epochs": args.epochs,
              "config": vars(_train_config(args, args.epochs)), "losses": losses, "accuracy_before": before,
              "accuracy_after": after, "finetune_seconds": seconds, "seed": args.seed}
    checkpoint.save(model.cpu(), out, force=True, extra={"report": report})
    _write_json(report_path, report, True)
    print(f"fine-tuned {args.epochs} epochs: accuracy {before:.2f}% -> {after:.2f}% in {seconds:.1f}s -> {out}")
    return 0


def _method_options(args) -> dict:
    options = dict(args.option)
    try:  # validate the options before any data is read
        methods.get(args.method, **options)
    except StructPruneError as exc:
        raise StructPruneError(f"--option: {exc}") from None
    return options


def cmd_prune(args) -> int:
    if sum(x is not None for x in (args.checkpoint, args.hf_model, args.model)) != 1:
        raise StructPruneError("give either a checkpoint, --model SPEC or --hf-model DIR")
    if args.model is not None and args.model.startswith("hf:"):
        args.hf_model, args.model = args.model[len("hf:"):], None
    if args.hf_model is not None:
        return cmd_prune_hf(args)
    if args.model is None and (args.weights is not None or args.model_kwargs):
        raise StructPruneError("--weights and --model-kwargs go with --model SPEC")
    source_path = args.checkpoint if args.model is None else args.weights
    out, report_path = _check_outputs(args, source_path)
    state = _check_state(args, out)
    device = _device(args.device)
    budget = _budget(args)
    options = _method_options(args)
    for flag in ("finetune_epochs", "layer_finetune_epochs"):
        if getattr(args, flag) < 0:
            raise StructPruneError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.schedule == "sequential" and args.layer_finetune_epochs == 0:
        raise StructPruneError("--schedule sequential fine-tunes after every group: give --layer-finetune-epochs")
    model = (_load(args.checkpoint, args) if args.model is None else _spec_model(args)).to(device)
    example = _example(args)
    _check_fits(model, args, example)
    calib = _loader(args, "train")
    test_loader = None if args.no_eval else _loader(args, "test", limit=args.limit)
    evaluate = None if test_loader is None else (lambda m: measure.accuracy(m, test_loader, device))
    dense_accuracy = None if evaluate is None else evaluate(model)

    def tune(epochs):
        return None if epochs == 0 else (lambda m: _fit(m, args, epochs, device, limit=args.train_limit))

    final, steps, results = schedule.run(
        model, calib, args.method, budget, schedule=args.schedule, steps=args.steps,
        finetune=tune(args.finetune_epochs), layer_finetune=tune(args.layer_finetune_epochs), evaluate=evaluate,
        progress=not args.no_progress, example_inputs=example.to(device), **_recovery(args),
        round_to=args.round_to, calib_samples=args.calib_samples, ignored_layers=args.ignore, seed=args.seed,
        stream=args.stream, state_path=state, resume=args.resume,
        state_key=repr((args.checkpoint or (args.model, args.model_kwargs, args.weights), args.data,
                        args.finetune_epochs, args.layer_finetune_epochs, args.train_limit,
                        vars(_train_config(args, 1)))),
        **options)
    first, last = results[0], results[-1]
    source = {"checkpoint": str(args.checkpoint)} if args.model is None else {
        "model": args.model, "model_kwargs": args.model_kwargs, "weights": args.weights}
    report = {"command": "prune", **source, "data": args.data, "schedule": args.schedule,
              **last.to_dict(), "before": first.before, "seconds": sum(r.seconds for r in results),
              "params_ratio": last.after["params"] / first.before["params"],
              "macs_ratio": last.after["macs"] / first.before["macs"], "steps": steps,
              "warnings": list(dict.fromkeys(w for r in results for w in r.warnings))}
    if evaluate is not None:
        report["accuracy_before"] = dense_accuracy
        report["accuracy_after"] = evaluate(final)
    checkpoint.save(final.cpu(), out, force=args.force, extra={"report": report})
    _write_json(report_path, report, args.force)
    acc = "" if evaluate is None else (f", accuracy {report['accuracy_before']:.2f}% -> "
                                       f"{report['accuracy_after']:.2f}%")
    print(f"{args.method} ({args.schedule}): params {first.before['params']:,} -> {last.after['params']:,} "
          f"({report['params_ratio']:.1%}), MACs {first.before['macs']:,} -> {last.after['macs']:,} "
          f"({report['macs_ratio']:.1%}){acc}, pruned in {report['seconds']:.1f}s -> {out}")
    return 0


def _hf_model(path: str, trust_checkpoint: bool = False):
    """A transformers model with attention blocks structprune describes, from a local directory, or a clear error."""
    from .models import hf

    model = hf.load_pretrained(path, trust_checkpoint=trust_checkpoint)
    if not hf.is_supported(model):
        raise StructPruneError(f"--hf-model {path}: {type(model).__name__} has no attention block of a layout "
                               f"structprune knows (structprune.models.hf lists them)")
    return model


def _max_positions(model) -> int:
    """The longest token sequence a Hugging Face model reads (its position embeddings)."""
    return int(getattr(model.config, "max_position_embeddings", None) or 512)


def cmd_prune_hf(args) -> int:
    """prune --hf-model: heads and/or FFN neurons of a transformers language model, judged by the cosine similarity
    of its sentence embeddings to the dense model's on held-out text."""
    from .attention import layer_sizes
    from .data import text
    from .models import hf

    out, report_path = _check_outputs(args, args.hf_model)
    unsupported = [flag for flag, on in (("--schedule", args.schedule != "oneshot"),
                                         ("--finetune-epochs", args.finetune_epochs != 0),
                                         ("--layer-finetune-epochs", args.layer_finetune_epochs != 0)) if on]
    if unsupported:
        raise StructPruneError(f"{', '.join(unsupported)}: not available with --hf-model (one-shot pruning only)")
    device = _device(args.device)
    budget = _budget(args)
    options = _method_options(args)
    calib_text, held_out = text.split(text.read(args.text), seed=args.seed)
    transformers = hf.transformers_module()
    transformers.utils.logging.disable_progress_bar()  # its per-file loading bars; ours shows the pruning
    model = _hf_model(args.hf_model, args.trust_checkpoint).to(device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_model)
    except Exception as exc:
        raise StructPruneError(f"--hf-model {args.hf_model}: no usable tokenizer there ({exc})") from None
    if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    ignored = [n for part in hf_parts() if part not in args.prune for n in hf.part_names(model, part)]
    limit = _max_positions(model)
    if args.max_length > limit:
        warnings.warn(f"--max-length {args.max_length}: the model reads at most {limit} tokens; using {limit}",
                      stacklevel=1)
        args.max_length = limit
    calib = text.TokenBatches(calib_text, tokenizer, args.batch_size, args.max_length, device)
    test = text.TokenBatches(held_out[:args.limit], tokenizer, args.batch_size, args.max_length, device)
    example = {k: v.to(device) for k, v in tokenizer(calib_text[:1], padding="max_length", truncation=True,
                                                        max_length=args.max_length, return_tensors="pt").items()}
    dense_embeddings = measure.sentence_embeddings(model, test)
    result = prune(model, calib, args.method, budget, example, **_recovery(args), round_to=args.round_to,
                   calib_samples=args.calib_samples, ignored_layers=ignored + list(args.ignore), seed=args.seed,
                   stream=args.stream, progress=not args.no_progress, **options)
    similarity = measure.embedding_similarity(dense_embeddings, measure.sentence_embeddings(result.model, test))
    report = {"command": "prune", "hf_model": str(args.hf_model), "prune": args.prune,
              "text": args.text or str(text.FORTUNES), "calibration_sentences": result.calib_samples,
              "held_out_sentences": len(test.texts), "max_length": args.max_length, **result.to_dict(),
              "layer_sizes": layer_sizes(result.model), "embedding_cosine_similarity": similarity}
    hf.save_pretrained(result.model.cpu(), out, force=args.force, tokenizer=tokenizer, extra={"report": report})
    _write_json(report_path, report, args.force)
    print(f"{args.method} ({'+'.join(args.prune)}): params {result.before['params']:,} -> "
          f"{result.after['params']:,} ({report['params_ratio']:.1%}), MACs at {args.max_length} tokens "
          f"{result.before['macs']:,} -> {result.after['macs']:,} ({report['macs_ratio']:.1%}), embedding "
          f"cosine similarity to the dense model {similarity:.4f} on {len(test.texts)} held-out sentences, "
          f"pruned in {result.seconds:.1f}s -> {out}")
    return 0


def cmd_compare(args) -> int:
    out_dir = Path(args.out_dir)
    outputs = [out_dir / f"compare.{ext}" for ext in ("md", "json", "png", "html")]
    if outputs[1].exists() and not (args.force or args.resume):
        raise StructPruneError(f"--out-dir: {outputs[1]} already exists; pass --resume to continue an interrupted "
                               f"compare, or --force to start over")
    for path in outputs:
        _refuse_input(path, [args.checkpoint])
        if not (args.resume and path == outputs[1]):
            checkpoint.check_output(path, args.force or args.resume, what="--out-dir:")
    if args.finetune_epochs < 0:
        raise StructPruneError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    device = _device(args.device)
    options = {"checkpoint": str(args.checkpoint), "data": args.data, "limit": args.limit, "metric": args.metric,
               "allocation": args.allocation, **_recovery(args), "calib_samples": args.calib_samples,
               "finetune_epochs": args.finetune_epochs, "train_limit": args.train_limit, "seed": args.seed,
               "train": vars(_train_config(args, max(args.finetune_epochs, 1)))}
    rows = _finished_rows(outputs[1], options) if args.resume else []
    model = _load(args.checkpoint, args).to(device)
    example = _example(args)
    _check_fits(model, args, example)
    calib = _loader(args, "train")  # the same samples, in the same order, for every method
    test_loader = _loader(args, "test", limit=args.limit)
    dense_accuracy = measure.accuracy(model, test_loader, device)
    title = f"{Path(args.checkpoint).name} on {args.data}"
    payload = {"command": "compare", **options, "dense_accuracy": dense_accuracy, "device": str(device),
               "complete": False, "rows": rows}
    done = {(r["method"], r["target"]) for r in rows}
    for method in args.methods:
        for target in args.targets:
            if (method, target) in done:
                continue
            budget = allocate.Target(target, args.metric, args.allocation)
            result = prune(model, calib, method, budget, example_inputs=example.to(device), **_recovery(args),
                           calib_samples=args.calib_samples, seed=args.seed, progress=not args.no_progress)
            row = {"method": method, "target": target, "metric": args.metric, "allocation": args.allocation,
                   "params": result.after["params"], "macs": result.after["macs"],
                   "params_ratio": result.after["params"] / result.before["params"],
                   "macs_ratio": result.after["macs"] / result.before["macs"],
                   "prune_seconds": result.seconds, "calib_samples": result.calib_samples,
                   "accuracy_pruned": measure.accuracy(result.model, test_loader, device),
                   "warnings": result.warnings}
            if args.finetune_epochs:
                start = time.perf_counter()
                _fit(result.model, args, args.finetune_epochs, device, limit=args.train_limit)
                row["finetune_seconds"] = time.perf_counter() - start
                row["accuracy_finetuned"] = measure.accuracy(result.model, test_loader, device)
            rows.append(row)
            _write_json(outputs[1], payload, True)  # every finished run is on disk: Ctrl-C loses only the current
            log.info(f"{method} at {args.metric} {target}: accuracy {row['accuracy_pruned']:.2f}%"
                     + (f" -> {row['accuracy_finetuned']:.2f}% fine-tuned" if "accuracy_finetuned" in row else "")
                     + f", pruned in {result.seconds:.1f}s")
    order = {(m, t): i for i, (m, t) in enumerate((m, t) for m in args.methods for t in args.targets)}
    rows.sort(key=lambda r: order.get((r["method"], r["target"]), len(order)))
    table = report.compare_table(rows, dense_accuracy)
    print(table)
    payload["complete"] = True
    _write_json(outputs[1], payload, True)
    checkpoint.write_atomic(outputs[0], lambda tmp: Path(tmp).write_text(f"# {title}\n\n{table}\n"), force=True)
    checkpoint.write_atomic(outputs[2], lambda tmp: report.plot_compare(
        rows, tmp, title, dense_accuracy, x="macs_ratio" if args.metric == "flops" else "params_ratio"),
        force=True)
    page = report.compare_html(rows, dense_accuracy, title, outputs[2].read_bytes(), options)
    checkpoint.write_atomic(outputs[3], lambda tmp: Path(tmp).write_text(page), force=True)
    print(f"-> {', '.join(map(str, outputs))}")
    return 0


def _finished_rows(path: Path, options: dict) -> list[dict]:
    """The runs an interrupted compare left in ``path``, if it ran with the same options."""
    if not path.exists():
        return []
    try:
        previous = json.loads(path.read_text())
        rows = list(previous["rows"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StructPruneError(f"--resume: {path} is not a compare result ({exc}); delete it to start over") from None
    differing = sorted(k for k, v in options.items() if json.loads(json.dumps(v, default=str)) != previous.get(k))
    if differing:
        raise StructPruneError(f"--resume: {path} was written with other options ({', '.join(differing)}); rerun "
                               f"with the same options, or without --resume (and --force) to start over")
    return rows


def cmd_eval(args) -> int:
    json_path = Path(args.json_out) if args.json_out else None
    if json_path is not None:
        _refuse_input(json_path, args.checkpoints)
        checkpoint.check_output(json_path, args.force, what="--json:")
    device = _device(args.device)
    test_loader = _loader(args, "test", limit=args.limit)
    example = _example(args)
    rows = []
    for path in args.checkpoints:
        if exporter.is_exported(path):  # ONNX (ONNX Runtime) or TorchScript, on the CPU
            model = exporter.ExportedModel(path, trust_checkpoint=args.trust_checkpoint)
            _check_fits(model, args, example)
            recorded = model.metadata
            if "params" not in recorded:
                raise StructPruneError(f"{path} was not written by structprune export: its size is not recorded")
            rows.append({"checkpoint": str(path), "runtime": model.runtime,
                         "accuracy": measure.accuracy(model, test_loader, torch.device("cpu")),
                         "params": recorded["params"], "macs": recorded["macs"],
                         **{f"latency_{k}_batch1": v for k, v in model.latency_stats(example).items()}})
            continue
        model = _load(path, args).to(device)
        _check_fits(model, args, example)
        size = measure.count(model, example.to(device))
        rows.append({
            "checkpoint": str(path), "runtime": "pytorch",
            "accuracy": measure.accuracy(model, test_loader, device),
            **size, **_dense_size(model, example, args),
            **{f"latency_{k}_batch1": v for k, v in measure.latency_stats(model, example.to(device)).items()},
        })
    print(report.eval_table(rows))
    if json_path is not None:
        _write_json(json_path, {"command": "eval", "data": args.data, "device": str(device), "rows": rows}, args.force)
    return 0


def _dense_size(model: torch.nn.Module, example: torch.Tensor, args) -> dict[str, int]:
    """{"dense_params", "dense_macs"}: the size of a pruned checkpoint's model before its recorded pruning (its
    architecture rebuilt without the removals), or {} for a model with no pruning recorded."""
    arch = getattr(model, "structprune_arch", None)
    if not getattr(model, "structprune_history", None) or not isinstance(arch, dict):
        return {}
    dense = checkpoint.rebuild({"arch": arch}, trust=args.trust_checkpoint).eval()
    return {f"dense_{k}": v for k, v in measure.count(dense, example).items()}


def cmd_info(args) -> int:
    if args.model is not None and args.model.startswith("hf:"):
        args.hf_model, args.model = args.model[len("hf:"):], None
    if args.hf_model:
        model = _hf_model(args.hf_model, args.trust_checkpoint)
        tokens = min(128, _max_positions(model))
        example = {"input_ids": torch.zeros(1, tokens, dtype=torch.long),
                   "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
        title = args.hf_model
    elif args.checkpoint:
        model = _load(args.checkpoint, args)
        example = checkpoint.example_input(model)
        if example is None:
            raise StructPruneError(f"{args.checkpoint} does not record its input shape")
        title = args.checkpoint
    else:
        model = _zoo_model(args.model, args)
        example = _example(args)
        title = f"{args.model} (fresh, {args.data} inputs)"
    graph = build_graph(model, example)
    groups = graph.all_groups()
    size = measure.count(model, example)
    print(f"{title}: {size['params']:,} params, {size['macs']:,} MACs, {len(groups)} prunable groups")
    print("| # | group | channels | producers | consumers |")
    print("|---:|---|---:|---|---|")
    for i, group in enumerate(groups):
        print(f"| {i} | {group.name} | {group.channels} | {', '.join(p.name for p in group.producers)} | "
              f"{', '.join(c.name for c in group.consumers)} |")
    if hasattr(graph, "output_layers"):
        outputs = ", ".join(graph.name_of(m) for m in graph.output_layers)
        print(f"output layers (never pruned): {outputs}")
    for name, reason in graph.skipped:
        print(f"skipped: {name}: {reason}")
    return 0


def cmd_convert(args) -> int:
    out = Path(args.out)
    _refuse_input(out, [args.checkpoint])
    checkpoint.check_output(out, args.force, what="OUT")
    arch_kwargs = args.arch_kwargs
    source = checkpoint.read(args.checkpoint, trust_checkpoint=args.trust_checkpoint)
    model = checkpoint.unpack(source, str(args.checkpoint), trust_checkpoint=args.trust_checkpoint)
    if args.arch is not None:
        models.create(args.arch, **arch_kwargs)  # import and build it once: a bad spec fails here, clearly
        model.structprune_arch = {"import": args.arch, "kwargs": arch_kwargs}
    packed = checkpoint.pack(model, source.get("extra") or {})

    def write_checked(tmp: str) -> None:  # read back before it replaces anything
        torch.save(packed, tmp)
        try:
            same = _same_weights(model, checkpoint.load(tmp, trust_checkpoint=args.trust_checkpoint))
            why = "the weights read back differ"
        except StructPruneError as exc:
            same, why = False, str(exc)
        if not same:
            raise StructPruneError(f"the converted model could not be read back as the same model ({why}); nothing "
                                   f"was written. Give the model's class with --arch MODULE:NAME (and --arch-kwargs)")

    checkpoint.write_atomic(out, write_checked, force=args.force)
    print(f"{args.checkpoint} -> {out} (tensors and JSON, {len(model.state_dict())} tensors, same weights)")
    return 0


def cmd_export(args) -> int:
    out, report_path = _check_outputs(args, args.model, report=Path(args.out + ".json"))  # OUT.onnx.json
    if not Path(args.model).exists():
        raise StructPruneError(f"{args.model} does not exist")
    model = checkpoint.load(args.model, trust_checkpoint=args.trust_checkpoint)
    result = exporter.export(model, out, args.format, opset=args.opset, check=not args.no_check, atol=args.atol,
                             force=args.force, seed=args.seed, source=str(args.model))
    report = {"command": "export", "model": str(args.model), **result.to_dict()}
    latency = ""
    example = checkpoint.example_input(model)  # None for a language model: no latency at a made-up length
    exported = None
    if not args.no_latency and example is not None and (result.format == "torchscript" or exporter.has_onnxruntime()):
        exported = exporter.ExportedModel(out, trust_checkpoint=True)  # the file we have just written
    if exported is not None:
        report["latency_pytorch_batch1"] = measure.latency_stats(model, example)
        report[f"latency_{exported.runtime}_batch1"] = exported.latency_stats(example)
        latency = (f"; latency at batch 1: PyTorch {report['latency_pytorch_batch1']['median_ms']:.3f} ms, "
                   f"{exported.runtime} {report[f'latency_{exported.runtime}_batch1']['median_ms']:.3f} ms")
    _write_json(report_path, report, args.force)
    what = f"ONNX opset {result.opset}" if result.format == "onnx" else "TorchScript"
    check = ("not checked" if result.checked_with is None else
             f"checked with {result.checked_with} on a random batch: max abs difference {result.max_abs_diff:.2g} "
             f"(atol {result.atol:g})")
    print(f"{args.model} -> {out} ({what}, inputs {', '.join(result.inputs)} with a dynamic batch axis; {check})"
          f"{latency}")
    return 0


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


if __name__ == "__main__":
    sys.exit(main())
