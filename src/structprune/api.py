"""``structprune.prune``: the whole pipeline, shallow group to deep group."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import allocate
from . import methods as method_registry
from .capture import (
    DEFAULT_MEMORY_BYTES,
    Calibration,
    batch_inputs,
    batch_size,
    capture,
    materialize,
    take_samples,
    weights_view,
)
from .errors import StructPruneError, check_positive_int, first_line
from .graph import PruningGraph, build_graph, out_features, run_forward
from .measure import count, counting, output_sizes
from .methods.base import GroupView, Method, Selection
from .methods.pfp import ZERO_BELOW
from .progress import bar as progress_bar
from .recalibrate import has_batchnorm, recalibrate_batchnorm
from .refit import refit as refit_selection
from .resume import ActivationCache, Chain, changed_modules, state

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
#: the kept block inputs of a pass (:mod:`structprune.resume`) take at most this many times ``memory_bytes``
CACHE_FACTOR = 4
SCOPES = ("auto", "all", "inner")


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    model: the pruned model (a new module; the input model is left as it was).
    layers: one dict per group, shallow to deep: name, channels, kept, relative_residual
        (‖Y − Ŷ‖/‖Y‖ of the group's consumers on the calibration rows; None for a data-free method without
        refit, which reads no calibration data), consumers, and the method's own stats. With ``refit``,
        relative_residual is the method's own selection and relative_residual_refit the one after the refit.
    budget: how the keep counts were found (for a target: the target, the achieved fraction, the error).
    before, after: {"params", "macs"} of the dense and the pruned model.
    seconds: wall time of the pruning (allocation + capture + selection + refit + surgery + recalibration).
    calib_samples, recovery_samples: samples the selection and the recovery read.
    recalibration: what the BatchNorm recalibration did (None when it did not run).
    stages: with labelled calibration batches, the top-1 accuracy (%) on the first (up to 512) of them of the
        dense model, after the selection and refit ("pruned"; "selected" without refit) and after the
        BatchNorm recalibration ("recalibrated"), with the number of samples; None otherwise, and for a
        weights-only selection without refit or recalibration, which reads no data at all (0 samples).
    scope: "all" or "inner" (see :func:`prune`); reconstruct: the refit's target, "original" or "layer".
    skipped: groups left whole, with the reason.
    warnings: every warning the pruning gave (also shown as Python warnings), for the report.
    """

    model: nn.Module
    method: str
    budget: dict
    layers: list[dict]
    before: dict[str, int]
    after: dict[str, int]
    seconds: float
    calib_samples: int
    seed: int
    refit: bool = False
    reconstruct: str | None = None
    recovery_samples: int = 0
    recalibration: dict | None = None
    scope: str = "all"
    stages: dict | None = None
    skipped: list[dict] = field(default_factory=list)
    method_options: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict, model: nn.Module | None = None) -> PruneResult:
        """The inverse of :meth:`to_dict` (the model is not part of it: pass it, or get None)."""
        return cls(model=model, method=d["method"], budget=d["budget"], layers=d["layers"], before=d["before"],
                   after=d["after"], seconds=d["seconds"], calib_samples=d["calib_samples"], seed=d["seed"],
                   refit=d["refit"], reconstruct=d.get("reconstruct"),
                   recovery_samples=d.get("recovery_samples", d["calib_samples"]),
                   recalibration=d.get("recalibration"), scope=d.get("scope", "all"), stages=d.get("stages"),
                   skipped=d["skipped"],
                   method_options=d["method_options"],
                   warnings=list(d.get("warnings", [])))

    def to_dict(self) -> dict:
        """Everything but the model, JSON-ready."""
        return {
            "method": self.method, "method_options": self.method_options, "budget": self.budget,
            "refit": self.refit, "reconstruct": self.reconstruct, "recalibration": self.recalibration,
            "scope": self.scope, "stages": self.stages,
            "calib_samples": self.calib_samples, "recovery_samples": self.recovery_samples, "seed": self.seed,
            "seconds": self.seconds,
            "before": self.before, "after": self.after,
            "params_ratio": self.after["params"] / max(self.before["params"], 1),
            "macs_ratio": self.after["macs"] / max(self.before["macs"], 1),
            "layers": self.layers, "skipped": self.skipped, "warnings": self.warnings,
        }


