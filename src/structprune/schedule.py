"""Schedules: how pruning and fine-tuning alternate.

* ``oneshot``: every group pruned in one pass (:func:`structprune.prune`), then an optional final fine-tune.
* ``sequential``: the same pass, with a fine-tune after each group (i-SpaSP's released recipe prunes a
  block, fine-tunes, moves to the next block), then the final fine-tune.
* ``cascade`` (PFP's): ``steps`` prune passes towards the final budget, each re-scoring the network as
  it is, with a fine-tune after each; the budgets of the steps shrink geometrically to the final one.

In every schedule, each group's hidden representation is captured from the network as pruned so far.
:func:`run` returns the final model and one report entry per prune pass.

With ``state_path``, the cascade writes its state after every step (the model as pruned and
fine-tuned so far, the reports, the random state); ``resume=True`` continues after the last finished
step. Every step is a deterministic function of the model it starts from, the data and the seed (the
fine-tune's data order depends only on the seed and the epoch), so a resumed run ends with the same
model as an uninterrupted one; a step that was cut off is redone from its start.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import allocate, checkpoint
from .allocate import missed_target
from .api import prune
from .errors import StructPruneError, check_positive_int, first_line
from .result import PruneResult
from .run_state import RunState

SCHEDULES = ("oneshot", "sequential", "cascade")


def step_budget(budget: allocate.Budget, step: int, steps: int, dense: dict | None = None,
                current: dict | None = None) -> allocate.Budget:
    """The budget of cascade step ``step`` (1-based) of ``steps``, for the current model.

    Step i of n aims at the final budget to the power i/n, relative to the dense model: a ratio r gives
    each group r^(1/n) of its current channels per step; a target fraction f of the dense MACs/params
    means f^(i/n)·dense/current of the current model (``dense`` and ``current`` sizes from the reports).
    """
    if isinstance(budget, allocate.Uniform):
        return allocate.Uniform(budget.ratio ** (1 / steps))
    if isinstance(budget, allocate.PerLayer):
        return allocate.PerLayer({p: r ** (1 / steps) for p, r in budget.ratios.items()},
                                 budget.default ** (1 / steps))
    fraction = budget.fraction ** (step / steps)
    if step > 1:
        key = allocate.METRICS[budget.metric]
        fraction = min(1.0, fraction * dense[key] / current[key])
    return replace(budget, fraction=fraction)


def run(model: nn.Module, calib_loader: Iterable, method: str = "ispasp", budget=0.5, *,
        schedule: str = "oneshot", steps: int = 3, finetune: Callable[[nn.Module], None] | None = None,
        layer_finetune: Callable[[nn.Module], None] | None = None,
        evaluate: Callable[[nn.Module], float] | None = None, progress: bool = True,
        state_path: str | os.PathLike | None = None, resume: bool = False, state_key: dict | None = None,
        **prune_kwargs) -> tuple[nn.Module, list[dict], list[PruneResult]]:
    """Prune ``model`` with a schedule; returns the final model, the step reports and each pass's result.

    finetune: trains a model in place; called after the pass (oneshot, sequential) or after each step
        (cascade). layer_finetune: called after each group (sequential only).
    evaluate: returns a model's accuracy; recorded before and after each fine-tune.
    state_path, resume: the cascade's state after each step, and continuing from it (module docstring);
        the state file is removed when the schedule ends. Results of steps finished before a resume
        carry no model. state_key: the caller's options that a resumed run must share (e.g. the
        fine-tune's), checked with the method, budget, schedule and prune options.
    prune_kwargs: passed to :func:`structprune.prune` (refit, round_to, calib_samples, seed, ...).
    """
    if schedule not in SCHEDULES:
        raise StructPruneError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    check_positive_int(steps, "steps")
    if schedule == "sequential" and layer_finetune is None:
        raise StructPruneError("the sequential schedule fine-tunes after each group: give layer_finetune "
                               "(--layer-finetune-epochs on the command line)")
    budget = allocate.as_budget(budget)
    after_group = (lambda m, _name: layer_finetune(m)) if schedule == "sequential" else None
    reports, results = [], []
    current = model
    passes = steps if schedule == "cascade" else 1
    state = None if state_path is None else RunState(
        state_path, _signature(method, budget, schedule, steps, prune_kwargs, state_key))
    saved = state.load() if resume and state is not None else None
    if saved is not None:
        current, reports, results = _restore(state.path, saved)
        current = current.to(next(model.parameters(), torch.empty(0)).device)  # where the caller's model is
    for i in range(len(results) + 1, passes + 1):
        step = budget if schedule != "cascade" else step_budget(
            budget, i, steps, results[0].before if results else None, results[-1].after if results else None)
        with warnings.catch_warnings():
            if passes > 1:  # a step's own target is an intermediate one: the user's is checked at the end
                warnings.filterwarnings("ignore", message=_MISSED)
            result = prune(current, calib_loader, method, step, progress=progress, after_group=after_group,
                           **prune_kwargs)
        if passes > 1:
            result.warnings = [w for w in result.warnings if not re.match(_MISSED, w)]
        dense = (results[0] if results else result).before
        entry = {"step": i, "schedule": schedule, "budget": result.budget, "params": result.after["params"],
                 "macs": result.after["macs"], "params_ratio": result.after["params"] / dense["params"],
                 "macs_ratio": result.after["macs"] / dense["macs"], "prune_seconds": result.seconds}
        if evaluate is not None:
            entry["accuracy_pruned"] = evaluate(result.model)
        if finetune is not None:
            start = time.perf_counter()
            finetune(result.model)
            entry["finetune_seconds"] = time.perf_counter() - start
            if evaluate is not None:
                entry["accuracy_finetuned"] = evaluate(result.model)
        reports.append(entry)
        results.append(result)
        current = result.model
        if state is not None and i < passes:
            state.save({"reports": reports, "results": [r.to_dict() for r in results]},
                       {"model": checkpoint.pack(current), "torch_rng": torch.get_rng_state()})
    if passes > 1 and isinstance(budget, allocate.Target):
        _check_final_target(budget, results)
    if state is not None:
        state.clear()
    return current, reports, results


_MISSED = r"structprune: the \w+ target"


def _check_final_target(budget: allocate.Target, results: list[PruneResult]) -> None:
    """The cascade's end against the user's target (a fraction of the dense model), warned in those terms."""
    key = allocate.METRICS[budget.metric]
    achieved = results[-1].after[key] / max(results[0].before[key], 1)
    if abs(achieved - budget.fraction) > budget.tolerance * budget.fraction:
        message = missed_target(budget.metric, budget.fraction, achieved, budget.tolerance)
        warnings.warn(message, stacklevel=3)
        results[-1].warnings.append(message)


def _signature(method, budget, schedule: str, steps: int, prune_kwargs: dict, state_key: dict | None) -> dict:
    """What must not change between an interrupted run and its resumption."""
    plain = (int, float, str, bool, type(None))
    options = {k: v for k, v in sorted(prune_kwargs.items())
               if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}
    return {"method": getattr(method, "name", method), "budget": repr(budget), "schedule": schedule, "steps": steps,
            **options, **(state_key or {})}


def _restore(path: Path, saved: tuple[dict, dict]) -> tuple[nn.Module, list, list]:
    """The model as the last finished step left it, the steps' reports and results, and the random state."""
    progress, data = saved
    try:
        model = checkpoint.unpack(checkpoint.unwrap(data["model"], path), str(path))
        results = [PruneResult.from_dict(d) for d in progress["results"]]
        torch.set_rng_state(data["torch_rng"])
    except StructPruneError:
        raise
    except Exception as exc:
        raise StructPruneError(f"--resume: schedule state {path} is unreadable or was not written by this version "
                               f"({first_line(exc)}); delete it to start over") from None
    results[-1].model = model
    return model.eval(), list(progress["reports"]), results
