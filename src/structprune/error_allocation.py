"""The error allocation's stages (``Target(allocation="error")``): each group's error curve, measured on the network
before any group is pruned, and the candidate allocations pruned and checked end to end.

:func:`curves` gives :func:`structprune.allocate.plan` the squared relative error of the network's output on the
first :data:`PROBE_SAMPLES` calibration samples with each group alone pruned to each candidate width (the method's
channels, refitted); ``Target(measured_widths=N)`` measures N widths per group and follows the refit's least-squares
error of the group's own consumers between them. The errors of groups pruned alone need not add up, so
:func:`structprune.prune` prunes each candidate of the plan (the curves' allocation, one ratio for every group,
their blend) from a fresh copy (:func:`restart`), keeps the one of least output error on the calibration samples after
the probe's (:func:`keep_best`) and reports it (:func:`restore`, :func:`measure`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import allocate as budgets
from .batches import first_batches, take_samples
from .graph import PruningGraph, build_graph
from .measure import output_vector
from .methods.base import GroupView, Selection
from .pipeline import Recovery, Run, _caches, _capture, _scoped
from .progress import bar
from .refit import refit as refit_selection
from .refit import relative_residuals
from .widths import predicted

#: calibration samples the error allocation measures each group's effect on the network's output with
PROBE_SAMPLES = 256


def curves(run: Run, widths: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """The error allocation's curves: for each group and each of its candidate ``widths``, the squared relative
    error of the network's output on the first :data:`PROBE_SAMPLES` calibration samples with that group alone
    pruned to that width (the method's channels, refitted when the refit is on) on the model as it is (dense:
    before any group is pruned). A residual stream's error reaches every later layer and a block's inner layer's
    only its block: the network's output weighs them as they count."""
    curves = {}
    groups = [g for g in run.graph.all_groups() if g.name in widths]
    if run.probe is None:
        run.probe = _outputs(run, [inputs for inputs, _ in first_batches(run.calib, PROBE_SAMPLES)])
    measured = getattr(run.budget, "measured_widths", None)
    for group in bar(groups, desc="error curves", unit="group", enabled=run.options.progress):
        view = _capture(run, group)
        selections = {}
        for width in widths[group.name]:
            if width < group.channels:
                selection = run.method.select(view.restrict(run.selection_samples), width)
                selections[width] = refit_selection(view, selection) if run.options.refit else selection
        anchors = _anchors(sorted(selections), measured)
        network = {w: _network_error(run, group.name, selections[w]) for w in anchors}
        local = {} if len(anchors) == len(selections) else {w: _local_error(view, s) for w, s in selections.items()}
        curves[group.name] = {w: 0.0 for w in widths[group.name] if w >= group.channels} | {
            w: network[w] if w in network else local[w] * _scale_at(w, network, local) for w in selections}
    return curves


def _outputs(run: Run, batches: list) -> tuple[list, list[Tensor], float]:
    """Calibration ``batches`` (on the run's device), the dense model's outputs on them and their summed energy."""
    inputs = [take_samples(batch, None, run.device) for batch in batches]
    with torch.no_grad():
        dense = [output_vector(run.model, batch) for batch in inputs]
    return inputs, dense, max(sum(float(out.square().sum()) for out in dense), 1e-30)


def output_error(model: nn.Module, samples: tuple[list, list[Tensor], float]) -> float:
    """Squared error of ``model``'s output against the dense outputs of ``samples`` (:func:`_outputs`), relative
    to their energy."""
    inputs, dense, energy = samples
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return sum(float((output_vector(model, batch) - out).square().sum())
                       for batch, out in zip(inputs, dense, strict=True)) / energy
    finally:
        model.train(was_training)


def _anchors(widths: list[int], count: int | None) -> list[int]:
    """``count`` of the (sorted) candidate ``widths``, evenly spread inside them (one: the middle one); all of them
    when ``count`` is None or not smaller."""
    if count is None or count >= len(widths):
        return widths
    return sorted({widths[max(0, round((i + 1) * len(widths) / (count + 1)) - 1)] for i in range(count)})


def _local_error(view: GroupView, selection: Selection) -> float:
    """The squared relative error of the group's consumers with ``selection`` on the calibration rows: from the
    refit's normal equations where every consumer was refitted, else recomputed on the rows."""
    fitted = (selection.stats or {}).get("refit") or {}
    if len(fitted) == len(view.consumers) and all(isinstance(r, dict) for r in fitted.values()):
        energy = sum(r["target_energy"] for r in fitted.values())
        return sum(r["error_after"] for r in fitted.values()) / energy if energy > 0 else 0.0
    return relative_residuals(view, [selection])[0] ** 2


