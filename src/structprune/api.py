"""``structprune.prune``: the whole pipeline, shallow group to deep group."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import methods as method_registry
from .capture import DEFAULT_MEMORY_BYTES, batch_size, capture, materialize, take_samples
from .errors import StructPruneError
from .graph import PruningGraph
from .measure import count
from .methods.base import GroupView, Method, Selection


@dataclass
class PruneResult:
    """What :func:`prune` returns.

    model: the pruned model (a new module; the input model is left as it was).
    layers: one dict per group, shallow to deep: name, channels, kept, relative_residual
        (‖Y − Ŷ‖/‖Y‖ of the group's consumers on the calibration rows), consumers, and the
        method's own stats.
    before, after: {"params", "macs"} of the dense and the pruned model.
    seconds: wall time of the pruning (capture + selection + surgery).
    skipped: groups left whole, with the reason.
    """

    model: nn.Module
    method: str
    ratio: float
    layers: list[dict]
    before: dict[str, int]
    after: dict[str, int]
    seconds: float
    calib_samples: int
    seed: int
    skipped: list[dict] = field(default_factory=list)
    method_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything but the model, JSON-ready."""
        return {
            "method": self.method, "method_options": self.method_options, "ratio": self.ratio,
            "calib_samples": self.calib_samples, "seed": self.seed, "seconds": self.seconds,
            "before": self.before, "after": self.after,
            "params_ratio": self.after["params"] / max(self.before["params"], 1),
            "macs_ratio": self.after["macs"] / max(self.before["macs"], 1),
            "layers": self.layers, "skipped": self.skipped,
        }


def keep_count(channels: int, ratio: float) -> int:
    """Channels a group of ``channels`` keeps at keep-ratio ``ratio``: ⌈ratio·channels⌉, at least 1."""
    return min(channels, max(1, math.ceil(ratio * channels - 1e-9)))


def prune(
    model: nn.Module,
    calib_loader: Iterable,
    method: str | Method = "ispasp",
    ratio: float = 0.5,
    example_inputs=None,
    *,
    calib_samples: int | None = None,
    ignored_layers: Sequence[str | nn.Module] = (),
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    seed: int = 0,
    progress: bool = True,
    **method_kwargs,
) -> PruneResult:
    """Prune every prunable group of ``model`` to a fraction ``ratio`` of its channels.

    Groups are pruned one after another, shallow to deep; each group's hidden representation is
    captured from the network as already pruned upstream, and the dense target from the consumer
    layers (not yet pruned on their input side) on those same inputs.

    Parameters
    ----------
    model: a trained ``nn.Module``; it is copied, never modified.
    calib_loader: iterable of calibration batches: ``x``, ``(x, y)`` or dicts of keyword inputs.
        The first ``calib_samples`` samples are read once and reused for every group.
    method: a name from :func:`structprune.methods.available` or a Method instance.
    ratio: fraction of each group's channels to keep, in (0, 1]; 1 keeps everything.
    example_inputs: a batch for tracing the model; default: the first calibration sample.
    calib_samples: calibration samples to use; default: the method's own (1,280 for i-SpaSP).
    ignored_layers: layers (names or modules of ``model``) whose outputs keep all channels.
        The output layer is always kept whole.
    memory_bytes: bound on the captured rows per consumer (see :mod:`structprune.capture`).
    seed: seeds sampling of positions and of randomised methods; the same seed gives the same result.
    progress: show a progress bar over groups.
    method_kwargs: options of the method, e.g. ``iterations=20`` for i-SpaSP.

    Examples
    --------
    >>> import torch, structprune
    >>> net = structprune.models.create("lenet300")
    >>> data = [(torch.randn(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))]
    >>> result = structprune.prune(net, data, method="ispasp", ratio=0.5, progress=False)
    >>> result.after["params"] < result.before["params"]
    True
    """
    if not isinstance(model, nn.Module):
        raise StructPruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise StructPruneError(f"ratio must be in (0, 1] (the fraction of channels kept), got {ratio!r}")
    if isinstance(method, str):
        method = method_registry.get(method, **method_kwargs)
    elif method_kwargs:
        raise StructPruneError("method options can only be given with a method name, not a Method instance")
    if calib_samples is not None and (not isinstance(calib_samples, int) or calib_samples < 1):
        raise StructPruneError(f"calib_samples must be a positive integer, got {calib_samples!r}")
    if memory_bytes < 1:
        raise StructPruneError(f"memory_bytes must be positive, got {memory_bytes!r}")

    start = time.perf_counter()
    names = {module: name for name, module in model.named_modules()}
    ignored_names = [_layer_name(layer, names) for layer in ignored_layers]
    pruned = copy.deepcopy(model).eval()
    device = next(pruned.parameters(), torch.empty(0)).device
    batches = materialize(calib_loader, calib_samples or method.calib_samples, device)
    if example_inputs is None:
        example_inputs = take_samples(batches[0], 1, device)
    graph = PruningGraph(pruned, example_inputs, [pruned.get_submodule(n) for n in ignored_names])
    before = count(pruned, example_inputs)

    layers = []
    bar = tqdm(total=len(graph), desc=f"pruning ({method.name})", unit="group",
               disable=None if progress else True)  # None: shown on a terminal only
    for group in graph.groups():
        keep = keep_count(group.channels, ratio)
        entry = {"group": group.name, "channels": group.channels, "kept": keep,
                 "consumers": [c.name for c in group.consumers]}
        if keep < group.channels:
            view = capture(pruned, group, batches, memory_bytes=memory_bytes, seed=seed)
            selection = method.select(view, keep)
            _check_selection(selection, group.name, group.channels, keep)
            entry["relative_residual"] = relative_residual(view, selection)
            entry.update(selection.stats)
            graph.apply(group, selection.keep_idx, selection.consumer_weights)
        else:
            entry["relative_residual"] = 0.0
        layers.append(entry)
        bar.update(1)
    bar.update(len(graph) - bar.n)  # groups skipped with a warning count as done
    bar.close()

    after = count(pruned, example_inputs)
    pruned.structprune_history = list(getattr(model, "structprune_history", [])) + graph.history()
    pruned.structprune_example_input = _input_spec(example_inputs)
    return PruneResult(
        model=pruned, method=method.name, ratio=float(ratio), layers=layers, before=before, after=after,
        seconds=time.perf_counter() - start, calib_samples=sum(batch_size(b) for b in batches), seed=seed,
        skipped=[{"group": g, "reason": r} for g, r in graph.skipped],
        method_options={k: v for k, v in vars(method).items() if not k.startswith("_") and k != "name"},
    )


def relative_residual(view: GroupView, selection: Selection) -> float:
    """‖Y − Ŷ‖/‖Y‖ over all consumers of the group, Ŷ using only the kept channels (and new weights)."""
    weights = selection.consumer_weights or {}
    sq_error = sq_dense = 0.0
    for consumer in view.consumers:
        dense = consumer.output()
        kept = selection.keep_idx.to(dense.device)
        approx = consumer.output(kept, weight=weights.get(consumer.name))
        sq_error += float((dense - approx).square().sum())
        sq_dense += float(dense.square().sum())
    return (sq_error / sq_dense) ** 0.5 if sq_dense > 0 else 0.0


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
