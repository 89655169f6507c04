"""Label-free recovery: train the pruned model (the student) to match the dense model (the teacher).

The loss follows what the model outputs (``loss="auto"``), and is stated in the result:

* logits — a tensor (N, classes), a tensor (N, tokens, vocabulary) or a Hugging Face output's ``logits`` —
  the Kullback-Leibler divergence KL(softmax(t/T) ‖ softmax(s/T))·T² over the last dimension, summed over the
  samples (over the real tokens of a causal language model: padding, ``attention_mask`` 0, is left out);
* hidden states — a Hugging Face encoder's ``last_hidden_state`` — 1 − the cosine similarity of the student's
  and the teacher's vector at every real token;
* anything else: the mean squared error.

Where the batches carry labels, ``alpha`` mixes in the cross-entropy with them: (1 − α)·distillation + α·CE
(α = 0 by default: no labels needed). The teacher runs in eval mode without gradients. The student's BatchNorm
layers train (their statistics follow the pruned activations); its dropout stays off unless ``dropout=True``, so
that it learns the function the teacher computes rather than a noisy one.

The loop is :func:`structprune.finetune.optimize`'s: the same resume (the state after every epoch, beside the
output), progress and torchrun DDP (every process reads its share of the same global batches, the loss is
scaled to the global batch's mean: N processes train like one). Optimizer by model: AdamW for transformers
(a model with attention blocks structprune knows), SGD with Nesterov momentum otherwise; a cosine schedule
with linear warm-up, gradient clipping, bf16 autocast on GPUs that support it, gradient accumulation.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import run_forward
from .errors import StructPruneError, first_line
from .finetune import Indexed, Process, Run, ShardedBatches, init_distributed, optimize, parameter_groups
from .progress import bar as progress_bar
from .run_state import RunState
from .safe_io import load_tensors, write_atomic

LOSSES = ("auto", "kl", "cosine", "mse")
OPTIMIZERS = ("auto", "sgd", "adamw")
AUTOCAST = ("auto", "bf16", "off")  # no fp16: it needs loss scaling, which bf16 does not
CACHE_FORMAT = "structprune-teacher-outputs"
#: learning rate and weight decay by optimizer, when not given
DEFAULTS = {"sgd": {"lr": 0.02, "weight_decay": 5e-4, "max_grad_norm": None},
            "adamw": {"lr": 1e-4, "weight_decay": 0.01, "max_grad_norm": 1.0}}


@dataclass(frozen=True)
class DistillConfig:
    """Options of :func:`distill`; None means the optimizer's default (:data:`DEFAULTS`).

    epochs: passes over the data. steps: optimizer steps instead (the run stops after this many).
    optimizer: "sgd" (Nesterov momentum), "adamw", or "auto" (AdamW for transformers, else SGD).
    lr: peak learning rate (SGD 0.02, AdamW 1e-4). weight_decay: on conv/linear weights only (SGD 5e-4, AdamW
        0.01). momentum: SGD's.
    warmup: the share of the steps over which the learning rate rises linearly from lr/10, then a cosine to 0.
    temperature: T of the KL loss. alpha: the weight of the cross-entropy with the batches' labels (0: none).
    loss: "kl", "cosine", "mse" or "auto" (by output, see the module docstring).
    max_grad_norm: gradient clipping (SGD: none, AdamW: 1.0). accumulate: batches per optimizer step.
    autocast: "bf16" forward passes under torch.autocast, "off", or "auto" (bf16 on a GPU that has it).
    dropout: the student trains in train mode (its dropout, attention dropout and stochastic depth active); by
        default only its BatchNorm layers do (their statistics follow the pruned activations) and the rest runs as
        in eval mode, so that the student learns the function the teacher computes, without noise.
    match: names of layers (fnmatch patterns) whose outputs the student also matches to the teacher's, where the
        pruning kept their width (a transformer's layers, a ResNet's blocks with scope="inner"): the mean squared
        error relative to the teacher's mean square, averaged over the layers, weighted by ``match_weight``.
    """

    epochs: int = 1
    steps: int | None = None
    optimizer: str = "auto"
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    warmup: float = 0.05
    temperature: float = 1.0
    alpha: float = 0.0
    loss: str = "auto"
    max_grad_norm: float | None = None
    accumulate: int = 1
    autocast: str = "auto"
    dropout: bool = False
    match: tuple[str, ...] = ()
    match_weight: float = 1.0

    def __post_init__(self):
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be a positive integer, got "
                                                                  f"{self.epochs!r}"),
            (self.steps is None or (isinstance(self.steps, int) and self.steps >= 1),
             f"steps must be a positive integer, got {self.steps!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                                           f"{self.optimizer!r}"),
            (self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.weight_decay is None or self.weight_decay >= 0, f"weight_decay must be >= 0, got "
                                                                  f"{self.weight_decay}"),
            (0 <= self.warmup < 1, f"warmup must be a share of the steps in [0, 1), got {self.warmup}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm must be positive, got "
                                                                   f"{self.max_grad_norm}"),
            (isinstance(self.accumulate, int) and self.accumulate >= 1, f"accumulate must be a positive integer, "
                                                                        f"got {self.accumulate!r}"),
            (self.autocast in AUTOCAST, f"autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}"),
            (isinstance(self.match, (tuple, list)) and all(isinstance(p, str) for p in self.match),
             f"match must be a tuple of layer names or patterns, got {self.match!r}"),
            (self.match_weight >= 0, f"match_weight must be >= 0, got {self.match_weight}"),
        ]
        for ok, message in checks:
            if not ok:
                raise StructPruneError(message)

    def resolved(self, model: nn.Module, device: torch.device) -> DistillConfig:
        """This configuration with every "auto" and None decided for ``model`` on ``device``."""
        optimizer = self.optimizer if self.optimizer != "auto" else ("adamw" if is_transformer(model) else "sgd")
        chosen = DEFAULTS[optimizer]
        autocast = self.autocast
        if autocast == "auto":
            autocast = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
        return replace(self, optimizer=optimizer, autocast=autocast,
                       lr=chosen["lr"] if self.lr is None else self.lr,
                       weight_decay=chosen["weight_decay"] if self.weight_decay is None else self.weight_decay,
                       max_grad_norm=chosen["max_grad_norm"] if self.max_grad_norm is None else self.max_grad_norm)

    def lr_factor(self, step: int, total: int) -> float:
        """Linear warm-up from 0.1 over ``warmup`` of the ``total`` steps, then a cosine to 0."""
        warmup = self.warmup * total
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1.0, total - warmup))))


@dataclass
class DistillResult:
    """What :func:`distill` did: the loss it minimised (by output kind), each epoch's mean loss, the optimizer
    steps taken, the configuration as resolved, and the seconds it took."""

    loss: str
    losses: list[float]
    steps: int
    config: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def is_transformer(model: nn.Module) -> bool:
    """A model with attention blocks: a transformers model or any module holding ``nn.MultiheadAttention``."""
    return any(type(m).__module__.startswith("transformers.") or isinstance(m, nn.MultiheadAttention)
               for m in model.modules())


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable, config: DistillConfig | None = None,
            device=None, progress: bool = True, state_path: str | os.PathLike | None = None,
            resume: bool = False, teacher_cache: str | os.PathLike | None = None) -> DistillResult:
    """Train ``student`` in place to reproduce ``teacher``'s outputs on ``batches``; returns a
    :class:`DistillResult`.

    batches: a re-iterable of inputs ``x``, ``(x, labels)`` or dicts of keyword inputs (tokenised text), with a
        length; under torchrun, a :class:`structprune.finetune.ShardedBatches` so that each process reads its
        share. Labels are used only with ``config.alpha`` > 0.
    state_path: where the run's state is written after every epoch (removed at the end); resume: continue from it.
    teacher_cache: a file for the teacher's outputs on every sample, computed once (one pass, in order) and read
        in every epoch and later runs instead of running the teacher (``batches`` a :class:`ShardedBatches` whose
        samples give outputs of one shape: images, not padded text); a file of another teacher or other data is
        refused.
    """
    config = config or DistillConfig()
    device = torch.device(device) if device is not None else next(student.parameters()).device
    config = config.resolved(student, device)
    if len(batches) == 0:
        raise StructPruneError("distill: no batches to train on")
    teacher = teacher.to(device).eval()
    cached = None
    if teacher_cache is not None:
        if config.match:
            raise StructPruneError("distill: a teacher cache keeps the teacher's outputs only, and match compares "
                                   "its layers' outputs too: use one or the other")
        cached = teacher_outputs(teacher, batches, teacher_cache, device, progress)
        batches = copy.copy(batches)
        batches.indices = True
    matcher = Matcher(student, teacher, config.match) if config.match else None
    loss = Loss(config, device, cached, matcher)
    optimizer = _optimizer(student, config)
    run = Run(config.epochs, config.steps, config.accumulate, config.max_grad_norm,
              torch.bfloat16 if config.autocast == "bf16" else None)
    total = run.total_steps(len(batches))
    state = None if state_path is None else RunState(state_path, asdict(config), "distillation")
    start = time.perf_counter()
    try:
        losses = optimize(student, batches, lambda net, batch: loss(net, teacher, batch), optimizer,
                          lambda step: config.lr_factor(step, total), run, device, progress=progress, state=state,
                          resume=resume, train_mode=nn.Module.train if config.dropout else _batchnorm_trains)
    finally:
        if matcher is not None:
            matcher.close()
    return DistillResult(loss.kind or config.loss, losses, total, asdict(config), time.perf_counter() - start)


def _batchnorm_trains(model: nn.Module) -> None:
    """Eval mode but for the BatchNorm layers, which train (their statistics update)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()