def prune(
    model: nn.Module,
    calib_loader: Iterable,
    method: str | Method = "ispasp",
    budget: float | dict | allocate.Budget = 0.5,
    example_inputs=None,
    *,
    refit: bool = True,
    reconstruct: str = "auto",
    recalibrate: bool | None = None,
    scope: str = "auto",
    round_to: int | str | None = "auto",
    calib_samples: int | None = None,
    recovery_samples: int | None = None,
    recalibration_samples: int | None = None,
    ignored_layers: Sequence[str | nn.Module] = (),
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    stream: bool = False,
    seed: int = 0,
    progress: bool = True,
    after_group: Callable[[nn.Module, str], None] | None = None,
    loss_fn: Callable | None = None,
    **method_kwargs,
) -> PruneResult:
    """Prune the prunable groups of ``model`` to a budget, shallow to deep, in one pass, and recover.

    Each group's hidden representation is captured from the network as already pruned upstream, and
    the dense target from the consumer layers (not yet pruned on their input side) on those same inputs.
    The default pipeline is: the method's selection → least-squares reconstruction of the consumers
    (``refit``) → BatchNorm recalibration (``recalibrate``); ``refit=False, recalibrate=False`` is the
    method's bare one-shot step.

    Parameters
    ----------
    model: a trained ``nn.Module``; it is copied, never modified.
    calib_loader: iterable of calibration batches: ``x``, ``(x, y)`` or dicts of keyword inputs.
        The first ``max(calib_samples, recovery_samples)`` samples are read once and reused for every group.
    method: a name from :func:`structprune.methods.available` or a Method instance.
    budget: a keep ratio in (0, 1] for every group (1 keeps everything), a dict of layer patterns to
        ratios, or :class:`structprune.allocate.Target` (a fraction of MACs or params to keep, with
        uniform or PFP allocation); see :mod:`structprune.allocate`.
    example_inputs: a batch for tracing the model; default: the first calibration sample.
    refit: after the method's selection, refit each consumer's weights (and bias) on the kept channels by
        least squares (:mod:`structprune.refit`); the report keeps both residuals. Default on.
    reconstruct: what the refit reconstructs: "original", each layer's output in the original model (so
        the refit also undoes the error accumulated upstream; one more forward pass of the original model
        per group), or "layer", the dense layer on the already-pruned inputs. "auto" (default): "original"
        for networks without residual streams, "layer" for those with (there the skip connections carry
        the upstream error around every layer, and correcting it in the branches measured worse:
        benchmarks/README.md).
    recalibrate: after pruning, recompute every BatchNorm's running statistics on the recovery samples
        (:mod:`structprune.recalibrate`). Default (None): on when the model has BatchNorm.
    scope: "all" prunes every group; "inner" only channels that no residual stream shares (block-internal
        ones, as the i-SpaSP paper prunes); residual streams are then kept whole. "auto" (default): for a
        :class:`~structprune.allocate.Target`, "inner" when the inner groups alone can meet it (measured
        better: benchmarks/README.md), else "all" (also when the search with the inner groups then misses the
        target, as a latency target can after the one timing that chose the scope: it is searched again over every
        group, and ``budget["inner_scope_achieved"]`` says what the inner groups reached); for keep ratios, "all".
    round_to: round every keep count up to a multiple of this (hardware-friendly widths), under any budget;
        None: the widths as they fall. ``"auto"`` (default): for a MACs or params
        :class:`~structprune.allocate.Target`, the multiple the model's device runs fastest
        (:data:`structprune.allocate.HARDWARE_MULTIPLE`: on CPU the channel block of its kernels, 16 with AVX-512
        and 8 otherwise, :func:`structprune.allocate.cpu_multiple`; 8 on CUDA; what ONNX Runtime needs to run a
        pruned CNN faster) for the groups at least :data:`structprune.allocate.AUTO_MIN_MULTIPLES` multiples wide
        (64 or 32 channels: a group of two multiples could only stay whole or be halved;
        ``budget["unrounded_groups"]`` lists the narrower ones), where it meets the target; none for keep ratios
        (the user's own widths, ⌈ratio·channels⌉) and latency targets (timed as they are).
        ``budget["round_to"]`` in the report says what was used.
    calib_samples: calibration samples the method selects on; default: the method's own (1,280 for
        i-SpaSP, PFP's ⌈3·ln(8·η·η*/δ)⌉ rule for PFP, 256 for the rest).
    recovery_samples: calibration samples the refit and the recalibration use (the first ones of
        ``calib_loader``, of which the selection's are the first ``calib_samples``); default: all the
        loader gives, up to :data:`RECOVERY_SAMPLES` (and at least ``calib_samples``).
    recalibration_samples: of those, the samples the BatchNorm recalibration reads (the first whole batches
        holding at least this many); default: :data:`RECALIBRATION_SAMPLES` (measured as good as 2,048). The
        report's ``recalibration["samples"]`` says how many it read.
    ignored_layers: layers (names or modules of ``model``) whose outputs keep all channels.
        The output layer is always kept whole.
    memory_bytes: bound on the captured rows per consumer (see :mod:`structprune.capture`). The inputs of one
        block kept between groups, so that a capture runs only the blocks after it (:mod:`structprune.resume`),
        and the outputs of the layers that read them take at most ``CACHE_FACTOR`` (4) times as much together.
    stream: do not keep the calibration samples in memory; re-read ``calib_loader`` for every group
        (it must give the same samples each pass: no shuffling). Memory then stays bounded however
        large the calibration set; each group costs one pass over it.
    seed: seeds sampling of positions and of randomised methods; the same seed gives the same result.
    progress: report progress over groups: a bar on a terminal, a log line every few seconds elsewhere
        (:mod:`structprune.progress`).
    after_group: called as ``after_group(model, group_name)`` after each group is pruned, e.g. to
        fine-tune between groups (the sequential schedule, :mod:`structprune.schedule`).
    loss_fn: ``loss_fn(outputs, targets)`` for methods that need loss gradients (taylor);
        default cross-entropy.
    method_kwargs: options of the method, e.g. ``iterations=20`` for i-SpaSP.

    Examples
    --------
    >>> import torch, structprune
    >>> net = structprune.models.create("lenet300")
    >>> data = [(torch.randn(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))]
    >>> result = structprune.prune(net, data, method="ispasp", budget=0.5, progress=False)
    >>> result.after["params"] < result.before["params"]
    True
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            options = dict(refit=refit, reconstruct=reconstruct, recalibrate=recalibrate, scope=scope,
                           round_to=round_to, calib_samples=calib_samples, recovery_samples=recovery_samples,
                           recalibration_samples=recalibration_samples,
                           ignored_layers=ignored_layers, memory_bytes=memory_bytes, stream=stream, seed=seed,
                           after_group=after_group, loss_fn=loss_fn, **method_kwargs)
            try:
                result = _prune(model, calib_loader, method, budget, example_inputs, progress=progress, **options)
            except _BrokenForward as broken:  # pruned again, checking after every group, to name the one
                _prune(model, calib_loader, method, budget, example_inputs, progress=False, check_each_group=True,
                       **options)
                raise StructPruneError(f"the pruned model's forward pass fails ({broken}); no single group's "
                                       f"removal was found to cause it") from None
    finally:
        for w in caught:  # shown to the caller as usual, and ours kept for the report
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    result.warnings = list(dict.fromkeys(str(w.message) for w in caught if str(w.message).startswith("structprune")))
    return result


def _prune(model, calib_loader, method, budget, example_inputs, *, refit, reconstruct, recalibrate, scope, round_to,
           calib_samples, recovery_samples, recalibration_samples, ignored_layers, memory_bytes, stream, seed,
           progress, after_group, loss_fn, check_each_group: bool = False, **method_kwargs) -> PruneResult:
    if not isinstance(model, nn.Module):
        raise StructPruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    budget = allocate.as_budget(budget)
    if isinstance(method, str):
        method = method_registry.get(method, **method_kwargs)
    elif method_kwargs:
        raise StructPruneError("method options can only be given with a method name, not a Method instance")
    if calib_samples is not None:
        check_positive_int(calib_samples, "calib_samples")
    if recovery_samples is not None:
        check_positive_int(recovery_samples, "recovery_samples")
    if recalibration_samples is not None:
        check_positive_int(recalibration_samples, "recalibration_samples")
    allocate.resolve_round_to(round_to, "cpu", budget)  # a bad value is an error before any work (plan resolves it)
    if reconstruct not in RECONSTRUCT:
        raise StructPruneError(f"reconstruct must be one of {', '.join(RECONSTRUCT)}, got {reconstruct!r}")
    if scope not in SCOPES:
        raise StructPruneError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if memory_bytes < 1:
        raise StructPruneError(f"memory_bytes must be positive, got {memory_bytes!r}")

    start = time.perf_counter()
    names = {module: name for name, module in model.named_modules()}
    ignored_names = [_layer_name(layer, names) for layer in ignored_layers]
    pruned = copy.deepcopy(model).eval()
    first = next(pruned.parameters(), torch.empty(0))
    device, dtype = first.device, first.dtype  # calibration data is moved and cast to the model's
    if example_inputs is not None:
        example_inputs = take_samples(example_inputs, None, device, dtype)
    if calib_samples is None:
        calib_samples = _default_calib_samples(method, pruned, calib_loader, device, example_inputs)
    if recalibrate is None:
        recalibrate = has_batchnorm(pruned)
    if recovery_samples is None:
        recovery_samples = max(calib_samples, RECOVERY_SAMPLES) if refit or recalibrate else calib_samples
    # a weights-only selection with no recovery (and no PFP allocation) reads no data: at most one sample, for
    # the example input, and no accuracy stages
    reads_data = (refit or recalibrate or getattr(method, "data_informed", True)
                  or getattr(budget, "allocation", "uniform") == "pfp")
    samples = max(calib_samples, recovery_samples) if reads_data else (0 if example_inputs is not None else 1)
    calib = Calibration(calib_loader, samples, device, dtype, stream=stream) if samples else None
    selection_samples = min(calib_samples, calib.samples) if reads_data else 0
    if example_inputs is None:
        example_inputs = take_samples(calib.first(), 1, device)
    auto_scope = scope == "auto"
    if auto_scope:
        scope = _auto_scope(budget, model, example_inputs, ignored_names)

    def scoped(scope: str) -> tuple[PruningGraph, allocate.Sizer]:
        graph = build_graph(pruned, example_inputs, [pruned.get_submodule(n) for n in ignored_names], scope,
                            observe=counting(pruned))  # the dense size, counted on the pass that orders the layers
        sizer = allocate.Sizer(model, example_inputs, ignored_names, graph, scope,  # model: the caller's, never pruned
                               latency_batch=_latency_batch(budget),
                               dense=graph.observed() if graph.observed is not None else None)
        return graph, sizer

    graph, sizer = scoped(scope)
    if reconstruct == "auto":
        reconstruct = "layer" if graph.residual_layers else "original"
    needs_gradients = getattr(method, "needs_gradients", False)
    if needs_gradients and not calib.labelled:
        raise StructPruneError(f"method {method.name} needs labelled calibration batches: (inputs, targets) pairs")
    pfp_allocation = getattr(budget, "allocation", "uniform") == "pfp"
    captures = refit or getattr(method, "data_informed", True)
    cache, reference_cache = _caches(model, pruned, example_inputs, calib, memory_bytes,
                                     (captures or pfp_allocation) and not stream and not needs_gradients,
                                     refit and reconstruct == "original")

    zero_below = getattr(method, "zero_below", ZERO_BELOW)  # PFP's, for its sensitivities (selection, allocation)

    def plan(graph: PruningGraph, sizer: allocate.Sizer) -> allocate.Allocation:
        return allocate.plan(budget, sizer, round_to, lambda: allocate.pfp_sensitivities(
            pruned, graph, calib, memory_bytes, seed, selection_samples, cache=cache, zero_below=zero_below),
            device=device)

    allocation = plan(graph, sizer)
    if auto_scope and scope == "inner" and _missed_above(allocation.info, budget):
        # the scope was chosen on one timing of the smallest inner allocation; a latency search that then finds
        # the inner groups too slow (the residual streams' work stays) searches again over every group
        inner_achieved = allocation.info["achieved"]
        scope = "all"
        graph, sizer = scoped(scope)
        allocation = plan(graph, sizer)
        allocation.info["inner_scope_achieved"] = inner_achieved
    _warn_if_missed(allocation.info, budget)
    _warn_if_clamped(allocation.keeps, sizer.groups, budget)
    _warn_if_nothing_to_prune(pruned, sizer.groups, ignored_names)

    original_outputs: dict[str, Tensor] = {}  # layer name -> its current outputs' indices in the original model
    # the forward pass checked after every removal: with a callback between groups (it would fail obscurely), or
    # asked for (to name the group that broke it). Else once, at the end, and a capture that fails after a
    # removal reports it: then everything is pruned again with checks (prune()), which names the group
    checked = after_group is not None or check_each_group
    layers = []
    bar = progress_bar(total=len(graph), desc=f"pruning ({method.name})", unit="groups", enabled=progress)
    for group in graph.groups():
        keep = allocation.keeps.get(group.name, group.channels)
        entry = {"group": group.name, "channels": group.channels, "kept": keep,
                 "consumers": [c.name for c in group.consumers]}
        if keep < group.channels:
            reference = None
            if refit and reconstruct == "original":
                reference = _reference(model, group, graph, original_outputs)
            if captures:
                try:
                    view = capture(pruned, group, calib, memory_bytes=memory_bytes, seed=seed, loss_fn=loss_fn,
                                   gradients=needs_gradients, sensitivity_samples=selection_samples
                                   if getattr(method, "needs_sensitivity", False) else 0, zero_below=zero_below,
                                   reference=reference, cache=cache, reference_cache=reference_cache)
                except Exception as exc:  # after a removal: most likely it broke the forward pass (named below)
                    if checked or isinstance(exc, StructPruneError) or not any(
                            layer["kept"] < layer["channels"] for layer in layers):
                        raise
                    raise _BrokenForward(first_line(exc)) from None
            else:  # a data-free selection with nothing to refit: no pass over the calibration data at all
                view = weights_view(group, seed)
            selection = method.select(view.restrict(selection_samples), keep)
            _check_selection(selection, group.name, group.channels, keep)
            entry.update(selection.stats)
            selections = [selection]
            if refit:
                selection = refit_selection(view, selection)
                selections.append(selection)
                entry["refit"] = selection.stats["refit"]
            if len(view.consumers[0].inputs):  # captured: the residuals of the selection (and of the refit)
                residuals = relative_residuals(view, selections)
                entry["relative_residual"] = residuals[0]
                if refit:
                    entry["relative_residual_refit"] = residuals[1]
            else:
                entry["relative_residual"] = None
            kept_rows = {p.name: p.channel_index[selection.keep_idx].reshape(-1).sort().values
                         for p in group.producers}  # each producer's output rows the removal keeps
            _track_outputs(original_outputs, group, kept_rows)
            before = state(pruned) if cache is not None else None
            graph.apply(group, selection.keep_idx, selection.consumer_weights, selection.consumer_biases)
            if cache is not None:  # the producers' recorded outputs stand for the next pass, in the rows kept
                cache.pruned(kept_rows.items())
                cache.changed(changed_modules(before, state(pruned)))
            if checked:
                _check_forward(pruned, example_inputs, group.name)
            if after_group is not None:
                after_group(pruned, group.name)
                graph.forget()  # the callback may have changed anything: later groups are resolved afresh
                if cache is not None:
                    cache.drop()  # anything may have changed
        else:
            entry["relative_residual"] = 0.0
        layers.append(entry)
        bar.update(1)
    bar.update(len(graph) - bar.n)  # groups skipped with a warning count as done
    bar.close()
    # the pruned size (BatchNorm statistics change no size); its forward pass is the end check
    try:
        after = count(pruned, example_inputs)
    except Exception as exc:
        if checked:
            raise
        raise _BrokenForward(first_line(exc)) from None
    recalibration = None
    pruned_any = any(layer["kept"] < layer["channels"] for layer in layers)
    stages = _StageAccuracy(calib) if pruned_any and reads_data else None
    if stages is not None:
        stages.score("dense", model)
        stages.score("pruned" if refit else "selected", pruned)
    if pruned_any and recalibrate:
        recalibration = recalibrate_batchnorm(pruned, _first_batches(
            calib, RECALIBRATION_SAMPLES if recalibration_samples is None else recalibration_samples))
        if stages is not None:
            stages.score("recalibrated", pruned)

    pruned.structprune_history = list(getattr(model, "structprune_history", [])) + graph.history()
    pruned.structprune_example_input = _input_spec(example_inputs)
    skipped = [{"group": g, "reason": r} for g, r in graph.skipped]
    skipped += [{"group": g, "reason": "residual stream (scope='inner')"} for g in graph.out_of_scope]
    return PruneResult(
        model=pruned, method=method.name, budget=allocation.info, layers=layers, before=sizer.dense, after=after,
        seconds=time.perf_counter() - start, calib_samples=selection_samples, seed=seed,
        refit=refit, reconstruct=reconstruct if refit else None, recovery_samples=calib.samples if reads_data else 0,
        recalibration=recalibration, scope=scope, skipped=skipped,
        stages=stages.accuracy if stages is not None and stages.accuracy else None,
        method_options={k: v for k, v in vars(method).items() if not k.startswith("_") and k != "name"},
    )


def _caches(model: nn.Module, pruned: nn.Module, example_inputs, calib: Calibration, memory_bytes: int,
            wanted: bool, reference: bool) -> tuple[ActivationCache | None, ActivationCache | None]:
    """Kept block inputs of the model under pruning and, for a refit to the original, of the original
    (:mod:`structprune.resume`), each bounded by ``CACHE_FACTOR × memory_bytes``; None where the model has no
    chain of blocks, or where no pass is resumed (nothing captured, streamed calibration, loss gradients)."""
    if not wanted:
        return None, None
    chain = Chain(pruned, example_inputs)
    if not len(chain):
        return None, None
    limit = CACHE_FACTOR * memory_bytes
    return (ActivationCache(pruned, chain, example_inputs, calib.samples, limit),
            ActivationCache(model, chain, example_inputs, calib.samples, limit) if reference else None)


def _first_batches(batches: Iterable, samples: int) -> Iterator:
    """The first whole batches of ``batches`` that hold at least ``samples`` samples (no batch cut short: a
    training-mode BatchNorm needs more than one value per channel)."""
    seen = 0
    for batch in batches:
        if seen >= samples:
            return
        yield batch
        seen += batch_size(batch_inputs(batch))


def _reference(model: nn.Module, group, graph, original_outputs: dict[str, Tensor]):
    """What capture needs to record the original model's output of the group's consumers (those that do not
    add into a residual stream, which keep the layer target): the model and each consumer's current outputs'
    indices in it."""
    targets = {c.name: original_outputs.get(c.name, torch.arange(out_features(c.module)))
               for c in group.consumers if c.name not in graph.residual_layers}
    return (model, targets) if targets else None


def _track_outputs(original_outputs: dict[str, Tensor], group, kept_rows: dict[str, Tensor]) -> None:
    """Record which of the original outputs each of the group's producers keeps, given the output rows it keeps
    now (indices compose over groups)."""
    for producer in group.producers:
        current = original_outputs.get(producer.name, torch.arange(out_features(producer.module)))
        original_outputs[producer.name] = current[kept_rows[producer.name]]


class _StageAccuracy:
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


def _auto_scope(budget, model: nn.Module, example_inputs, ignored_names: list[str]) -> str:
    """"inner" for a size target that the groups no residual stream shares can meet on their own, else "all"."""
    if not isinstance(budget, allocate.Target):
        return "all"
    trial = copy.deepcopy(model).eval()
    graph = build_graph(trial, example_inputs, [trial.get_submodule(n) for n in ignored_names], "inner")
    if not graph.out_of_scope:
        return "all"  # no residual stream: both scopes are the same
    sizer = allocate.Sizer(model, example_inputs, ignored_names, graph, "inner", latency_batch=_latency_batch(budget))
    if not sizer.groups:
        return "all"
    smallest = sizer.fraction({name: 1 for name in sizer.groups}, budget.metric)
    return "inner" if smallest <= budget.fraction * (1 + budget.tolerance) else "all"


def _latency_batch(budget) -> int | None:
    """The batch a latency target is measured at (None for any other budget: nothing is timed)."""
    return budget.batch if isinstance(budget, allocate.Target) and budget.metric == "latency" else None


def _default_calib_samples(method: Method, model: nn.Module, calib_loader, device, example_inputs) -> int:
    """The method's own calibration-set size; PFP's depends on the model's layer sizes."""
    rule = getattr(method, "default_calib_samples", None)
    if rule is None:
        return method.calib_samples
    if example_inputs is None:
        example_inputs = take_samples(materialize(calib_loader, 1, device, model_dtype(model))[0][0], 1, device)
    sizes = output_sizes(model, example_inputs)
    return rule([s["elements"] for s in sizes.values()]) if sizes else method.calib_samples


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters(), torch.empty(0)).dtype


