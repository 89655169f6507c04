"""Schedules: how pruning and fine-tuning alternate.

* ``oneshot``: every group pruned in one pass (:func:`structprune.prune`), then an optional final fine-tune.
* ``sequential``: the same pass, with a fine-tune after each group (i-SpaSP's released recipe prunes a
  block, fine-tunes, moves to the next block), then the final fine-tune.
* ``cascade`` (PFP's): ``steps`` prune passes towards the final budget, each re-scoring the network as
  it is, with a fine-tune after each; the budgets of the steps shrink geometrically to the final one.

In every schedule, each group's hidden representation is captured from the network as pruned so far.
:func:`run` returns the final model and one report entry per prune pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from torch import nn

from . import allocate
from .api import PruneResult, prune
from .errors import StructPruneError, check_positive_int

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
        **prune_kwargs) -> tuple[nn.Module, list[dict], list[PruneResult]]:
    """Prune ``model`` with a schedule; returns the final model, the step reports and each pass's result.

    finetune: trains a model in place; called after the pass (oneshot, sequential) or after each step
        (cascade). layer_finetune: called after each group (sequential only).
    evaluate: returns a model's accuracy; recorded before and after each fine-tune.
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
    for i in range(1, passes + 1):
        step = budget if schedule != "cascade" else step_budget(
            budget, i, steps, results[0].before if results else None, results[-1].after if results else None)
        result = prune(current, calib_loader, method, step, progress=progress, after_group=after_group,
                       **prune_kwargs)
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
    return current, reports, results