def _optimizer(model: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)


class Loss:
    """The distillation objective of one batch: (the summed loss, the number of units summed)."""

    def __init__(self, config: DistillConfig, device: torch.device, cached: Tensor | None = None,
                 matcher: Matcher | None = None):
        self.config, self.device, self.cached, self.matcher = config, device, cached, matcher
        self.kind: str | None = None  # what the first batch's outputs called for

    def __call__(self, student: nn.Module, teacher: nn.Module, batch) -> tuple[Tensor, Tensor]:
        indices = None
        if isinstance(batch, Indexed):
            indices, batch = batch.indices, batch.batch
        inputs, labels = _inputs_and_labels(batch, self.device)
        if self.cached is not None:
            t = self.cached[indices].to(self.device)
        else:
            with torch.no_grad():
                t, _ = _prediction(run_forward(teacher, inputs))
        s, kind = _prediction(run_forward(student, inputs))
        if s.shape != t.shape:
            raise StructPruneError(f"distill: the student outputs {tuple(s.shape)} but the teacher "
                                   f"{tuple(t.shape)}; the teacher must be the model the student was pruned from")
        kind = kind if self.config.loss == "auto" else self.config.loss
        self.kind = self.kind or kind
        mask = _token_mask(inputs, s)
        total, count = _LOSSES[kind](s.float(), t.float(), mask, self.config.temperature)
        if self.config.alpha > 0:
            if labels is None or s.dim() != 2:
                raise StructPruneError("distill: alpha > 0 mixes in the cross-entropy with labels, but the batches "
                                       "have none (or the model does not output class logits); use alpha=0")
            ce = F.cross_entropy(s.float(), labels, reduction="sum")
            total = (1 - self.config.alpha) * total + self.config.alpha * ce
        if self.matcher is not None:  # a per-sample term, brought to the loss's units
            total = total + self.config.match_weight * count / s.shape[0] * self.matcher.loss()
        return total, count