class _BrokenForward(Exception):
    """The pruned model's forward pass fails: at the end, or in a capture after a removal (the groups are not
    checked one by one unless asked: prune() then prunes again with ``check_each_group`` to name the group)."""


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


def _missed_above(info: dict, budget) -> bool:
    """Whether a target's allocation kept more than the target allows (the groups could not shrink enough)."""
    return info.get("budget") == "target" and info["achieved"] > info["target"] * (1 + budget.tolerance)


def _warn_if_missed(info: dict, budget) -> None:
    if info.get("budget") == "target" and info["relative_error"] > budget.tolerance:
        warnings.warn(missed_target(info["metric"], info["target"], info["achieved"], budget.tolerance),
                      stacklevel=4)


def missed_target(metric: str, target: float, achieved: float, tolerance: float) -> str:
    """The warning for a size target that whole channels cannot meet."""
    why = "with whole channels and this machine's timing noise" if metric == "latency" else "with whole channels"
    return (f"structprune: the {metric} target {target:.4g} could not be met within {tolerance:.0%} {why}; the "
            f"closest allocation keeps {achieved:.4f}")


def _warn_if_clamped(keeps: dict[str, int], channels: dict[str, int], budget) -> None:
    """A ratio so small that it rounds to no channel keeps one per group: say so rather than silently."""
    if isinstance(budget, allocate.Target):
        return
    ratio = budget.ratio if isinstance(budget, allocate.Uniform) else None
    clamped = [name for name, keep in keeps.items()
               if keep == 1 and ratio is not None and ratio * channels[name] < 0.5]
    if clamped:
        warnings.warn(f"structprune: ratio {ratio:g} rounds to no channel in {len(clamped)} group(s) "
                      f"({', '.join(clamped[:3])}{', ...' if len(clamped) > 3 else ''}); each keeps 1 channel, "
                      f"the minimum", stacklevel=4)


