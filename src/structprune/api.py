"""``structprune.prune``: the whole pipeline, shallow group to deep group (its stages: :mod:`structprune.pipeline`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from . import allocate, error_allocation, pipeline
from .capture import DEFAULT_MEMORY_BYTES
from .errors import StructPruneError
from .methods.base import Method
from .pipeline import BrokenForward, Options
from .progress import bar as progress_bar
from .result import PruneResult


def prune(model: nn.Module, calib_loader: Iterable, method: str | Method = "ispasp",
          budget: float | dict | allocate.Budget = 0.5, example_inputs=None, *, refit: bool = True,
          reconstruct: str = "auto", recalibrate: bool | None = None, scope: str = "auto",
          round_to: int | str | None = "auto", calib_samples: int | None = None, recovery_samples: int | None = None,
          recalibration_samples: int | None = None, ignored_layers: Sequence[str | nn.Module] = (),
          memory_bytes: int = DEFAULT_MEMORY_BYTES, stream: bool = False, seed: int = 0, progress: bool = True,
          after_group: Callable[[nn.Module, str], None] | None = None, loss_fn: Callable | None = None,
          in_place: bool = False, **method_kwargs) -> PruneResult:
    """Prune the prunable groups of ``model`` to a budget, shallow to deep, in one pass, and recover.

    Each group's hidden representation is captured from the network as already pruned upstream. The default
    pipeline is: the method's selection → least-squares refit of the layers that read the group → BatchNorm
    recalibration; ``refit=False, recalibrate=False`` is the method's bare one-shot step.

    Parameters
    ----------
    model: a trained ``nn.Module``; it is copied, never modified (unless ``in_place``).
    calib_loader: calibration batches: ``x``, ``(x, y)`` or dicts of keyword inputs; read once (see ``stream``).
    method: a name from :func:`structprune.methods.available` or a :class:`~structprune.methods.Method`.
    budget: a keep ratio in (0, 1] for every group, a dict of group patterns to ratios, or
        :class:`~structprune.allocate.Target` (a fraction of the MACs, params or latency; :mod:`structprune.allocate`).
    example_inputs: a batch for tracing the model; default: the first calibration sample.
    refit: refit each consumer's weights (and bias) on the kept channels by least squares (:mod:`~structprune.refit`).
    reconstruct: the refit's target: "original" (each layer's output in the original model: undoes the upstream
        error) or "layer" (the dense layer on the pruned inputs); "auto": "layer" where residual streams carry
        the upstream error around the layers (measured better there), else "original".
    recalibrate: recompute the BatchNorm statistics on the recovery samples; default: when there is BatchNorm.
    scope: "all" groups, or "inner" (channels no residual stream shares, as i-SpaSP's paper prunes); "auto": for a
        Target, "inner" where those groups alone can meet it keeping at least half their channels, else "all"
        (:func:`structprune.pipeline.allocate`).
    round_to: keep counts rounded up to multiples of this; None: as they fall; "auto": for a MACs or params
        Target, the device's channel block (16 on AVX-512 CPUs, else 8) for groups of at least 4 blocks
        (:func:`structprune.allocate.plan`); ``budget["round_to"]`` in the report says what was used.
    calib_samples: samples the method selects on; default: the method's own (i-SpaSP 1,280, PFP ⌈3·ln(8·η·η*/δ)⌉).
    recovery_samples: samples the refit and recalibration read (the selection's first); default: up to 2,048.
    recalibration_samples: of those, the BatchNorm recalibration's (whole batches); default: 512.
    ignored_layers: layers (names or modules) whose outputs keep all channels; the output layer always does.
    memory_bytes: bound on the rows captured per consumer (:mod:`structprune.capture`); kept block inputs
        (:mod:`structprune.activation_cache`) take at most 4× as much.
    stream: keep no calibration samples in memory; re-read ``calib_loader`` (same samples, no shuffling) per group.
    seed: seeds sampling and randomised methods; the same seed gives the same result.
    progress: a progress bar on a terminal, a log line every few seconds elsewhere (:mod:`structprune.progress`).
    after_group: ``after_group(model, group_name)`` after each group, e.g. to fine-tune (:mod:`structprune.schedule`).
    loss_fn: ``loss_fn(outputs, targets)`` for methods that need loss gradients (taylor); default cross-entropy.
    in_place: prune ``model`` itself, no copy: half the memory, for models too large to hold twice. The refit then
        reconstructs each layer's own output (``reconstruct="layer"``; "original" and ``allocation="error"``, which
        need the original, are refused), and a run that fails leaves the model partly pruned (a forward pass
        broken by a removal is reported without the group's name: prune a copy to find it). A Target whose sizes
        cannot be read off the dense model (transformers) still counts pruned trial copies while it searches;
        keep ratios need none.
    method_kwargs: options of the method, e.g. ``iterations=20`` for i-SpaSP.

    Returns a :class:`~structprune.result.PruneResult`: the pruned model and the report.

    Examples
    --------
    >>> import torch, structprune
    >>> net = structprune.models.create("lenet300")
    >>> data = [(torch.randn(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))]
    >>> result = structprune.prune(net, data, method="ispasp", budget=0.5, progress=False)
    >>> result.after["params"] < result.before["params"]
    True
    """
    options = Options(refit=refit, reconstruct=reconstruct, recalibrate=recalibrate, scope=scope, round_to=round_to,
                      calib_samples=calib_samples, recovery_samples=recovery_samples,
                      recalibration_samples=recalibration_samples, ignored_layers=ignored_layers,
                      memory_bytes=memory_bytes, stream=stream, seed=seed, progress=progress, after_group=after_group,
                      loss_fn=loss_fn, in_place=in_place)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = _prune_or_name_the_breaking_group(model, calib_loader, method, budget, example_inputs, options,
                                                       method_kwargs)
    finally:
        for w in caught:  # shown to the caller as usual, and ours kept for the report
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    result.warnings = list(dict.fromkeys(str(w.message) for w in caught if str(w.message).startswith("structprune")))
    return result


def _prune_or_name_the_breaking_group(model, calib_loader, method, budget, example_inputs, options: Options,
                                      method_kwargs: dict) -> PruneResult:
    """:func:`_prune`; where the pruned model's forward pass fails, pruned again with a check after every group to
    name the one whose removal breaks it (in place, the caller's model is what broke: it is said so instead)."""
    try:
        return _prune(model, calib_loader, method, budget, example_inputs, options, method_kwargs)
    except BrokenForward as broken:
        if options.in_place:
            raise StructPruneError(f"the pruned model's forward pass fails ({broken}); pruned in place, the model is "
                                   f"left partly pruned: prune a copy (in_place=False) to find the group whose "
                                   f"removal breaks it") from None
        again = Options(**{**vars(options), "progress": False, "check_each_group": True})
        _prune(model, calib_loader, method, budget, example_inputs, again, method_kwargs)
        raise StructPruneError(f"the pruned model's forward pass fails ({broken}); no single group's removal was "
                               f"found to cause it") from None


def _prune(model, calib_loader, method, budget, example_inputs, options: Options, method_kwargs: dict
           ) -> PruneResult:
    """The stages in order: set up → allocate → each group (capture → select → refit → apply) → recover → report;
    for the error allocation, each group and the recovery once per candidate allocation, the best one reported."""
    run = pipeline.set_up(model, calib_loader, method, budget, example_inputs, options, method_kwargs)
    run.curves = error_allocation.curves
    allocation = pipeline.allocate(run)
    candidates = allocation.candidates or {"": allocation.keeps}  # the error allocation's: checked end to end
    best = None
    for i, (name, keeps) in enumerate(candidates.items()):
        if i:
            error_allocation.restart(run)
        bar = progress_bar(total=len(run.graph), desc=f"pruning ({run.method.name}{', ' + name if name else ''})",
                           unit="groups", enabled=options.progress)
        for group in run.graph.groups():
            pipeline.prune_group(run, group, keeps.get(group.name, group.channels))
            bar.update(1)
        bar.update(len(run.graph) - bar.n)  # groups skipped with a warning count as done
        bar.close()
        recovery = pipeline.recover(run)
        if len(candidates) > 1:
            best = error_allocation.keep_best(run, allocation, name, recovery, best)
    if best is not None:
        recovery = error_allocation.restore(run, allocation, best)
    error_allocation.measure(run, allocation)
    return pipeline.report(run, allocation, recovery)