class Matcher:
    """The outputs of the layers named by ``patterns`` in the student and the teacher, recorded by forward hooks;
    :meth:`loss` compares them."""

    def __init__(self, student: nn.Module, teacher: nn.Module, patterns: Sequence[str]):
        mine = dict(student.named_modules())
        theirs = dict(teacher.named_modules())
        self.names = [n for n in mine if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in self.names)]
        if missing:
            raise StructPruneError(f"distill: match {missing[0]!r} names no layer of the student")
        absent = [n for n in self.names if n not in theirs]
        if absent:
            raise StructPruneError(f"distill: match: the teacher has no layer {absent[0]!r}")
        self.outputs: dict[tuple[str, str], Tensor] = {}
        self.hooks = [modules[name].register_forward_hook(self._record(side, name))
                      for side, modules in (("student", mine), ("teacher", theirs)) for name in self.names]

    def close(self) -> None:
        """Remove the hooks (the models are as they were)."""
        for hook in self.hooks:
            hook.remove()
        self.outputs.clear()

    def _record(self, side: str, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            if isinstance(output, Tensor):
                self.outputs[(side, name)] = output
        return hook

    def loss(self) -> Tensor:
        """Σ over samples of the mean over layers of ‖s − t‖² / ‖t‖² (per sample)."""
        terms = []
        for name in self.names:
            s, t = self.outputs.pop(("student", name), None), self.outputs.pop(("teacher", name), None)
            if s is None or t is None:
                raise StructPruneError(f"distill: match: {name!r} gave no tensor in this forward pass")
            if s.shape != t.shape:
                raise StructPruneError(f"distill: match: {name!r} outputs {tuple(s.shape)} in the student but "
                                       f"{tuple(t.shape)} in the teacher; match layers whose width the pruning kept")
            s, t = s.float().reshape(s.shape[0], -1), t.detach().float().reshape(t.shape[0], -1)
            terms.append((s - t).pow(2).mean(dim=1) / t.pow(2).mean(dim=1).clamp(min=1e-8))
        return torch.stack(terms).mean(dim=0).sum()


def teacher_outputs(teacher: nn.Module, batches, path: str | os.PathLike, device, progress: bool = True) -> Tensor:
    """The teacher's output on every sample of ``batches.dataset``, in order: read from ``path`` when it holds
    them for this teacher and these samples, else computed in one pass and written there (rank 0 of a torchrun
    job; the others wait for it)."""
    if not isinstance(batches, ShardedBatches):
        raise StructPruneError("distill: a teacher cache needs ShardedBatches (it knows each sample's position)")
    path = Path(path)
    fingerprint = _fingerprint(teacher, batches.dataset)
    proc = init_distributed(device)
    if proc.is_main and not path.exists():
        ordered = ShardedBatches(batches.dataset, batches.batch_size, shuffle=False, proc=Process(),
                                 collate=batches.collate)
        outputs = []
        with torch.no_grad():
            for batch in progress_bar(ordered, desc="teacher outputs", unit="batches", enabled=progress):
                inputs, _ = _inputs_and_labels(batch, device)
                outputs.append(_prediction(run_forward(teacher, inputs))[0].float().cpu())
        if len({tuple(o.shape[1:]) for o in outputs}) > 1:
            raise StructPruneError("distill: the teacher's outputs differ in shape between batches (padded text?); "
                                   "run without a teacher cache")
        cache = {"format": CACHE_FORMAT, "fingerprint": json.dumps(fingerprint), "outputs": torch.cat(outputs)}
        write_atomic(path, lambda tmp: torch.save(cache, tmp), force=True)
    if proc.distributed:
        dist.barrier()
    raw = load_tensors(path, what="teacher cache", advice="Delete it to compute it again.")
    if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
        raise StructPruneError(f"distill: {path} is not a teacher cache; name another file")
    if json.loads(raw["fingerprint"]) != fingerprint:
        raise StructPruneError(f"distill: {path} holds the outputs of another teacher or other data; delete it or "
                               f"name another file")
    return raw["outputs"]


def _fingerprint(teacher: nn.Module, dataset) -> dict:
    """What a teacher cache is for: the teacher's parameters (count and sum) and the data (size, first and last
    sample)."""
    def total(sample) -> float:
        tensors = [t for t in (sample if isinstance(sample, (tuple, list)) else [sample]) if isinstance(t, Tensor)]
        return round(float(sum(t.double().sum() for t in tensors)), 6)

    with torch.no_grad():
        weights = round(float(sum(p.double().sum() for p in teacher.parameters())), 6)
    return {"parameters": sum(p.numel() for p in teacher.parameters()), "sum": weights, "samples": len(dataset),
            "first": total(dataset[0]), "last": total(dataset[len(dataset) - 1])}


def _inputs_and_labels(batch, device) -> tuple[object, Tensor | None]:
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items() if k != "labels"}
        return inputs, None
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise StructPruneError("distill: a batch is empty")
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) and not batch[1].is_floating_point() \
            else None
        return batch[0].to(device), None if labels is None else labels.to(device)
    if isinstance(batch, Tensor):
        return batch.to(device), None
    raise StructPruneError(f"distill: batches must be tensors, (inputs, labels) pairs or dicts of tensors; got "
                           f"{type(batch).__name__}")


