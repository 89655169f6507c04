"""``structprune eval DIR [DIR ...] --text``: Hugging Face model directories judged on the held-out 20% of a text
(the split prune and distill use), by what they are: causal language models by their sliding-window perplexity over
the held-out sentences joined into one text, any other model by the cosine similarity of its sentence embeddings to
the first directory's."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import measure, progress
from ..data import text
from ..errors import StructPruneError
from ..models import hf
from . import common, distill_text, options

DEFAULT_SEQ_LEN = 512


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Hugging Face model directories (instead of checkpoints)")
    options.add_text(g, "to judge on", "its held-out 20%% (the split prune and distill use, --seed) is read")
    options.add_dtype(g)
    g.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help=f"causal LMs: tokens per perplexity window (default: {DEFAULT_SEQ_LEN}, at most what the "
                        f"model reads)")
    g.add_argument("--stride", type=int, default=None, metavar="N",
                   help="causal LMs: tokens between window starts; each token is predicted once, with at least "
                        "seq-len - stride tokens of context after the first window (default: half of --seq-len)")


def applies(args) -> bool:
    """Whether ``eval`` goes this way: a model directory given, or one of this path's options."""
    return (any(is_model_directory(p) for p in args.checkpoints)
            or any(getattr(args, o) is not None for o in ("text", "seq_len", "stride"))
            or args.dtype != "auto")


def is_model_directory(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def run(args, json_path: Path | None) -> int:
    _refuse_checkpoint_options(args)
    rows, first = [], None
    held_out = text.split(text.read(args.text), seed=args.seed)[1][:args.limit]
    for path in args.checkpoints:
        model = common.hf_model(path, args.trust_checkpoint, args.dtype).to(options.device(args.device))
        causal = hf.is_causal_lm(model)
        if first is None:
            first = _judge(model, path, held_out, args) if causal else _Embeddings(model, path, held_out, args)
        elif causal != isinstance(first, _Perplexity):
            raise StructPruneError(f"{path}: a {'causal language model' if causal else 'non-causal model'} after "
                                   f"{args.checkpoints[0]}, which is not one: evaluate each kind in its own call")
        rows.append({"model": str(path), "params": sum(p.numel() for p in model.parameters()),
                     first.metric: first(model, path)})
    _print(rows, first)
    if json_path is not None:
        common.write_json(json_path, {"command": "eval", "text": args.text or str(text.FORTUNES), "metric":
                                      first.metric, "held_out_sentences": len(held_out), **first.settings,
                                      "rows": rows}, args.force)
    return 0


def _refuse_checkpoint_options(args) -> None:
    not_directories = [p for p in args.checkpoints if not is_model_directory(p)]
    if not_directories or not args.checkpoints:
        what = f"{not_directories[0]}: not a Hugging Face model directory (no config.json)" if not_directories \
            else "no model directory given"
        raise StructPruneError(f"{what}; --text, --seq-len, --stride and --dtype evaluate model directories, one "
                               f"kind per call (checkpoints are evaluated on --data)")
    given = [flag for flag, dest in (("--data", "data"), ("--data-dir", "data_dir"), ("--image-size", "image_size"),
                                     ("--model", "model"), ("--weights", "weights"))
             if getattr(args, dest, None) is not None]
    if given:
        raise StructPruneError(f"{given[0]}: Hugging Face model directories are evaluated on --text, not on it")


def _judge(model, path, held_out: list[str], args):
    seq_len = min(args.seq_len or DEFAULT_SEQ_LEN, common.max_positions(model))
    if args.seq_len is not None and args.seq_len < 2:
        raise StructPruneError(f"--seq-len must be at least 2, got {args.seq_len}")
    stride = args.stride if args.stride is not None else max(1, seq_len // 2)
    if not 0 < stride <= seq_len:
        raise StructPruneError(f"--stride must be in [1, --seq-len = {seq_len}], got {stride}")
    return _Perplexity(path, held_out, seq_len, stride, not args.no_progress)


class _Perplexity:
    metric = "perplexity"

    def __init__(self, path, held_out: list[str], seq_len: int, stride: int, progress: bool):
        self.text, self.seq_len, self.stride, self.progress = "\n\n".join(held_out), seq_len, stride, progress
        self.settings = {"seq_len": seq_len, "stride": stride}
        self.first_tokenizer = path

    def __call__(self, model, path) -> float:
        tokenizer = distill_text.tokenizer_of(path, self.first_tokenizer)
        ids = tokenizer(self.text, return_tensors="pt")["input_ids"][0]
        self.settings["tokens"] = len(ids)
        bars = []

        def step(_done: int, total: int) -> None:
            if not bars:
                bars.append(progress.bar(total=total, desc=f"perplexity of {path}", unit="window",
                                         enabled=self.progress))
            bars[0].update(1)

        try:
            return measure.sliding_perplexity(model, ids, self.seq_len, self.stride, progress=step)
        finally:
            for bar in bars:
                bar.close()


class _Embeddings:
    def __init__(self, model, path, held_out: list[str], args):
        max_length = min(distill_text.DEFAULT_MAX_LENGTH, common.max_positions(model))
        batches = text.TokenBatches(held_out, distill_text.tokenizer_of(path), args.batch_size, max_length,
                                    next(model.parameters()).device)
        self.metric, self.judge = common.text_metric(model, batches)  # the one prune and distill report
        self.settings = {"max_length": max_length, "reference": str(path)}

    def __call__(self, model, _path) -> float:
        return self.judge(model)


def _print(rows: list[dict], judge) -> None:
    name = "perplexity" if judge.metric == "perplexity" else f"embedding cosine to {rows[0]['model']}"
    lines = [f"| model | params | {name} |", "|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['params']:,} ({r['params'] / rows[0]['params']:.1%}) | {r[judge.metric]:.4f} |"
              for r in rows]
    print("\n".join(lines))
