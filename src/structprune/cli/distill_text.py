"""``structprune distill DIR``: a pruned Hugging Face model directory trained to match its dense model on text.
A causal language model matches the teacher's next-token distributions (KL over the vocabulary at every real
token) and is judged by held-out perplexity; an encoder matches the last hidden states (cosine at every real
token) and is judged by the cosine similarity of its sentence embeddings to the teacher's."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.data import Dataset

from ..data import text
from ..distill import check_pair, distill
from ..errors import StructPruneError
from ..finetune import ShardedBatches
from ..models import hf
from . import common, options

DEFAULT_MAX_LENGTH = 128


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Hugging Face model directories")
    options.add_text(g, "to train on and judge with", "80%% trains, 20%% is held out")
    g.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per sentence at most (default: {DEFAULT_MAX_LENGTH})")


class Sentences(Dataset):
    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]


def run(args) -> int:
    given = [flag for flag, value in (("--data", args.data), ("--image-size", args.image_size),
                                      ("--data-dir", args.data_dir)) if value is not None]
    if given:
        raise StructPruneError(f"{given[0]}: a Hugging Face model directory trains on --text, not on --data")
    out, report_path = common.check_outputs(args, args.checkpoint, args.teacher, directory=True)
    state = common.run_state(args, out)
    settings = options.distill_config(args)
    device = common.training_device(args)
    student = common.hf_model(args.checkpoint, args.trust_checkpoint).to(device)
    teacher_path = args.teacher or _recorded_teacher(Path(args.checkpoint))
    teacher = common.hf_model(teacher_path, args.trust_checkpoint).to(device)
    tokenizer = tokenizer_of(args.checkpoint, teacher_path)
    max_length = min(args.max_length or DEFAULT_MAX_LENGTH, common.max_positions(student))
    train_text, held_out = text.split(text.read(args.text), seed=args.seed)
    train_text = train_text[:args.limit]
    test = text.TokenBatches(held_out[:args.eval_limit], tokenizer, args.batch_size, max_length, device)
    check_pair(student, teacher, next(iter(test)))
    metric, judge = common.text_metric(teacher, test)
    causal = metric == "perplexity"
    before = judge(student)
    result = on_text(student, teacher, train_text, tokenizer, max_length, args, settings, device,
                     state_path=state.path, resume=args.resume, teacher_cache=args.teacher_cache)
    after = judge(student)
    report = {"command": "distill", "hf_model": str(args.checkpoint), "teacher": str(Path(teacher_path).resolve()),
              "text": args.text or str(text.FORTUNES), "train_sentences": len(train_text),
              "held_out_sentences": len(test.texts), "max_length": max_length, **result.to_dict(), "metric": metric,
              f"{metric}_before": before, f"{metric}_after": after}
    if causal:
        report["teacher_perplexity"] = judge(teacher)
    hf.save_pretrained(student.cpu(), out, force=args.force, tokenizer=tokenizer, extra={"report": report})
    common.write_json(report_path, report, args.force)
    says = (f"held-out perplexity {before:.3f} -> {after:.3f} (teacher {report['teacher_perplexity']:.3f})" if causal
            else f"embedding cosine similarity to the teacher {before:.4f} -> {after:.4f}")
    print(f"distilled {result.steps} steps ({result.loss} loss): {says} on {len(test.texts)} held-out sentences in "
          f"{result.seconds:.1f}s -> {out}")
    return 0


def on_text(student, teacher, texts: list[str], tokenizer, max_length: int, args, settings, device, **run):
    """Distil ``student`` towards ``teacher`` on ``texts`` in batches of ``args.batch_size`` sentences (shuffled by
    ``args.seed``), each tokenized to at most ``max_length`` tokens; ``run``: distill's resume and cache options."""
    batches = ShardedBatches(Sentences(texts), args.batch_size, seed=args.seed,
                             collate=lambda batch: tokenizer(batch, padding=True, truncation=True,
                                                             max_length=max_length, return_tensors="pt"))
    return distill(student, teacher, batches, settings, device=device, progress=not args.no_progress, **run)


def _recorded_teacher(directory: Path) -> str:
    """The dense model directory a pruned one records (its structprune.json), or an error naming --teacher."""
    report = common.recorded_report(directory)
    recorded = report.get("teacher") or report.get("hf_model")
    if report.get("command") not in ("prune", "distill") or not recorded:
        raise StructPruneError(f"{directory} records no model it was pruned from; give the dense model with "
                               f"--teacher DIR")
    for path in (Path(recorded), directory.parent / recorded):
        if (path / "config.json").is_file():
            return str(path)
    raise StructPruneError(f"{directory} was pruned from {recorded}, which is not there any more; give the dense "
                           f"model with --teacher DIR")


def tokenizer_of(*directories: str):
    transformers = hf.transformers_module()
    for directory in directories:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        except Exception:
            continue
        if tokenizer.pad_token is None:  # GPT-2 and Llama tokenizers have none; padding is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer
    raise StructPruneError(f"{directories[0]}: no usable tokenizer there"
                           + (" (nor in the teacher's directory)" if len(directories) > 1 else ""))