def _prediction(output) -> tuple[Tensor, str]:
    """The tensor to match in a model's output and the loss it calls for."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits, "kl"
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden, "cosine"
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        output = output[0]
    if isinstance(output, Tensor):
        return output, "kl" if output.dim() in (2, 3) else "mse"
    raise StructPruneError(f"distill: cannot read a tensor from the model's output ({type(output).__name__})")


def _token_mask(inputs, prediction: Tensor) -> Tensor | None:
    """(N, tokens) of 1 at real tokens where the inputs carry an attention mask and the output is per token."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None or prediction.dim() < 3 or tuple(mask.shape) != tuple(prediction.shape[:2]):
        return None
    return mask.to(prediction.dtype)


def _summed(per_unit: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The sum over units (samples, or real tokens) of a per-unit loss, and how many units there are."""
    if mask is not None:
        return (per_unit * mask).sum(), mask.sum()
    return per_unit.sum(), torch.tensor(float(per_unit.numel()), device=per_unit.device)


def _kl(s: Tensor, t: Tensor, mask: Tensor | None, temperature: float) -> tuple[Tensor, Tensor]:
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    per_unit = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * temperature ** 2
    return _summed(per_unit, mask)


def _cosine(s: Tensor, t: Tensor, mask: Tensor | None, _temperature: float) -> tuple[Tensor, Tensor]:
    return _summed(1 - F.cosine_similarity(s, t, dim=-1), mask)


def _mse(s: Tensor, t: Tensor, mask: Tensor | None, _temperature: float) -> tuple[Tensor, Tensor]:
    per_unit = (s - t).pow(2).reshape(s.shape[0], -1).mean(dim=1)
    return _summed(per_unit, None)


_LOSSES = {"kl": _kl, "cosine": _cosine, "mse": _mse}


def check_pair(student: nn.Module, teacher: nn.Module, example_inputs) -> None:
    """The teacher must accept the student's inputs and give outputs of the same shape: a one-line error if not."""
    try:
        with torch.no_grad():
            s, _ = _prediction(run_forward(student.eval(), example_inputs))
            t, _ = _prediction(run_forward(teacher.eval(), example_inputs))
    except StructPruneError:
        raise
    except Exception as exc:
        raise StructPruneError(f"distill: the teacher does not run on the student's inputs ({first_line(exc)})") \
            from None
    if s.shape != t.shape:
        raise StructPruneError(f"distill: the student outputs {tuple(s.shape)} but the teacher {tuple(t.shape)}; the "
                               f"teacher must be the model the student was pruned from")