def _warn_if_nothing_to_prune(model: nn.Module, groups: dict[str, int], ignored: list[str]) -> None:
    if not groups and ignored:
        warnings.warn(f"structprune: every prunable group is ignored ({', '.join(ignored[:3])}"
                      f"{', ...' if len(ignored) > 3 else ''}); nothing was pruned", stacklevel=4)
    elif not groups:
        others = sorted({type(m).__name__ for m in model.modules()
                         if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and any(
                             p.dim() > 1 for p in m.parameters(recurse=False))})
        found = f" (layers of type {', '.join(others)} are not pruned)" if others else ""
        warnings.warn(f"structprune: the model has no prunable group: structprune removes channels between "
                      f"Linear, Conv1d and Conv2d layers{found}; nothing was pruned", stacklevel=4)


def relative_residuals(view: GroupView, selections: list[Selection]) -> list[float]:
    """‖Y − Ŷ‖/‖Y‖ over all consumers of the group for each selection, Ŷ using only its kept channels (and
    new weights and biases); the dense Y is computed once."""
    sq_errors, sq_dense = [0.0] * len(selections), 0.0
    for consumer in view.consumers:
        dense = consumer.output()
        sq_dense += float(dense.square().sum())
        for i, selection in enumerate(selections):
            approx = consumer.output(selection.keep_idx.to(dense.device),
                                     weight=(selection.consumer_weights or {}).get(consumer.name),
                                     bias=(selection.consumer_biases or {}).get(consumer.name))
            sq_errors[i] += float((dense - approx).square().sum())
    return [(e / sq_dense) ** 0.5 if sq_dense > 0 else 0.0 for e in sq_errors]


def _check_selection(selection: Selection, group: str, channels: int, keep: int) -> None:
    idx = selection.keep_idx
    if not isinstance(idx, Tensor) or idx.dim() != 1 or len(idx) != keep:
        raise RuntimeError(f"method returned {idx!r} for group {group}; expected {keep} indices")
    if len(torch.unique(idx)) != keep or int(idx.min()) < 0 or int(idx.max()) >= channels:
        raise RuntimeError(f"method returned invalid indices for group {group}: {idx.tolist()}")
    selection.keep_idx = torch.sort(idx.long().cpu()).values


def _layer_name(layer: str | nn.Module, names: dict) -> str:
    if isinstance(layer, str):
        if layer not in names.values():
            raise StructPruneError(f"ignored_layers: the model has no layer named {layer!r}")
        return layer
    if layer not in names:
        raise StructPruneError(f"ignored_layers: {type(layer).__name__} is not a layer of the model")
    return names[layer]


def _input_spec(example_inputs) -> dict | None:
    """Shape and dtype of a one-sample tensor input, enough to rebuild the graph when loading."""
    if isinstance(example_inputs, Tensor):
        return {"shape": [1, *example_inputs.shape[1:]], "dtype": str(example_inputs.dtype).replace("torch.", "")}
    return None
