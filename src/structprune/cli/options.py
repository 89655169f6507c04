"""The options several commands share: argument types (each a one-line error naming what is wrong), option groups,
and what they become (a budget, a training configuration, a device). Commands import it; ``structprune --help``
does not (:mod:`structprune.cli` lists the commands without importing them).
"""

from __future__ import annotations

import argparse
import ast
import json

import torch

from ..allocate import Budget, PerLayer, Target, Uniform
from ..attention import PARTS
from ..data.fashion_mnist import DEFAULT_ROOT
from ..distill import AUTOCAST, LOSSES, OPTIMIZERS, DistillConfig
from ..errors import StructPruneError
from ..finetune import TrainConfig
from ..methods import available as available_methods
from ..methods import get as get_method
from ..pipeline import RECALIBRATION_SAMPLES, RECONSTRUCT, RECOVERY_SAMPLES, SCOPES

# -- argument types --------------------------------------------------------------------------------------------


def fraction_of(what: str):
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


ratio = fraction_of("channels")
metric_fraction = fraction_of("the dense model's --metric")  # compare --targets


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def round_to(text: str) -> int | str | None:
    if text == "auto":
        return text
    if text == "none":
        return None
    try:
        return positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, auto or none, got {text!r}") from None


def fractions(text: str) -> list[float]:
    try:
        return [metric_fraction(part) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in (0, 1]: {exc}") from None


def method_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in available_methods()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(available_methods())}")
    return names


def layer_ratio(text: str) -> tuple[str, float]:
    pattern, sep, raw = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"must look like PATTERN=RATIO (e.g. 'layer3.*=0.25'), got {text!r}")
    return pattern, ratio(raw)


def option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must look like KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.replace("-", "_"), value


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def parts(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or any(p not in (*PARTS, "layers", "hidden") for p in chosen):
        raise argparse.ArgumentTypeError(f"must be heads, ffn, layers, hidden or several of them (heads,ffn); got "
                                         f"{text!r}")
    return list(dict.fromkeys(chosen))


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_text(p, use: str, split: str) -> None:
    """--text of a Hugging Face model directory: ``use`` says what the text is for, ``split`` what of it is read."""
    p.add_argument("--text", default=None, metavar="PATH",
                   help=f"English text {use}: a file (one sentence per line, %%-separated blocks, or .jsonl) or a "
                        f"directory of fortune files (default: Debian's fortunes, /usr/share/games/fortunes); {split}")


def add_dtype(p: argparse.ArgumentParser) -> None:
    """--dtype of a Hugging Face model directory."""
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the precision the model is loaded, run and saved in (statistics and least squares stay in "
                        "float32/64 inside); auto: the one its config records (default: auto)")


def layer_count(text: str) -> int | float:
    """A number of layers (an integer ≥ 1) or a fraction of them in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value >= 1 and value == int(value):
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"must be a number of layers (1, 2, ...) or a fraction in (0, 1); got {text!r}")


# -- option groups -----------------------------------------------------------------------------------------------

def add_data(p: argparse.ArgumentParser, limit_help: str) -> None:
    """--data and its options, --limit (``limit_help`` says what it limits) and --batch-size."""
    add_dataset(p)
    add_batches(p, limit_help)


def add_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, metavar="DATA",
                   help="dataset: fashion-mnist (from Debian's dataset-fashion-mnist), digits, synthetic; "
                        "imagefolder:DIR (a sub-folder per class, or the images alone: no labels; DIR/train and "
                        "DIR/test or DIR/val as the splits when they exist, else a seeded 80/20 split), a "
                        ".npz/.npy/.pt file of tensors (x and y, or x_train, y_train, x_test, y_test; x alone: no "
                        "labels), or module:function returning a Dataset of (x, y) or x "
                        "(default: the data a checkpoint records, with its image size and normalisation; else "
                        "fashion-mnist)")
    p.add_argument("--data-dir", default=None,
                   help=f"directory with the dataset files (default for fashion-mnist: {DEFAULT_ROOT})")
    add_image(p)


def add_batches(p: argparse.ArgumentParser, limit_help: str) -> None:
    p.add_argument("--limit", type=positive, default=None, help=limit_help)
    p.add_argument("--batch-size", type=positive, default=128, help="batch size (default: 128)")


def add_image(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=positive, default=None, metavar="N",
                   help="with --data imagefolder:DIR: images are resized to N×N (default: their own size when they "
                        "share one, else 224)")
    p.add_argument("--mean", type=floats, default=None, metavar="R,G,B",
                   help="with --data imagefolder:DIR: per-channel mean subtracted (default: ImageNet's, "
                        "0.485,0.456,0.406)")
    p.add_argument("--std", type=floats, default=None, metavar="R,G,B",
                   help="with --data imagefolder:DIR: per-channel std divided by (default: ImageNet's, "
                        "0.229,0.224,0.225)")


def add_model(p) -> None:
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="a model instead of a checkpoint: a zoo name, torchvision:NAME, timm:NAME (optional "
                        "extras), hf:DIR (a Hugging Face model directory) or package.module:Name (your class or "
                        "factory; its folder on PYTHONPATH, or the current folder)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model-kwargs and --weights, which go with --model SPEC."""
    p.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                   help="keyword options of --model, a JSON object (e.g. '{\"num_classes\": 10}')")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="trained weights for --model: a state dict in .safetensors, or a torch file of tensors "
                        "(a training checkpoint's 'state_dict' is taken from it)")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N] (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same result (default: 0)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide progress (a bar on a terminal; elsewhere a log line every 5 s, "
                        "STRUCTPRUNE_PROGRESS_INTERVAL)")


def add_training_run(p: argparse.ArgumentParser, what: str, lr: float) -> None:
    """train and finetune: --epochs, --resume and the optimiser's options."""
    p.add_argument("--epochs", type=int, default=3, help=f"{what} (default: 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the training state saved next to --out")
    add_train(p, lr)


def add_finetune(p: argparse.ArgumentParser, when: str) -> None:
    """prune and compare: an optional fine-tune of the pruned model, on part of the training split."""
    p.add_argument("--finetune-epochs", type=int, default=0, help=f"fine-tune epochs {when} (default: 0)")
    p.add_argument("--train-limit", type=positive, default=None,
                   help="fine-tune on the first N training samples only (default: all)")
    add_train(p, lr=0.01)


def add_train(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr})")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay on conv/linear weights, none on biases and norms (default: 5e-4)")
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "step"],
                   help="cosine, or step (×0.1 at 50%% and 75%% of the run) (default: cosine)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up (default: 0)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default: 0)")


