"""Training and fine-tuning: SGD (momentum, Nesterov), cosine or step schedule with linear warm-up,
label smoothing, weight decay on Conv/Linear weights only, a checkpoint after every epoch and resume.

Resuming from the state file continues with the same learning rate, optimizer momentum, data order
and random state, so an interrupted run ends with the same weights as an uninterrupted one.

Distributed data parallel: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment),
:func:`train` joins the process group (nccl on CUDA, gloo on the CPU) and wraps the model in
``DistributedDataParallel``. With :class:`ShardedBatches` every process reads its share of the same
*global* batches a single process would read (same seed, same order), and the loss is scaled so
that the averaged gradient is the gradient of the global batch's mean loss: N processes train like
one, up to floating point. (BatchNorm statistics stay per process, as in plain DDP, so models with
BatchNorm match only approximately.) Only rank 0 shows progress and writes the state file.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from .errors import StructPruneError, first_line
from .progress import bar as progress_bar
from .run_state import RunState

_NO_DECAY = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of :func:`train`.

    epochs: passes over the data. lr: peak learning rate. momentum, nesterov: SGD's.
    weight_decay: on Conv/Linear weights (none on biases and normalisation layers).
    schedule: "cosine" (to zero at the end) or "step" (× ``gamma`` at each of ``milestones``, given as
        fractions of the run, default halfway and three quarters).
    warmup_epochs: linear warm-up from lr/10 over this many epochs (may be fractional).
    label_smoothing: of the cross-entropy loss.
    """

    epochs: int = 3
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise StructPruneError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if not self.lr > 0:
            raise StructPruneError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise StructPruneError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in ("cosine", "step"):
            raise StructPruneError(f"schedule must be 'cosine' or 'step', got {self.schedule!r}")
        if self.warmup_epochs < 0:
            raise StructPruneError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise StructPruneError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step``."""
        total = max(1, self.epochs * steps_per_epoch)
        warmup = self.warmup_epochs * steps_per_epoch
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return self.gamma ** sum(step >= m * total for m in self.milestones)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on Conv/Linear weights only; none on biases or normalisation layers (by module type). A
    parameter several modules share (tied embeddings) is in one group once, as the first module that holds it
    says."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if isinstance(module, _NO_DECAY) or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class Process:
    """This process's place in a (torchrun) job: rank 0 of 1 when not distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process() -> Process:
    """The rank, world size and local rank torchrun sets in the environment (rank 0 of 1 otherwise)."""
    try:
        return Process(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise StructPruneError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None


def init_distributed(device: torch.device) -> Process:
    """Join torchrun's process group (nccl for CUDA, gloo for the CPU) if launched by it; idempotent."""
    proc = process()
    if proc.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return proc


def cuda_device_for(proc: Process) -> torch.device:
    """One GPU per process on a node: cuda:LOCAL_RANK."""
    return torch.device("cuda", proc.local_rank)


class ShardedBatches:
    """Shuffled batches of a dataset, the same global batches in every process, each process reading
    its share (samples ``rank::world`` of each global batch).

    The order is a function of ``seed`` and the epoch (:meth:`set_epoch`), so a resumed run reads what
    the uninterrupted one would have. A last global batch with fewer samples than processes is dropped.
    ``collate`` makes a batch of a process's samples (default: torch's ``default_collate``; text: a tokenizer).
    With ``indices`` set, each batch comes as :class:`Indexed`: the samples' positions in the dataset beside it.
    """

    indices = False

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 proc: Process | None = None, collate: Callable[[list], object] | None = None):
        if batch_size < 1:
            raise StructPruneError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.collate = collate
        self.proc = proc or process()
        if batch_size < self.proc.world:
            raise StructPruneError(f"the global batch size {batch_size} is smaller than the {self.proc.world} "
                                   f"processes; give --batch-size >= {self.proc.world}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[Tensor]:
        n = len(self.dataset)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
                 if self.shuffle else torch.arange(n))
        batches = list(order.split(self.batch_size))
        return [b for b in batches if len(b) >= self.proc.world]

    def __len__(self) -> int:
        return len(self._global_batches())

    def __iter__(self):
        for batch in self._global_batches():
            mine = batch[self.proc.rank::self.proc.world]
            if isinstance(self.dataset, TensorDataset) and self.collate is None:
                batch = tuple(t[mine] for t in self.dataset.tensors)
            else:
                batch = (self.collate or default_collate)([self.dataset[int(i)] for i in mine])
            yield Indexed(mine, batch) if self.indices else batch


