"""The stages of :func:`structprune.prune`, each a function over one :class:`Run`:

1. :func:`set_up` — validate the options, copy the model, read the calibration samples once, choose the sample
   counts;
2. :func:`allocate` — the graph of prunable groups (its scope), the keep count of each group (a budget, with PFP's
   sensitivities of every group in one pass where its allocation asks), the kept block inputs;
3. :func:`prune_group`, for each group shallow to deep — capture its hidden representation, the method's
   selection, the least-squares refit, the removal (and the caller's callback);
4. :func:`recover` — the pruned size and forward check, BatchNorm recalibration, the accuracy after each stage;
5. :func:`report` — the :class:`~structprune.result.PruneResult`.

What a method needs (activations, gradients, sensitivities, labels) is read from its
:class:`~structprune.methods.Needs` only.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import allocate as budgets
from . import methods as method_registry
from .activation_cache import ActivationCache, Chain, changed_modules, state
from .batches import Calibration, first_batches, run_forward, take_samples
from .capture import DEFAULT_MEMORY_BYTES, capture, group_sensitivities, weights_view
from .errors import StructPruneError, check_positive_int, first_line
from .graph import SCOPES as GRAPH_SCOPES
from .graph import PruningGraph, build_graph
from .groups import Group
from .layers import LINEAR_LAYERS, out_features
from .measure import count, counting, output_sizes
from .methods.base import GroupView, Method, Selection, options_of
from .recalibrate import has_batchnorm, recalibrate_batchnorm
from .refit import refit as refit_selection
from .refit import relative_residuals
from .result import PruneResult
from .sensitivity import ZERO_BELOW

#: default cap on the calibration samples the recovery (refit, BatchNorm recalibration) reads
RECOVERY_SAMPLES = 2048
#: default cap on the samples of those the BatchNorm recalibration reads: on the Fashion-MNIST ResNet-20/56 and
#: VGG-16 at 50% of the MACs, i-SpaSP and PFP, 512 samples gave accuracies within 0.15 points of 2,048 (256: within
#: 0.21), at a quarter of the time (benchmarks/recal_samples.py)
RECALIBRATION_SAMPLES = 512
RECONSTRUCT = ("auto", "original", "layer")
#: labelled calibration samples the report's stage accuracies are taken on: a diagnostic, each stage one forward
#: pass over them (binomial standard error √(a(1−a)/n): 1.9 points at 90% accuracy, less for the difference
#: between two stages on the same samples); 512 made the three stages cost more than a pass over 1,280 samples
STAGE_SAMPLES = 256
#: the kept block inputs of a pass (:mod:`structprune.activation_cache`) take at most this many times ``memory_bytes``
CACHE_FACTOR = 4
#: ``prune(scope=...)``: the graph's scopes, or "auto" (chosen per budget, see :func:`allocate`)
SCOPES = ("auto", *GRAPH_SCOPES)


@dataclass
class Options:
    """The options of :func:`structprune.prune` (documented there), checked by :meth:`check`."""

    refit: bool = True
    reconstruct: str = "auto"
    recalibrate: bool | None = None
    scope: str = "auto"
    round_to: int | str | None = "auto"
    calib_samples: int | None = None
    recovery_samples: int | None = None
    recalibration_samples: int | None = None
    ignored_layers: Sequence[str | nn.Module] = ()
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    stream: bool = False
    seed: int = 0
    progress: bool = True
    after_group: Callable[[nn.Module, str], None] | None = None
    loss_fn: Callable | None = None
    in_place: bool = False
    #: check the forward pass after every removal (to name the group that broke it)
    check_each_group: bool = False

    def check(self, budget: budgets.Budget) -> None:
        for name in ("calib_samples", "recovery_samples", "recalibration_samples"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)
        budgets.resolve_round_to(self.round_to, "cpu", budget)  # a bad value is an error before any work
        if self.reconstruct not in RECONSTRUCT:
            raise StructPruneError(f"reconstruct must be one of {', '.join(RECONSTRUCT)}, got {self.reconstruct!r}")
        if self.scope not in SCOPES:
            raise StructPruneError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.memory_bytes < 1:
            raise StructPruneError(f"memory_bytes must be positive, got {self.memory_bytes!r}")
        if self.in_place and self.reconstruct == "original":
            raise StructPruneError('in_place=True leaves no original model to refit to: reconstruct="original" needs '
                                   'a copy (use reconstruct="layer", or in_place=False)')
        if self.in_place and getattr(budget, "allocation", "uniform") == "error":
            raise StructPruneError('in_place=True: allocation="error" prunes each candidate allocation from a fresh '
                                   'copy of the model (use in_place=False)')


@dataclass
class Run:
    """One pruning run as it goes through the stages."""

    model: nn.Module  # the caller's: read (the original outputs, the dense size), never modified; in place: pruned
    pruned: nn.Module
    method: Method
    budget: budgets.Budget
    options: Options
    calib: Calibration | None
    example_inputs: object
    device: torch.device
    ignored_names: list[str]
    selection_samples: int  # calibration samples the method selects on
    reads_data: bool  # whether anything reads the calibration data (no: a weights-only selection, no recovery)
    start: float
    scope: str = "all"
    reconstruct: str = "layer"
    graph: PruningGraph | None = None
    sizer: budgets.Sizer | None = None
    cache: ActivationCache | None = None
    reference_cache: ActivationCache | None = None
    #: layer name -> its current outputs' indices in the original model
    original_outputs: dict[str, Tensor] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    #: the error allocation's curves (:func:`structprune.error_allocation.curves`), set by the caller
    curves: Callable | None = None
    #: the error allocation's probe: calibration inputs, the dense model's outputs on them, their summed energy
    probe: tuple[list, list[Tensor], float] | None = None
    #: the same for the samples that check its candidate allocations end to end
    validation: tuple[list, list[Tensor], float] | None = None

    @property
    def captures(self) -> bool:
        """Whether groups are captured on calibration data (else a weights-only view, no pass at all)."""
        return self.options.refit or self.method.needs.activations

    @property
    def checked(self) -> bool:
        """Whether the forward pass is checked after every removal: with a callback between groups (it would fail
        obscurely), or asked for. Else once, at the end (and a capture that fails after a removal reports it)."""
        return self.options.after_group is not None or self.options.check_each_group

    @property
    def pruned_any(self) -> bool:
        return any(layer["kept"] < layer["channels"] for layer in self.layers)


class BrokenForward(Exception):
    """The pruned model's forward pass fails: at the end, or in a capture after a removal (the groups are not
    checked one by one unless asked: prune() then prunes again with ``check_each_group`` to name the group)."""


# -- 1. set up ----------------------------------------------------------------------------------------------------

def set_up(model: nn.Module, calib_loader, method: str | Method, budget, example_inputs, options: Options,
           method_kwargs: dict) -> Run:
    """Validate everything, copy the model, and read the calibration samples (once)."""
    if not isinstance(model, nn.Module):
        raise StructPruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    budget = budgets.as_budget(budget)
    method = _method(method, method_kwargs)
    options.check(budget)
    names = {module: name for name, module in model.named_modules()}
    ignored_names = [_layer_name(layer, names) for layer in options.ignored_layers]
    start = time.perf_counter()
    pruned = model.eval() if options.in_place else copy.deepcopy(model).eval()
    first = next(pruned.parameters(), torch.empty(0))
    device, dtype = first.device, first.dtype  # calibration data is moved and cast to the model's
    calib = Calibration(calib_loader, None, device, dtype, stream=options.stream)
    example_inputs = take_samples(calib.first() if example_inputs is None else example_inputs,
                                  1 if example_inputs is None else None, device, dtype)
    calib_samples = options.calib_samples or method.calibration_samples(_layer_outputs(pruned, example_inputs))
    if options.recalibrate is None:
        options.recalibrate = has_batchnorm(pruned)
    recovering = options.refit or options.recalibrate
    recovery_samples = options.recovery_samples or (
        max(calib_samples, RECOVERY_SAMPLES) if recovering else calib_samples)
    reads_data = (recovering or method.needs.activations
                  or getattr(budget, "allocation", "uniform") in ("pfp", "error"))
    if reads_data:
        calib.read(max(calib_samples, recovery_samples))
        if method.needs.labels and not calib.labelled:
            raise StructPruneError(f"method {method.name} needs labelled calibration batches: (inputs, targets) "
                                   f"pairs")
    return Run(model, pruned, method, budget, options, calib if reads_data else None, example_inputs, device,
               ignored_names, min(calib_samples, calib.samples) if reads_data else 0, reads_data, start)


def _layer_outputs(model: nn.Module, example_inputs) -> list[int]:
    """Output elements per sample of each Conv/Linear layer (what a method's calibration-size rule may read);
    none where the model does not run on the example (the graph's own pass then says why, as bad input)."""
    try:
        return [size["elements"] for size in output_sizes(model, example_inputs).values()]
    except Exception:
        return []


def _method(method: str | Method, method_kwargs: dict) -> Method:
    if isinstance(method, str):
        return method_registry.get(method, **method_kwargs)
    if method_kwargs:
        raise StructPruneError("method options can only be given with a method name, not a Method instance")
    if not isinstance(method, method_registry.Method):
        missing = [a for a in ("name", "needs", "calibration_samples", "select") if not hasattr(method, a)]
        raise StructPruneError(f"method {type(method).__name__} does not implement structprune.methods.Method "
                               f"(missing {', '.join(missing)}); subclass structprune.methods.MethodBase")
    return method


def _layer_name(layer: str | nn.Module, names: dict) -> str:
    if isinstance(layer, str):
        if layer not in names.values():
            raise StructPruneError(f"ignored_layers: the model has no layer named {layer!r}")
        return layer
    if layer not in names:
        raise StructPruneError(f"ignored_layers: {type(layer).__name__} is not a layer of the model")
    return names[layer]


# -- 2. allocate --------------------------------------------------------------------------------------------------

def allocate(run: Run) -> budgets.Allocation:
    """The graph in its scope, the keep count of every group, and the kept block inputs of later passes."""
    auto_scope = run.options.scope == "auto"
    error_allocation = getattr(run.budget, "allocation", "uniform") == "error"
    run.scope = ("all" if error_allocation else _auto_scope(run)) if auto_scope else run.options.scope
    _scoped(run)
    reconstruct = run.options.reconstruct
    if reconstruct == "auto":  # in place, no original model is left to refit to
        reconstruct = "layer" if run.graph.residual_layers or run.options.in_place else "original"
    run.reconstruct = reconstruct
    pfp_allocation = getattr(run.budget, "allocation", "uniform") == "pfp"
    wanted = (run.captures or pfp_allocation) and not run.options.stream and not run.method.needs.gradients
    run.cache, run.reference_cache = _caches(run, wanted, run.options.refit and run.reconstruct == "original")
    allocation = _plan(run)
    if auto_scope and run.scope == "inner" and _missed_above(allocation.info, run.budget):
        # the scope was chosen on one timing of the smallest inner allocation; a latency search that then finds
        # the inner groups too slow (the residual streams' work stays) searches again over every group
        inner_achieved = allocation.info["achieved"]
        run.scope = "all"
        _scoped(run)
        allocation = _plan(run)
        allocation.info["inner_scope_achieved"] = inner_achieved
    if run.options.after_group is not None:  # a callback (fine-tuning, say) runs once per group: one candidate
        allocation.candidates = None
    _warn_if_missed(allocation.info, run.budget)
    _warn_if_clamped(allocation.keeps, run.sizer.groups, run.budget)
    _warn_if_nothing_to_prune(run.pruned, run.sizer.groups, run.ignored_names)
    return allocation


def _scoped(run: Run) -> None:
    """The graph and the sizer of ``run.scope``."""
    pruned = run.pruned
    run.graph = build_graph(pruned, run.example_inputs, [pruned.get_submodule(n) for n in run.ignored_names],
                            run.scope, observe=counting(pruned))  # the dense size, counted on the layers' ordering pass
    run.sizer = budgets.Sizer(run.model, run.example_inputs, run.ignored_names, run.graph, run.scope,
                              latency_batch=_latency_batch(run.budget),  # the caller's model: never pruned
                              dense=run.graph.observed() if run.graph.observed is not None else None)


def _plan(run: Run) -> budgets.Allocation:
    return budgets.plan(run.budget, run.sizer, run.options.round_to, lambda: _pfp_statistics(run), device=run.device,
                        curves=None if run.curves is None else lambda widths: run.curves(run, widths))


def _zero_below(method: Method) -> float:
    """PFP's threshold for the sensitivities: the method's own where it reads them, else PFP's default."""
    return method.needs.zero_below if method.needs.sensitivity else ZERO_BELOW


def _pfp_statistics(run: Run) -> list[budgets.LayerSensitivity]:
    """What PFP's allocation needs of every group, on the dense model: the sensitivities of all groups in one pass
    over the selection samples (:func:`structprune.capture.group_sensitivities`), the output positions and taps."""
    groups = run.graph.all_groups()
    scores = group_sensitivities(run.pruned, groups, run.calib, run.selection_samples, _zero_below(run.method))
    positions = {name: size["positions"] for name, size in output_sizes(run.pruned, run.calib.first()).items()}
    layers = []
    for group in groups:
        total = float(scores[group.name].sum())
        prob = scores[group.name] / total if total > 0 else torch.full_like(scores[group.name], 1 / group.channels)
        span = max((positions.get(c.name, 1) + 1) * c.canonical_weight().shape[2] for c in group.consumers)
        layers.append(budgets.LayerSensitivity(group.name, group.channels, prob, total, float(span)))
    return layers


#: scope "auto" keeps to the inner groups while they can meet a size target keeping at least this share of their
#: channels; a smaller share prunes every group (measured: benchmarks/README.md, "Which groups a target prunes")
INNER_FLOOR = 1 / 2


def _auto_scope(run: Run) -> str:
    """"inner" for a size target that the groups no residual stream shares can meet on their own keeping at least
    :data:`INNER_FLOOR` of their channels (measured better down to there; below it, thin blocks beside a whole
    residual stream lose more than cutting the streams too: benchmarks/README.md), else "all"; "all" for keep
    ratios. A latency target whose search then misses with the inner groups is searched again over every group
    (:func:`allocate`; ``budget["inner_scope_achieved"]`` says what the inner groups reached)."""
    if not isinstance(run.budget, budgets.Target):
        return "all"
    pruned = run.pruned  # the model the run prunes, nothing pruned yet (a copy, or the caller's in place)
    graph = build_graph(pruned, run.example_inputs, [pruned.get_submodule(n) for n in run.ignored_names], "inner")
    if not graph.out_of_scope:
        return "all"  # no residual stream: both scopes are the same
    sizer = budgets.Sizer(run.model, run.example_inputs, run.ignored_names, graph, "inner",
                          latency_batch=_latency_batch(run.budget))
    if not sizer.groups:
        return "all"
    floor = {name: max(1, math.ceil(INNER_FLOOR * channels)) for name, channels in sizer.groups.items()}
    sizer.confirm(floor)  # a size read off the dense model that a pruned copy contradicts is not used
    return "inner" if sizer.fraction(floor, run.budget.metric) <= run.budget.fraction else "all"


def _latency_batch(budget) -> int | None:
    """The batch a latency target is measured at (None for any other budget: nothing is timed)."""
    return budget.batch if isinstance(budget, budgets.Target) and budget.metric == "latency" else None


def _caches(run: Run, wanted: bool, reference: bool) -> tuple[ActivationCache | None, ActivationCache | None]:
    """Kept block inputs of the model under pruning and, for a refit to the original, of the original
    (:mod:`structprune.activation_cache`), each bounded by ``CACHE_FACTOR × memory_bytes``; None where the model
    has no chain of blocks, or where no pass is resumed (nothing captured, streamed calibration, loss gradients)."""
    if not wanted:
        return None, None
    chain = Chain(run.pruned, run.example_inputs)
    if not len(chain):
        return None, None
    limit = CACHE_FACTOR * run.options.memory_bytes
    samples = run.calib.samples
    return (ActivationCache(run.pruned, chain, run.example_inputs, samples, limit),
            ActivationCache(run.model, chain, run.example_inputs, samples, limit) if reference else None)


def _missed_above(info: dict, budget) -> bool:
    """Whether a target's allocation kept more than the target allows (the groups could not shrink enough)."""
    return info.get("budget") == "target" and info["achieved"] > info["target"] * (1 + budget.tolerance)


def _warn_if_missed(info: dict, budget) -> None:
    if info.get("budget") == "target" and info["relative_error"] > budget.tolerance:
        warnings.warn(budgets.missed_target(info["metric"], info["target"], info["achieved"], budget.tolerance),
                      stacklevel=5)


def _warn_if_clamped(keeps: dict[str, int], channels: dict[str, int], budget) -> None:
    """A ratio so small that it rounds to no channel keeps one per group: say so rather than silently."""
    if isinstance(budget, budgets.Target):
        return
    ratio = budget.ratio if isinstance(budget, budgets.Uniform) else None
    clamped = [name for name, keep in keeps.items()
               if keep == 1 and ratio is not None and ratio * channels[name] < 0.5]
    if clamped:
        warnings.warn(f"structprune: ratio {ratio:g} rounds to no channel in {len(clamped)} group(s) "
                      f"({', '.join(clamped[:3])}{', ...' if len(clamped) > 3 else ''}); each keeps 1 channel, "
                      f"the minimum", stacklevel=5)


def _warn_if_nothing_to_prune(model: nn.Module, groups: dict[str, int], ignored: list[str]) -> None:
    if not groups and ignored:
        warnings.warn(f"structprune: every prunable group is ignored ({', '.join(ignored[:3])}"
                      f"{', ...' if len(ignored) > 3 else ''}); nothing was pruned", stacklevel=5)
    elif not groups:
        others = sorted({type(m).__name__ for m in model.modules()
                         if not isinstance(m, LINEAR_LAYERS) and any(p.dim() > 1 for p in m.parameters(recurse=False))})
        found = f" (layers of type {', '.join(others)} are not pruned)" if others else ""
        warnings.warn(f"structprune: the model has no prunable group: structprune removes channels between "
                      f"Linear, Conv1d and Conv2d layers{found}; nothing was pruned", stacklevel=5)


# -- 3. each group: capture → select → refit → apply --------------------------------------------------------------

def prune_group(run: Run, group: Group, keep: int) -> dict:
    """Prune ``group`` to ``keep`` channels; returns its report entry (also appended to ``run.layers``)."""
    entry = {"group": group.name, "channels": group.channels, "kept": keep,
             "consumers": [c.name for c in group.consumers]}
    run.layers.append(entry)
    if keep >= group.channels:
        entry["relative_residual"] = 0.0
        return entry
    view = _capture(run, group)
    selection = run.method.select(view.restrict(run.selection_samples), keep)
    _check_selection(selection, group.name, group.channels, keep)
    entry.update(selection.stats)
    selections = [selection]
    if run.options.refit:
        selection = refit_selection(view, selection)
        selections.append(selection)
        entry["refit"] = selection.stats["refit"]
    residuals = relative_residuals(view, selections) if len(view.consumers[0].inputs) else [None]
    entry["relative_residual"] = residuals[0]
    if len(residuals) > 1:
        entry["relative_residual_refit"] = residuals[1]
    _apply(run, group, selection)
    return entry


def _capture(run: Run, group: Group) -> GroupView:
    """The group's view on the calibration data (or its weights alone, for a data-free selection with nothing to
    refit: no pass at all)."""
    if not run.captures:
        return weights_view(group, run.options.seed)
    needs = run.method.needs
    reference = None
    if run.options.refit and run.reconstruct == "original":
        reference = _reference(run, group)
    try:
        return capture(run.pruned, group, run.calib, memory_bytes=run.options.memory_bytes, seed=run.options.seed,
                       loss_fn=run.options.loss_fn, gradients=needs.gradients,
                       sensitivity_samples=run.selection_samples if needs.sensitivity else 0,
                       zero_below=_zero_below(run.method), reference=reference, cache=run.cache,
                       reference_cache=run.reference_cache)
    except Exception as exc:  # after a removal: most likely it broke the forward pass (named by prune())
        if run.checked or isinstance(exc, StructPruneError) or not any(
                layer["kept"] < layer["channels"] for layer in run.layers[:-1]):
            raise
        raise BrokenForward(first_line(exc)) from None


def _reference(run: Run, group: Group):
    """What capture needs to record the original model's output of the group's consumers (those that do not
    add into a residual stream, which keep the layer target): the model and each consumer's current outputs'
    indices in it."""
    targets = {c.name: run.original_outputs.get(c.name, torch.arange(out_features(c.module)))
               for c in group.consumers if c.name not in run.graph.residual_layers}
    return (run.model, targets) if targets else None


def _apply(run: Run, group: Group, selection: Selection) -> None:
    """Remove the channels the selection drops (its consumer weights written first), keeping the block-input
    cache and the record of the original outputs in step; then the forward check and the caller's callback."""
    kept_rows = {p.name: p.channel_index[selection.keep_idx].reshape(-1).sort().values
                 for p in group.producers}  # each producer's output rows the removal keeps
    for producer in group.producers:  # which of the original outputs each producer keeps (indices compose)
        current = run.original_outputs.get(producer.name, torch.arange(out_features(producer.module)))
        run.original_outputs[producer.name] = current[kept_rows[producer.name]]
    before = state(run.pruned) if run.cache is not None else None
    run.graph.apply(group, selection.keep_idx, selection.consumer_weights, selection.consumer_biases)
    if run.cache is not None:  # the producers' recorded outputs stand for the next pass, in the rows kept
        run.cache.pruned(kept_rows.items())
        run.cache.changed(changed_modules(before, state(run.pruned)))
    if run.checked:
        _check_forward(run.pruned, run.example_inputs, group.name)
    if run.options.after_group is not None:
        run.options.after_group(run.pruned, group.name)
        run.graph.forget()  # the callback may have changed anything: later groups are resolved afresh
        if run.cache is not None:
            run.cache.drop()  # anything may have changed


def _check_selection(selection: Selection, group: str, channels: int, keep: int) -> None:
    idx = selection.keep_idx
    if not isinstance(idx, Tensor) or idx.dim() != 1 or len(idx) != keep:
        raise RuntimeError(f"method returned {idx!r} for group {group}; expected {keep} indices")
    if len(torch.unique(idx)) != keep or int(idx.min()) < 0 or int(idx.max()) >= channels:
        raise RuntimeError(f"method returned invalid indices for group {group}: {idx.tolist()}")
    selection.keep_idx = torch.sort(idx.long().cpu()).values


def _check_forward(model: nn.Module, example_inputs, group: str) -> None:
    """A removal that leaves the model unable to run (a custom layer Torch-Pruning misread) is named here,
    not as a shape error deep inside torch later."""
    try:
        with torch.no_grad():
            run_forward(model, example_inputs)
    except Exception as exc:
        first = first_line(exc)
        raise StructPruneError(f"pruning group {group} broke the model's forward pass ({first}); keep it whole "
                               f"with ignored_layers=[{group!r}] (--ignore {group})") from None


# -- 4. recover ---------------------------------------------------------------------------------------------------

@dataclass
class Recovery:
    """What :func:`recover` measured and did."""

    after: dict[str, int]
    recalibration: dict | None
    stages: dict | None


def recover(run: Run) -> Recovery:
    """The pruned size (its forward pass the end check), then BatchNorm recalibration, with the accuracy on a few
    labelled calibration samples before and after each stage."""
    try:
        after = count(run.pruned, run.example_inputs)  # BatchNorm statistics change no size
    except Exception as exc:
        if run.checked:
            raise
        raise BrokenForward(first_line(exc)) from None
    pruned_any = run.pruned_any
    stages = StageAccuracy(run.calib) if pruned_any and run.reads_data else None
    if stages is not None:
        if run.model is not run.pruned:  # in place, the dense model is gone
            stages.score("dense", run.model)
        stages.score("pruned" if run.options.refit else "selected", run.pruned)
    recalibration = None
    if pruned_any and run.options.recalibrate:
        samples = run.options.recalibration_samples or RECALIBRATION_SAMPLES
        recalibration = recalibrate_batchnorm(run.pruned, first_batches(run.calib, samples))
        if stages is not None:
            stages.score("recalibrated", run.pruned)
    return Recovery(after, recalibration, stages.accuracy if stages is not None and stages.accuracy else None)


class StageAccuracy:
    """Top-1 accuracy on a few labelled calibration samples after each stage of the pipeline (cheap: one
    forward pass over at most ``STAGE_SAMPLES`` samples per stage)."""

    def __init__(self, calib: Calibration):
        self.batches, seen = [], 0
        if calib.labelled:
            for inputs, target in calib:
                if seen >= STAGE_SAMPLES:
                    break
                if target is None or target.is_floating_point() or target.dim() != 1:
                    self.batches = []
                    break
                n = min(len(target), STAGE_SAMPLES - seen)
                self.batches.append((take_samples(inputs, n, None), target[:n]))
                seen += n
        self.accuracy: dict = {"samples": seen} if self.batches else {}

    @torch.no_grad()
    def score(self, stage: str, model: nn.Module) -> None:
        if not self.batches:
            return
        was_training = model.training
        model.eval()
        correct = total = 0
        try:
            for inputs, target in self.batches:
                logits = run_forward(model, inputs)
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    self.batches, self.accuracy = [], {}  # not a classifier's logits: nothing to score
                    return
                correct += int((logits.argmax(dim=1) == target.to(logits.device)).sum())
                total += len(target)
        finally:
            model.train(was_training)
        self.accuracy[stage] = 100.0 * correct / max(total, 1)


# -- 5. report ----------------------------------------------------------------------------------------------------

def report(run: Run, allocation: budgets.Allocation, recovery: Recovery) -> PruneResult:
    """The pruned model, with what replays its pruning recorded on it, and the run's report."""
    pruned, graph = run.pruned, run.graph
    pruned.structprune_history = list(getattr(run.model, "structprune_history", [])) + graph.history()
    pruned.structprune_example_input = _input_spec(run.example_inputs)
    # who chose the widths: structprune (a size target, rounded to the hardware's multiple by round_to="auto") or
    # the caller (keep ratios, an explicit round_to); an export warns about unaligned widths only in the second case
    target = isinstance(run.budget, budgets.Target) and run.budget.metric != "latency"
    pruned.structprune_widths = "auto" if target and run.options.round_to == "auto" else "given"
    skipped = [{"group": g, "reason": r} for g, r in graph.skipped]
    skipped += [{"group": g, "reason": "residual stream (scope='inner')"} for g in graph.out_of_scope]
    refit = run.options.refit
    return PruneResult(
        model=pruned, method=run.method.name, budget=allocation.info, layers=run.layers, before=run.sizer.dense,
        after=recovery.after, seconds=time.perf_counter() - run.start, calib_samples=run.selection_samples,
        seed=run.options.seed, refit=refit, reconstruct=run.reconstruct if refit else None,
        recovery_samples=run.calib.samples if run.reads_data else 0, recalibration=recovery.recalibration,
        scope=run.scope, skipped=skipped, stages=recovery.stages, method_options=options_of(run.method),
    )


def _input_spec(example_inputs) -> dict | None:
    """Shape and dtype of a one-sample tensor input, enough to rebuild the graph when loading."""
    if isinstance(example_inputs, Tensor):
        return {"shape": [1, *example_inputs.shape[1:]], "dtype": str(example_inputs.dtype).replace("torch.", "")}
    return None