def add_budget(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budget (one of --ratio/--layer-ratio, --target-flops, --target-params, "
                             "--target-latency)")
    g.add_argument("--ratio", type=ratio, default=None,
                   help="fraction of each group's channels to keep, in (0, 1] (default: 0.5); with --layer-ratio, "
                        "the ratio of groups no pattern matches (default there: 1)")
    g.add_argument("--layer-ratio", type=layer_ratio, action="append", default=[], metavar="PATTERN=RATIO",
                   help="keep ratio of the groups whose name (or a producer's) matches PATTERN (fnmatch, "
                        "first match wins), repeatable; see `structprune info` for the group names")
    g.add_argument("--target-flops", type=fraction_of("the dense MACs"), default=None,
                   help="keep this fraction of the dense model's MACs, met on the real pruned model")
    g.add_argument("--target-params", type=fraction_of("the dense parameters"), default=None,
                   help="keep this fraction of the dense model's parameters")
    g.add_argument("--target-latency", type=fraction_of("the dense forward time"), default=None,
                   help="keep this fraction of the dense model's forward time, measured on this machine and "
                        "--device at --latency-batch samples (within 5%%: timing noise)")
    g.add_argument("--latency-batch", type=positive, default=64, metavar="N",
                   help="samples per forward pass that --target-latency is measured at (default: 64)")
    g.add_argument("--allocation", default="uniform", choices=["uniform", "pfp", "error"],
                   help="how a target is split among groups: one shared ratio, PFP's δ-based allocation, or by "
                        "error: each group's effect on the network's output at candidate widths, measured, and the "
                        "least summed effect that meets the target, every group in scope (default: uniform)")
    g.add_argument("--delta", type=float, default=1e-16, help="PFP allocation's failure probability δ (default: 1e-16)")
    add_measured_widths(g)
    g.add_argument("--round-to", type=round_to, default="auto", metavar="N|auto|none",
                   help="round every kept width up to a multiple of N; none: the widths as they fall; auto: with "
                        "--target-flops/--target-params, the multiple the device runs fastest (CPU: 16 with AVX-512, "
                        "else 8; CUDA 8: what ONNX Runtime needs) for the groups of at least 4 multiples (64 or 32 "
                        "channels), where it meets the target, else none (default: auto)")
    add_recovery(p)
    p.add_argument("--calib-samples", type=positive, default=None,
                   help="calibration samples the method selects on, from the training split (default: the "
                        "method's own: ispasp and gfs 1280, pfp* ⌈3·ln(8·η·η*/δ)⌉, others 256)")
    p.add_argument("--stream", action="store_true",
                   help="keep no calibration samples in memory: re-read them for every group (bounded memory "
                        "for large calibration sets; one pass over them per group)")
    p.add_argument("--option", "-o", type=option, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable: ispasp iterations=20 proxy=contribution|paper|cosamp; "
                        "pfp* delta=1e-16 zero_below=0.5 (a sensitivity's sum below this fraction of its "
                        "unit's mean over the sample's positions counts as 0); magnitude norm=1|2 coupled=True|False")


def add_recovery(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--recovery-samples", type=positive, default=None,
                   help=f"calibration images the refit and the recalibration read (default: {RECOVERY_SAMPLES}, "
                        "and at least --calib-samples)")
    g.add_argument("--recalibration-samples", type=positive, default=None,
                   help=f"of those, the images the BatchNorm recalibration reads (whole batches; default: "
                        f"{RECALIBRATION_SAMPLES}, measured as good as 2048)")
    g.add_argument("--scope", default="auto", choices=SCOPES,
                   help="all: every group; inner: only channels no residual stream shares (block-internal, as "
                        "i-SpaSP's paper prunes); auto: inner for a --target-* the inner groups can meet keeping at "
                        "least half their channels, else all (default: auto)")


def add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a checkpoint that holds pickled Python objects (structprune 0.1 files of models "
                        "outside the zoo, a pytorch_model.bin that is more than tensors) or names a constructor "
                        "that is not an nn.Module class: loading such a file can run any code in it, so only for "
                        "files from a source you trust (default: refused)")


def add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output checkpoint (.pt); a JSON report is written next to it")
    p.add_argument("--force", action="store_true", help="overwrite --out and its report if they exist")


# -- what the options become -------------------------------------------------------------------------------------

def device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StructPruneError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise StructPruneError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None


def train_config(args, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                       schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs,
                       label_smoothing=args.label_smoothing)


def recovery(args) -> dict:
    """The recovery options of :func:`structprune.prune`."""
    return {"refit": args.refit, "reconstruct": args.reconstruct, "recalibrate": args.recalibrate,
            "recovery_samples": args.recovery_samples, "recalibration_samples": args.recalibration_samples,
            "scope": args.scope}


def add_measured_widths(g) -> None:
    g.add_argument("--measured-widths", type=positive, default=None, metavar="N",
                   help="with --allocation error: measure the network's error at N of each group's 16 candidate "
                        "widths (one forward pass over 256 calibration samples each) and follow the refit's "
                        "least-squares error between them: about 16/N times faster (default: every width)")


def measured_widths(args) -> int | None:
    """--measured-widths, refused (before any work) without --allocation error."""
    if args.measured_widths is not None and args.allocation != "error":
        raise StructPruneError("--measured-widths goes with --allocation error")
    return args.measured_widths


def budget(args) -> Budget:
    targets = [(m, v) for m, v in (("flops", args.target_flops), ("params", args.target_params),
                                   ("latency", args.target_latency)) if v is not None]
    if len(targets) > 1:
        raise StructPruneError("give only one of --target-flops, --target-params and --target-latency")
    if targets:
        if args.ratio is not None or args.layer_ratio:
            raise StructPruneError("--ratio/--layer-ratio and --target-flops/--target-params/--target-latency "
                                   "exclude each other")
        metric, fraction = targets[0]
        return Target(fraction, metric, args.allocation, delta=args.delta, batch=args.latency_batch,
                      measured_widths=measured_widths(args))
    if args.allocation != "uniform":
        raise StructPruneError(f"--allocation {args.allocation} needs --target-flops, --target-params or "
                               f"--target-latency")
    if args.layer_ratio:
        return PerLayer(dict(args.layer_ratio), 1.0 if args.ratio is None else args.ratio)
    return Uniform(0.5 if args.ratio is None else args.ratio)


def method_options(args) -> dict:
    """--option KEY=VALUE as the method's keyword options, validated before any data is read."""
    options = dict(args.option)
    try:
        get_method(args.method, **options)
    except StructPruneError as exc:
        raise StructPruneError(f"--option: {exc}") from None
    return options


def add_distill(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The distillation options (``prefix``: prune's --distill-steps names its run length itself)."""
    g = p.add_argument_group("distillation")
    if not prefix:
        length = g.add_mutually_exclusive_group()
        length.add_argument("--epochs", type=positive, default=None,
                            help="passes over the data (default: 1)")
        length.add_argument("--steps", type=positive, default=None,
                            help="optimizer steps instead of epochs")
    g.add_argument(f"--{prefix}optimizer", default="auto", choices=OPTIMIZERS,
                   help="auto: AdamW for transformers, SGD (Nesterov momentum 0.9) otherwise (default: auto)")
    g.add_argument(f"--{prefix}lr", type=float, default=None,
                   help="peak learning rate (default: SGD 0.02, AdamW 1e-4)")
    g.add_argument(f"--{prefix}weight-decay", type=float, default=None,
                   help="on conv/linear weights only (default: SGD 5e-4, AdamW 0.01)")
    g.add_argument(f"--{prefix}warmup", type=float, default=0.05,
                   help="share of the steps with a linear warm-up, then a cosine to 0 (default: 0.05)")
    g.add_argument(f"--{prefix}temperature", type=float, default=1.0,
                   help="temperature T of the KL divergence (default: 1)")
    g.add_argument(f"--{prefix}alpha", type=float, default=0.0,
                   help="weight of the cross-entropy with the data's labels mixed in, in [0, 1] (default: 0: "
                        "no labels used)")
    g.add_argument(f"--{prefix}loss", default="auto", choices=LOSSES,
                   help="kl, cosine, mse, or auto: kl for logits, cosine for hidden states, mse otherwise "
                        "(default: auto)")
    g.add_argument(f"--{prefix}max-grad-norm", type=float, default=None,
                   help="clip the gradient to this norm (default: SGD none, AdamW 1.0)")
    g.add_argument(f"--{prefix}accumulate", type=positive, default=1,
                   help="batches whose gradients make one optimizer step (default: 1)")
    g.add_argument(f"--{prefix}match", action="append", default=[], metavar="LAYER",
                   help="also match this layer's outputs to the teacher's (a name or fnmatch pattern, repeatable; "
                        "layers whose width the pruning kept, e.g. 'model.layers.*' of a transformer)")
    g.add_argument(f"--{prefix}match-weight", type=float, default=1.0,
                   help="weight of the layers' relative squared error beside the output loss (default: 1)")
    g.add_argument(f"--{prefix}teacher-cache", default=None, metavar="FILE",
                   help="keep the teacher's outputs on every training sample in FILE: computed in one pass, then "
                        "read instead of running the teacher (images and tensors, not padded text; a file of "
                        "another teacher or data is refused)")
    g.add_argument(f"--{prefix}dropout", action="store_true",
                   help="train with the student's dropout on (default: off, only BatchNorm layers in train mode, so "
                        "the student learns the teacher's function without noise)")
    g.add_argument(f"--{prefix}autocast", default="auto", choices=AUTOCAST,
                   help="forward passes in bf16 under torch.autocast; auto: bf16 on a GPU that has it, else "
                        "off (default: auto)")


def distill_config(args, prefix: str = "", steps: int | None = None) -> DistillConfig:
    """The DistillConfig of the options :func:`add_distill` added (with ``prefix``: a run of ``steps``)."""
    dest = prefix.replace("-", "_")
    value = {k: getattr(args, f"{dest}{k}") for k in ("optimizer", "lr", "weight_decay", "warmup", "temperature",
                                                         "alpha", "loss", "max_grad_norm", "accumulate", "autocast",
                                                         "dropout", "match_weight")}
    value["match"] = tuple(getattr(args, f"{dest}match"))
    if not prefix:
        steps = args.steps
    epochs = getattr(args, "epochs", None) or (1 if steps is None else 1_000_000)
    return DistillConfig(epochs=epochs, steps=steps, **value)
