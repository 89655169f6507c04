"""Budgets: how many channels each group keeps.

A budget is one of

* a number r in (0, 1]: every group keeps ⌈r·channels⌉ (:class:`Uniform`);
* a dict of group-name patterns to keep ratios, e.g. ``{"layer3.*": 0.25, "*": 0.75}`` (:class:`PerLayer`);
* :class:`Target`: a fraction of the dense model's MACs (``metric="flops"``), parameters or measured latency
  (``metric="latency"``: forward time on this machine, at ``batch`` samples) to keep, met on the *real* pruned
  model (residual and concatenation coupling included). With
  ``allocation="uniform"`` one keep ratio shared by all groups is searched; with ``allocation="pfp"``
  the per-group counts follow PFP's δ-based rule (below) with one ε shared by all groups.

Sizes are the counter's, not a model's. MACs and parameters of a candidate allocation are read off the
dense model (:mod:`structprune.sizing`: each layer call's count times the kept fractions of its channels,
exact where its rules cover the model, which it checks) and the chosen allocation is applied to a copy of the
model (first-k channels; sizes do not depend on which channels) and counted with the same counter as the
report; a disagreement searches again with every candidate counted on a copy. For a latency target every
candidate copy is timed against the dense model (:func:`structprune.measure.latency_ratio`: the median ratio of
``torch.utils.benchmark`` runs of the two in back-to-back pairs of blocks, on the model's device), so the latency a
user asks for is the one this machine measures, with its kernels' preferences for some widths included (no
per-layer model to drift from it).

PFP allocation (Liebenwein et al., 2020). For group ℓ with channel sensitivities s_j on calibration
data (see :mod:`structprune.methods.pfp`), S_ℓ = Σ_j s_j, p_j = s_j/S_ℓ, P_ℓ output positions and κ_ℓ
taps of its consumer (the largest α over consumers):

    α_ℓ = 2·3·ln(8·(P_ℓ + 1)·κ_ℓ/δ)
    m_ℓ(ε) = max(1, ⌈3·(6 + 2ε)·α_ℓ·S_ℓ/ε²⌉)
    keep_ℓ(ε) = clip(⌈Σ_j 1 − (1 − p_j)^m_ℓ⌉, 1, C_ℓ)

keep_ℓ falls as ε grows; ε is found by bisection (in log ε) so that the pruned model meets the target.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import StructPruneError, check_positive_int
from .graph import PruningGraph, build_graph
from .measure import count, latency_ratio, latency_stats, repeat_batch
from .sizing import AnalyticSizes, analytic_sizes
from .widths import _round_up, _scaled, _search_error, error_widths, keep_count, predicted

METRICS = {"flops": "macs", "params": "params", "latency": "latency_ms"}
#: pairs of blocks (candidate, dense; :func:`structprune.measure.latency_ratio`) per candidate of a latency search:
#: at 10, six timings of the same two models spread by 3.2–4.2% (relative s.d.) on this project's 2-core machine,
#: against 4.2–7.3% for two separate medians (benchmarks/latency_ratio.py, 2026-12-02)
LATENCY_PAIRS = 10
#: a latency target's default tolerance: timing on a shared machine moves by a few percent between runs
LATENCY_TOLERANCE = 0.05


@dataclass(frozen=True)
class Uniform:
    """Every group keeps ⌈ratio·channels⌉ channels."""

    ratio: float

    def __post_init__(self):
        _check_ratio(self.ratio, "ratio")


@dataclass(frozen=True)
class PerLayer:
    """Keep ratios by group: the first pattern (fnmatch, against the group's or a producer's name) that
    matches a group gives its ratio; groups no pattern matches keep ``default``."""

    ratios: dict
    default: float = 1.0

    def __post_init__(self):
        if not self.ratios:
            raise StructPruneError("per-layer budget: give at least one PATTERN=RATIO")
        for pattern, ratio in self.ratios.items():
            if not isinstance(pattern, str):
                raise StructPruneError(f"per-layer budget: patterns must be strings, got {pattern!r}")
            _check_ratio(ratio, f"ratio of {pattern!r}")
        _check_ratio(self.default, "default ratio")


#: how a Target's size is shared among the groups (module docstring of :func:`plan`)
ALLOCATIONS = ("uniform", "pfp", "error")


@dataclass(frozen=True)
class Target:
    """Keep ``fraction`` of the dense model's MACs (metric "flops"), parameters (metric "params") or latency
    (metric "latency": the forward time measured on this machine and the model's device, ``batch`` copies of
    the example input).

    allocation: "uniform" (one keep ratio for all groups), "pfp" (PFP's δ-based per-group counts) or "error"
        (for each group and candidate width, the network's output error on calibration samples with that group
        alone pruned there; the allocation of least summed error that meets the target; every group in scope,
        residual streams included).
    delta: PFP's failure probability δ (allocation "pfp" only).
    measured_widths: allocation "error" only: how many of each group's candidate widths the network's error is
        measured at, evenly spread (each costs a forward pass over the probe samples); between them the curve
        follows the refit's least-squares error of the group's consumers, scaled to the measured points. None
        (default): every candidate width is measured.
    tolerance: the pruned size must be within ``tolerance·fraction`` of the target; when no allocation of
        whole channels gets that close, the closest one is used and the report says how far it is. Default:
        0.01, and :data:`LATENCY_TOLERANCE` (0.05) for latency.
    batch: samples per forward pass for a latency target (default 64).
    """

    fraction: float
    metric: str = "flops"
    allocation: str = "uniform"
    delta: float = 1e-16
    tolerance: float | None = None
    batch: int = 64
    measured_widths: int | None = None

    def __post_init__(self):
        if self.tolerance is None:
            object.__setattr__(self, "tolerance", LATENCY_TOLERANCE if self.metric == "latency" else 0.01)
        check_positive_int(self.batch, "batch")
        _check_ratio(self.fraction, f"target {self.metric} fraction")
        if self.metric not in METRICS:
            raise StructPruneError(f"target metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.allocation not in ALLOCATIONS:
            raise StructPruneError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "error" and self.metric == "latency":
            raise StructPruneError("the error allocation takes a MACs or params target (a latency target would time "
                                   "thousands of candidates); use allocation='uniform' for latency")
        if self.measured_widths is not None:
            if self.allocation != "error":
                raise StructPruneError("measured_widths goes with allocation='error'")
            check_positive_int(self.measured_widths, "measured_widths")
        if not 0 < self.delta < 1:
            raise StructPruneError(f"delta must be in (0, 1), got {self.delta!r}")
        if not 0 < self.tolerance < 1:
            raise StructPruneError(f"tolerance must be in (0, 1), got {self.tolerance!r}")


Budget = Uniform | PerLayer | Target


def as_budget(budget) -> Budget:
    """A budget from a number (uniform ratio), a dict (per-layer ratios) or a budget object."""
    if isinstance(budget, (Uniform, PerLayer, Target)):
        return budget
    if isinstance(budget, dict):
        return PerLayer(dict(budget))
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return Uniform(float(budget))
    raise StructPruneError(f"budget: a keep ratio must be in (0, 1], or give a dict of layer patterns to ratios "
                           f"or structprune.Target(...); got {budget!r}")


def cpu_multiple(capability: str | None = None) -> int:
    """The channel block of this CPU's convolution kernels: 16 where PyTorch runs AVX-512 code (oneDNN's and ONNX
    Runtime's fp32 blocks are 16 floats there), else 8 (AVX2's 8 floats; any other CPU gets the same, unmeasured).
    Measured (benchmarks/conv_widths.py, eager and ONNX Runtime): on AVX-512 (2026-12-02) a 3×3 convolution's time
    steps at every 16 output channels (20 to 32 outputs cost the same), so a width in multiples of 8 but not of 16
    costs what the next multiple of 16 does; on AVX2 (2026-12-03) it steps at every 8."""
    if capability is None:
        probe = getattr(torch.backends.cpu, "get_cpu_capability", None)  # torch ≥ 2.1
        capability = probe() if probe is not None else ""
    return 16 if capability.upper().startswith("AVX512") else 8


#: the width multiple ``round_to="auto"`` (the default) takes per device type for a size target: the kept widths
#: the kernels run fastest. CPU (:func:`cpu_multiple`, 16 with AVX-512, else 8): ONNX Runtime's convolutions gain
#: from pruning only at such multiples, at no cost in accuracy (benchmarks/README.md, round_to.py, 2026-12-02 on an
#: AVX-512 CPU: ResNet-20/56 and VGG-16 at half the MACs with i-SpaSP and PFP's default pipeline, "auto" +0.06 to
#: +0.35 points over the widths as they fall and at or above multiples of 8 everywhere, ONNX Runtime ×1.35–1.58
#: faster than dense instead of ×0.77–1.15; MobileNetV2 ×1.79 instead of ×0.91); and a width between two
#: multiples costs what the next one does (conv_widths.py).
#: CUDA 8: tensor cores take fp16/bf16 matrices in multiples of 8 (NVIDIA's performance guide; not measured here,
#: no GPU).
HARDWARE_MULTIPLE = {"cpu": cpu_multiple(), "cuda": 8}
#: ``round_to="auto"`` rounds a group only where its layers have at least this many multiples of channels (32 or 64
#: on CPU): a group of 16 could only stay whole or be halved, which moves the pruning onto the other groups
#: (ResNet-20 at 70% of the MACs, default i-SpaSP: 91.85% with every group in multiples of 8, 92.56% with this
#: rule; benchmarks/README.md, recovery.py's two runs of 2026-12-02)
AUTO_MIN_MULTIPLES = 4


def resolve_round_to(round_to, device, budget=None) -> int | None:
    """``round_to`` as an int or None. ``"auto"``: for a MACs or params target (:class:`Target`, where structprune
    chooses the widths) :data:`HARDWARE_MULTIPLE` for ``device``'s type (None for a device type with no rule); None
    for keep ratios (a number or a dict: the user's own widths, ⌈ratio·channels⌉ each) and for a latency target
    (its search times the widths on this machine: which ones run fast is in the measurement)."""
    if isinstance(round_to, str):
        if round_to != "auto":
            raise StructPruneError(f"round_to must be a positive integer, 'auto' or None, got {round_to!r}")
        if not isinstance(budget, Target) or budget.metric == "latency":
            return None
        return HARDWARE_MULTIPLE.get(torch.device(device).type)
    if round_to is not None and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
        raise StructPruneError(f"round_to must be a positive integer, 'auto' or None, got {round_to!r}")
    return round_to


def _check_ratio(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise StructPruneError(f"{what} must be in (0, 1] (the fraction kept), got {value!r}")


class Sizer:
    """Params and MACs of the model with given per-group keep counts: read off the dense model where
    :mod:`structprune.sizing` covers it (the chosen allocation confirmed on a pruned copy, :meth:`confirm`),
    else measured on a pruned copy each (always, for latency).

    ``model`` must stay as it is while the Sizer is used (each evaluation prunes a fresh copy of it);
    ``graph`` is the graph (:func:`structprune.graph.build_graph`) of a model with the same structure,
    before any pruning.
    """

    def __init__(self, model: nn.Module, example_inputs, ignored_layers: list[str], graph: PruningGraph,
                 scope: str = "all", latency_batch: int | None = None, dense: dict[str, int] | None = None):
        self.model = model
        self.example_inputs = example_inputs
        self.ignored = list(ignored_layers)
        self.scope = scope
        #: with a batch size, every size also has the measured forward time ("latency_ms") at that batch
        self.latency_batch = latency_batch
        groups = graph.all_groups()
        self.groups = {g.name: g.channels for g in groups}
        #: layer channels per group channel (more than one where grouped convolutions tie channels together)
        self.widths = {g.name: 1 if g.members is None else int(g.members.shape[1]) for g in groups}
        self.layer_names = {g.name: [g.name] + [p.name for p in g.producers] for g in groups}
        #: the dense model's size; ``dense``: its count as :func:`structprune.measure.count` gives it, read already
        #: (on the graph's own pass: :func:`structprune.measure.counting`)
        self.dense = self._measure(self.model) if dense is None else dict(dense)
        if dense is not None and latency_batch is not None:
            self.dense["latency_ms"] = self._latency(self.model)
        self._cache: dict[tuple, dict[str, int]] = {}
        self._groups = groups
        self._analytic: AnalyticSizes | None | bool = False  # False: not looked at yet

    @property
    def analytic(self) -> AnalyticSizes | None:
        """Sizes read off the dense model (:mod:`structprune.sizing`) instead of pruned copies, where its rules
        cover the model and agree with the dense count (read at the first size asked); None: every size is a
        pruned copy's."""
        if self._analytic is False:
            analytic = None
            if self.latency_batch is None:
                analytic = analytic_sizes(self.model, self.example_inputs, self._groups)
                if analytic is not None and analytic.size({}) != self.dense:
                    analytic = None
            self._analytic = analytic
        return self._analytic

    def _measure(self, model: nn.Module) -> dict:
        size = count(model, self.example_inputs)
        if self.latency_batch is not None:
            size["latency_ms"] = self._latency(model)
        return size

    def _latency(self, model: nn.Module) -> float:
        """Median forward time (ms) at ``latency_batch``. A candidate's is the dense model's first timing times
        their ratio, timed in pairs of blocks (:func:`structprune.measure.latency_ratio`): the machine's speed
        drifts (load, clocks) by more than the tolerance between the first candidate and the last, and between two
        timings of a few seconds each; the two halves of a pair, much less."""
        batch = repeat_batch(self.example_inputs, self.latency_batch)
        if model is self.model:
            return latency_stats(model, batch)["median_ms"]
        return self.dense["latency_ms"] * latency_ratio(model, self.model, batch, min_pairs=LATENCY_PAIRS)["ratio"]

    def _graph(self, model: nn.Module) -> PruningGraph:
        return build_graph(model, self.example_inputs, [model.get_submodule(n) for n in self.ignored], self.scope)

    def size(self, keeps: dict[str, int]) -> dict[str, int]:
        key = tuple(keeps.get(name, channels) for name, channels in self.groups.items())
        if key == tuple(self.groups.values()):
            return self.dense  # nothing removed: the dense model's own size (a timing would only add noise)
        if key not in self._cache:
            self._cache[key] = self.analytic.size(keeps) if self.analytic is not None else self._pruned_size(keeps)
        return self._cache[key]

    def _pruned_size(self, keeps: dict[str, int]) -> dict:
        model = copy.deepcopy(self.model)
        graph = self._graph(model)
        for group in graph.groups():
            graph.apply(group, torch.arange(keeps.get(group.name, group.channels)))
        return self._measure(model)

    def confirm(self, keeps: dict[str, int]) -> bool:
        """Whether the size given for ``keeps`` is a pruned copy's. Where the sizes read off the dense model
        are wrong, they are dropped (every size from then on is a pruned copy's) and False is returned."""
        if self.analytic is None:
            return True
        size = self.size(keeps)
        if size is self.dense or self._pruned_size(keeps) == size:
            return True
        self._analytic = None
        self._cache.clear()
        return False

    def multiple(self, name: str, round_to: int | dict[str, int | None] | None) -> int | None:
        """The keep count multiple of group ``name`` that makes its layers' widths multiples of ``round_to`` (a
        dict: each group's own, see :meth:`auto_multiples`)."""
        if isinstance(round_to, dict):
            round_to = round_to.get(name)
        return round_to and round_to // math.gcd(round_to, self.widths.get(name, 1))

    def auto_multiples(self, round_to: int) -> dict[str, int | None]:
        """``round_to`` for the groups whose layers are at least :data:`AUTO_MIN_MULTIPLES` multiples of it wide,
        None (widths as they fall) for the narrower ones."""
        return {name: round_to if channels * self.widths.get(name, 1) >= AUTO_MIN_MULTIPLES * round_to else None
                for name, channels in self.groups.items()}

    def fraction(self, keeps: dict[str, int], metric: str) -> float:
        key = METRICS[metric]
        return self.size(keeps)[key] / max(self.dense[key], 1)


@dataclass(frozen=True)
class LayerSensitivity:
    """What PFP's allocation needs about one group (see the module docstring)."""

    name: str
    channels: int
    prob: Tensor  # p_j
    total: float  # S_ℓ
    span: float  # (P_ℓ + 1)·κ_ℓ, the argument of α_ℓ's logarithm (largest over the group's consumers)


@dataclass
class Allocation:
    """Keep counts per group, and how they were found; ``candidates``: for the error allocation, the allocations
    the pipeline prunes with and checks end to end (name → keep counts, ``keeps`` first)."""

    keeps: dict[str, int]
    info: dict
    candidates: dict[str, dict[str, int]] | None = None
    curves: dict[str, dict[int, float]] | None = None  # the error allocation's, for the predictions of a candidate


def plan(budget: Budget, sizer: Sizer, round_to: int | str | None = None,
         sensitivities: Callable[[], list[LayerSensitivity]] | None = None, device="cpu",
         curves: Callable[[dict[str, list[int]]], dict[str, dict[int, float]]] | None = None) -> Allocation:
    """Per-group keep counts for ``budget``.

    ``sensitivities`` computes PFP's per-group statistics on demand (only for ``Target(allocation="pfp")``);
    ``curves`` each group's error (the network's output error with it alone pruned) at the candidate widths it is
    given (only for ``Target(allocation="error")``: :func:`error_widths`, :func:`_search_error`).
    ``round_to="auto"`` with a MACs or params target: the multiple of ``device`` (:func:`resolve_round_to`)
    for the groups at least :data:`AUTO_MIN_MULTIPLES` multiples wide (the report's ``unrounded_groups`` lists
    the narrower ones, whose widths fall as they may), where it can meet the target; else the widths as they
    fall everywhere (a model too narrow for it; the report's ``round_to_auto`` says which multiple was given up).
    """
    auto = round_to == "auto"
    round_to = resolve_round_to(round_to, device, budget)
    groups = sizer.groups
    if isinstance(budget, Uniform):
        keeps = {name: keep_count(c, budget.ratio, sizer.multiple(name, round_to)) for name, c in groups.items()}
        return Allocation(keeps, {"budget": "uniform", "ratio": budget.ratio, "round_to": round_to})
    if isinstance(budget, PerLayer):
        return Allocation(_per_layer(budget, sizer, round_to), {"budget": "per-layer", "ratios": budget.ratios,
                                                                "default": budget.default, "round_to": round_to})
    if budget.allocation in ("pfp", "error") and (sensitivities if budget.allocation == "pfp" else curves) is None:
        raise StructPruneError(f"{budget.allocation} allocation needs calibration data")
    layers = sensitivities() if budget.allocation == "pfp" else None
    measured: dict = {}

    def search(multiple: int | dict[str, int | None] | None) -> tuple[dict[str, int], float]:
        def once() -> dict[str, int]:
            if budget.allocation == "error":
                widths = error_widths(sizer, multiple)
                if widths != measured.get("widths"):
                    measured.update(widths=widths, curves=curves(widths))
                return _search_error(budget, sizer, measured["curves"])
            if layers is None:
                return _search_uniform(budget, sizer, multiple)
            return _search_pfp(budget, sizer, multiple, layers)

        keeps = once()
        if not sizer.confirm(keeps):  # sizes read off the dense model disagree with a pruned copy's: search again
            keeps = once()
        return keeps, sizer.fraction(keeps, budget.metric)

    multiples = sizer.auto_multiples(round_to) if auto and round_to else round_to
    gave_up = None
    if isinstance(multiples, dict) and not any(multiples.values()):  # every group too narrow for the multiple
        multiples, gave_up, round_to = None, round_to, None
    keeps, achieved = search(multiples)
    if isinstance(multiples, dict) and abs(achieved - budget.fraction) / budget.fraction > budget.tolerance:
        exact, exact_achieved = search(None)
        if abs(exact_achieved - budget.fraction) < abs(achieved - budget.fraction):
            keeps, achieved, gave_up, round_to = exact, exact_achieved, round_to, None
    info = {"budget": "target", "metric": budget.metric, "allocation": budget.allocation,
            "target": budget.fraction, "achieved": achieved,
            "relative_error": abs(achieved - budget.fraction) / budget.fraction,
            "size_evaluations": len(sizer._cache), "round_to": round_to}
    if gave_up is not None:
        info["round_to_auto"] = gave_up
    elif isinstance(multiples, dict) and None in multiples.values():
        info["unrounded_groups"] = [name for name, m in multiples.items() if m is None]
    if budget.allocation == "pfp":
        info["delta"] = budget.delta
    if budget.allocation == "error":
        info.update(predicted(measured["curves"], keeps))
        # what one ratio for every group would have kept at the same target and multiples: the report's comparison,
        # and with a blend of the two, the candidates the pipeline checks end to end (the errors of groups pruned
        # alone need not add up)
        final = None if round_to is None else multiples
        uniform = _search_uniform(budget, sizer, final)
        info["uniform_keeps"] = uniform
        blend = {name: (keeps[name] + uniform[name]) / 2 for name in keeps}
        blend = _refine(*_scaled(blend, budget, sizer, final), budget, sizer, final)  # the target, as near as it gets
        candidates = {"error": keeps, "uniform": uniform, "blend": blend}
        return Allocation(keeps, info, candidates, measured["curves"])
    return Allocation(keeps, info)


def _per_layer(budget: PerLayer, sizer: Sizer, round_to: int | None) -> dict[str, int]:
    names = sizer.layer_names
    used = set()
    keeps = {}
    for group, channels in sizer.groups.items():
        ratio = budget.default
        for pattern, value in budget.ratios.items():
            if any(fnmatch.fnmatchcase(n, pattern) for n in names[group]):
                ratio = value
                used.add(pattern)
                break
        keeps[group] = keep_count(channels, ratio, sizer.multiple(group, round_to))
    unused = [p for p in budget.ratios if p not in used]
    if unused:
        raise StructPruneError(f"per-layer budget: {', '.join(map(repr, unused))} matches no prunable group; "
                               f"the groups are: {', '.join(sizer.groups)}")
    return keeps


def _closest(candidates: list[dict[str, int]], budget: Target, sizer: Sizer) -> dict[str, int]:
    return min(candidates, key=lambda k: abs(sizer.fraction(k, budget.metric) - budget.fraction))


def _within(keeps: dict[str, int], budget: Target, sizer: Sizer) -> bool:
    return abs(sizer.fraction(keeps, budget.metric) - budget.fraction) <= budget.tolerance * budget.fraction


def _search_uniform(budget: Target, sizer: Sizer, round_to: int | dict[str, int | None] | None) -> dict[str, int]:
    """The keep ratio shared by all groups whose real size is closest to the target.

    Keep counts only change at ratios k/C, so the search bisects over those breakpoints; if the two
    neighbouring breakpoints straddle the target by more than the tolerance, the groups that differ
    between them are grown one at a time from the smaller one.
    """
    groups = sizer.groups
    ratios = sorted({k / c for c in groups.values() for k in range(1, c + 1)})

    def keeps_at(ratio: float) -> dict[str, int]:
        return {name: keep_count(c, ratio, sizer.multiple(name, round_to)) for name, c in groups.items()}

    low, high = 0, len(ratios) - 1  # invariant: fraction(ratios[low]) <= target or low == 0
    if sizer.fraction(keeps_at(ratios[high]), budget.metric) <= budget.fraction:
        return keeps_at(ratios[high])
    while high - low > 1:
        mid = (low + high) // 2
        if sizer.fraction(keeps_at(ratios[mid]), budget.metric) <= budget.fraction:
            low = mid
        else:
            high = mid
    return _refine(keeps_at(ratios[low]), keeps_at(ratios[high]), budget, sizer, round_to)


def _refine(below: dict[str, int], above: dict[str, int], budget: Target, sizer: Sizer,
            round_to: int | dict[str, int | None] | None = None) -> dict[str, int]:
    """The closest to the target of ``below``, ``above`` and, if neither is within the tolerance, the
    allocations met on the way from ``below`` to ``above``: each group in turn (shallow to deep) grows by its
    multiple of ``round_to`` (:meth:`Sizer.multiple`; one channel without) while that stays under the target."""
    candidates = [below, above]
    current = dict(below)
    for name in sizer.groups:
        step = sizer.multiple(name, round_to) or 1
        while current[name] < above[name] and not _within(_closest(candidates, budget, sizer), budget, sizer):
            grown = {**current, name: min(above[name], current[name] + step)}
            candidates.append(grown)
            if sizer.fraction(grown, budget.metric) > budget.fraction:
                break  # overshoots: leave this group, try growing the next one
            current = grown
    return _closest(candidates, budget, sizer)


def pfp_keep(layer: LayerSensitivity, epsilon: float, delta: float) -> int:
    """keep_ℓ(ε) of PFP's allocation (module docstring)."""
    if layer.total <= 0:
        return 1
    alpha = 6 * math.log(8 * layer.span / delta)
    draws = max(1.0, math.ceil(3 * (6 + 2 * epsilon) * alpha * layer.total / epsilon**2))
    expected = float((1 - (1 - layer.prob.double()).pow(draws)).sum())
    return min(layer.channels, max(1, math.ceil(expected - 1e-9)))


def _search_pfp(budget: Target, sizer: Sizer, round_to: int | dict[str, int | None] | None,
                layers: list[LayerSensitivity]) -> dict[str, int]:
    """One ε for all groups, by bisection in log ε, so that the pruned size meets the target."""
    def keeps_at(log_eps: float) -> dict[str, int]:
        eps = math.exp(log_eps)
        return {layer.name: min(layer.channels, _round_up(pfp_keep(layer, eps, budget.delta),
                                                          sizer.multiple(layer.name, round_to)))
                for layer in layers}

    low, high = math.log(1e-4), math.log(1e8)  # small ε keeps everything, large ε keeps one per group
    if sizer.fraction(keeps_at(low), budget.metric) <= budget.fraction:
        return keeps_at(low)
    if sizer.fraction(keeps_at(high), budget.metric) > budget.fraction:
        return keeps_at(high)  # the target is below the smallest model PFP allocates: the closest one
    for _ in range(60):
        mid = (low + high) / 2
        if sizer.fraction(keeps_at(mid), budget.metric) > budget.fraction:
            low = mid
        else:
            high = mid
        if high - low < 1e-6:
            break
    return _refine(keeps_at(high), keeps_at(low), budget, sizer, round_to)


def missed_target(metric: str, target: float, achieved: float, tolerance: float) -> str:
    """The warning for a size target that whole channels cannot meet."""
    why = "with whole channels and this machine's timing noise" if metric == "latency" else "with whole channels"
    return (f"structprune: the {metric} target {target:.4g} could not be met within {tolerance:.0%} {why}; the "
            f"closest allocation keeps {achieved:.4f}")