@dataclass(frozen=True)
class Indexed:
    """A batch and the positions of its samples in the dataset (:attr:`ShardedBatches.indices`)."""

    indices: Tensor
    batch: object


def train(model: nn.Module, loader: Iterable, config: TrainConfig, device=None, progress: bool = True,
          state_path: str | os.PathLike | None = None, resume: bool = False) -> list[float]:
    """Train ``model`` in place; returns the mean loss of each epoch.

    state_path: where to write the training state (weights, optimizer, schedule, random state) after
        every epoch; removed when training ends.
    resume: continue from ``state_path`` if it exists (the model must have the same structure).

    Under torchrun the model is trained with DistributedDataParallel (see the module docstring); give a
    :class:`ShardedBatches` loader so that each process reads its share of the data.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    optimizer = torch.optim.SGD(parameter_groups(model, config.weight_decay), lr=config.lr,
                                momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0)
    steps_per_epoch = max(1, len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing, reduction="sum")

    def objective(net: nn.Module, batch) -> tuple[Tensor, int]:
        inputs, targets = batch
        return criterion(net(inputs.to(device)), targets.to(device)), len(targets)

    state = RunState(state_path, asdict(config), "training") if state_path is not None else None
    return optimize(model, loader, objective, optimizer, lambda step: config.lr_factor(step, steps_per_epoch),
                    Run(config.epochs), device, progress=progress, state=state, resume=resume)


@dataclass(frozen=True)
class Run:
    """How long :func:`optimize` runs and how it takes a step.

    epochs: passes over the data; steps: optimizer steps at the most (None: every batch of every epoch).
    accumulate: batches whose gradients make one step (the mean of their mean losses).
    max_grad_norm: the gradient is clipped to this norm before each step (None: not clipped).
    autocast: the dtype the forward pass runs in under ``torch.autocast`` (None: the model's own).
    """

    epochs: int
    steps: int | None = None
    accumulate: int = 1
    max_grad_norm: float | None = None
    autocast: torch.dtype | None = None

    def steps_per_epoch(self, batches: int) -> int:
        return max(1, -(-batches // self.accumulate))

    def total_steps(self, batches: int) -> int:
        every = self.epochs * self.steps_per_epoch(batches)
        return every if self.steps is None else min(self.steps, every)


Objective = Callable[[nn.Module, object], tuple[Tensor, "Tensor | int"]]


def optimize(model: nn.Module, loader: Iterable, objective: Objective, optimizer: torch.optim.Optimizer,
             lr_factor: Callable[[int], float], run: Run, device: torch.device, progress: bool = True,
             state: RunState | None = None, resume: bool = False,
             train_mode: Callable[[nn.Module], object] = nn.Module.train) -> list[float]:
    """The training loop :func:`train` and :func:`structprune.distill.distill` share; returns each epoch's mean loss.

    ``objective(net, batch)`` returns (the summed loss of the batch, the number of units summed: samples or
    tokens); every process scales its sum by the global count so that the averaged gradient is that of the
    global batch's mean. ``lr_factor(step)`` multiplies the optimizer's learning rates at optimizer step
    ``step``. The state (weights, optimizer, schedule, random state) is saved to ``state`` after every epoch and
    removed at the end; ``resume`` continues from it. ``train_mode(model)`` puts the model in the mode it trains
    in (default: ``model.train()``); it is in eval mode at the end.
    """
    proc = init_distributed(device)
    net = model
    if proc.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    total_steps = run.total_steps(len(loader))
    losses: list[float] = []
    first_epoch = 0
    saved = state.load() if resume and state is not None else None
    if saved is not None:
        first_epoch, losses = _restore(state.path, saved, model, optimizer, schedule, loader)
    train_mode(model)
    for epoch in range(first_epoch, run.epochs):
        if schedule.last_epoch >= total_steps:
            break
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        bar = progress_bar(loader, desc=f"epoch {epoch + 1}/{run.epochs}", unit="batches", leave=False,
                           enabled=progress and proc.is_main)
        losses.append(_epoch(net, model, bar, len(loader), objective, optimizer, schedule, run, total_steps, proc,
                             device, epoch))
        bar.close()
        if state is not None:
            if proc.is_main:
                _save(state, epoch + 1, losses, model, optimizer, schedule, loader)
            if proc.distributed:
                dist.barrier()
    model.eval()
    if state is not None and proc.is_main:
        state.clear()
    return losses


def _epoch(net, model, bar, left: int, objective, optimizer, schedule, run: Run, total_steps: int, proc: Process,
           device, epoch: int) -> float:
    """One pass over the batches (stopping at ``total_steps``); the mean of the batches' global mean losses."""
    total, batches = 0.0, 0
    in_step = size = 0  # batches in the step being accumulated, and how many it will hold
    for batch in bar:
        if schedule.last_epoch >= total_steps:
            break
        if in_step == 0:
            optimizer.zero_grad(set_to_none=True)
            size = min(run.accumulate, left)
        in_step += 1
        left -= 1
        last = in_step == size
        with (net.no_sync() if proc.distributed and not last else contextlib.nullcontext()):
            with (torch.autocast(device.type, dtype=run.autocast) if run.autocast is not None
                  else contextlib.nullcontext()):
                loss_sum, count = objective(net, batch)
            count = torch.tensor([float(count)], device=device)
            if proc.distributed:  # the global batch's size: every process scales to its mean
                dist.all_reduce(count)
            # DDP averages over processes: the global mean's gradient (over the step's batches)
            loss = loss_sum.float() * (proc.world / count[0] / size)
            if not torch.isfinite(loss):
                raise StructPruneError(f"training diverged (loss {loss.item()}) in epoch {epoch + 1}; lower --lr")
            loss.backward()
        if last:
            if run.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), run.max_grad_norm)
            optimizer.step()
            schedule.step()
            in_step = 0
        summed = loss_sum.detach().float()
        if proc.distributed:  # the global batch's loss, for the log
            dist.all_reduce(summed)
        total += (summed / count[0]).item()
        batches += 1
        bar.set_postfix(loss=f"{total / batches:.3f}")
    return total / max(batches, 1)


def _sampler_generator(loader) -> torch.Generator | None:
    return getattr(getattr(loader, "sampler", None), "generator", None)


def _save(state: RunState, epoch: int, losses: list[float], model, optimizer, schedule, loader) -> None:
    """Everything an uninterrupted run would carry into the next epoch: weights, optimizer, schedule, random state."""
    generator = _sampler_generator(loader)
    state.save({"epoch": epoch, "losses": losses},
               {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "sampler_rng": None if generator is None else generator.get_state()})


def _restore(path: Path, saved: tuple[dict, dict], model, optimizer, schedule, loader) -> tuple[int, list[float]]:
    progress, data = saved
    try:
        model.load_state_dict(data["model"])
        optimizer.load_state_dict(data["optimizer"])
        schedule.load_state_dict(data["schedule"])
    except Exception as exc:
        raise StructPruneError(f"--resume: training state {path} does not fit the model ({first_line(exc)}); "
                               f"delete it to start over") from None
    torch.set_rng_state(data["torch_rng"])
    generator = _sampler_generator(loader)
    if generator is not None and data["sampler_rng"] is not None:
        generator.set_state(data["sampler_rng"])
    return int(progress["epoch"]), list(progress["losses"])