def _scale_at(width: int, network: dict[int, float], local: dict[int, float]) -> float:
    """The ratio of the network's error to the consumers' own at ``width``: measured at the anchors, interpolated
    log-linearly in the width between two of them, the nearest one's outside them."""
    ratios = {w: network[w] / local[w] for w in network if local[w] > 0 and network[w] > 0}
    if not ratios:
        return 0.0
    below = [w for w in ratios if w <= width]
    above = [w for w in ratios if w >= width]
    if not below or not above:
        return ratios[max(below) if below else min(above)]
    low, high = max(below), min(above)
    if low == high:
        return ratios[low]
    t = (width - low) / (high - low)
    return ratios[low] ** (1 - t) * ratios[high] ** t


def _network_error(run: Run, name: str, selection: Selection) -> float:
    """The network's output error on the probe (:func:`output_error`) with group ``name`` alone pruned as
    ``selection`` says (on a copy)."""
    trial = copy.deepcopy(run.pruned).eval()
    graph = build_graph(trial, run.example_inputs, [trial.get_submodule(n) for n in run.ignored_names], run.scope)
    group = next(g for g in graph.all_groups() if g.name == name)
    graph.apply(group, selection.keep_idx, selection.consumer_weights, selection.consumer_biases)
    return output_error(trial, run.probe)


#: samples the candidate allocations are compared on (those after the probe's, where the calibration set has them)
VALIDATION_SAMPLES = 256


@dataclass
class Candidate:
    """One candidate allocation pruned and recovered: what :func:`structprune.pipeline.report` needs of it."""

    name: str
    error: float
    recovery: Recovery
    pruned: nn.Module
    graph: PruningGraph
    sizer: budgets.Sizer
    layers: list[dict]


def keep_best(run: Run, allocation: budgets.Allocation, name: str, recovery: Recovery,
              best: Candidate | None) -> Candidate:
    """The run's model, pruned with candidate ``name``, measured against the dense model on the validation samples
    (the report's ``budget["candidates"]``); the better of it and ``best``. A candidate whose size misses the target
    by more than its tolerance (one ratio, or a blend, in whole channels and multiples) is measured but not taken,
    unless it is the first (the curves' own)."""
    if run.validation is None:
        batches = [inputs for inputs, _ in first_batches(run.calib, PROBE_SAMPLES + VALIDATION_SAMPLES)]
        held_out = batches[len(run.probe[0]):] if run.probe is not None else []
        run.validation = _outputs(run, held_out) if held_out else run.probe
    error = output_error(run.pruned, run.validation)
    achieved = run.sizer.fraction(allocation.candidates[name], run.budget.metric)
    within = budgets._within(allocation.candidates[name], run.budget, run.sizer)
    allocation.info.setdefault("candidates", {})[name] = {
        "validation_error": error, "achieved": achieved, "within_target": within, "keeps": allocation.candidates[name]}
    if best is not None and (best.error <= error or not within):
        return best
    return Candidate(name, error, recovery, run.pruned, run.graph, run.sizer, run.layers)


def restart(run: Run) -> None:
    """The run back before its first group, on a fresh copy of the caller's model (the scope, the reconstruction
    target, the probe kept): to prune with another candidate allocation."""
    run.pruned = copy.deepcopy(run.model).eval()
    run.layers, run.original_outputs = [], {}
    _scoped(run)
    run.cache, run.reference_cache = _caches(run, run.cache is not None, run.reference_cache is not None)


def restore(run: Run, allocation: budgets.Allocation, best: Candidate) -> Recovery:
    """The run as ``best`` left it, and the allocation's keeps and predictions those of the chosen candidate."""
    run.pruned, run.graph, run.sizer, run.layers = best.pruned, best.graph, best.sizer, best.layers
    allocation.keeps = allocation.candidates[best.name]
    achieved = run.sizer.fraction(allocation.keeps, run.budget.metric)
    allocation.info.update(chosen=best.name, achieved=achieved,
                           relative_error=abs(achieved - run.budget.fraction) / run.budget.fraction,
                           **predicted(allocation.curves, allocation.keeps))
    return best.recovery


def measure(run: Run, allocation: budgets.Allocation) -> None:
    """The pruned model's output error on the probe (all groups pruned, after the recovery), beside the curves'
    prediction (groups alone, summed): ``budget["measured_error"]``."""
    if run.probe is not None:
        allocation.info["measured_error"] = output_error(run.pruned, run.probe)
