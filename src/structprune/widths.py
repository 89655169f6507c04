"""Keep counts, and the error allocation's search over candidate widths (:func:`structprune.allocate.plan` with
``Target(allocation="error")``): every group's curve of error at its candidate widths in, the allocation of least
summed error whose size meets the target out. Duck-typed over the budget (``fraction``, ``metric``, ``tolerance``)
and the sizer (``groups``, ``fraction``, ``multiple``) of :mod:`structprune.allocate`, which imports this module.
"""

from __future__ import annotations

import math


def keep_count(channels: int, ratio: float, round_to: int | None = None) -> int:
    """⌈ratio·channels⌉, rounded up to a multiple of ``round_to``, within [1, channels]."""
    keep = max(1, math.ceil(ratio * channels - 1e-9))
    return min(channels, _round_up(keep, round_to))


def _round_up(keep: int, round_to: int | None) -> int:
    return keep if not round_to else round_to * math.ceil(keep / round_to)


def predicted(curves: dict[str, dict[int, float]], keeps: dict[str, int]) -> dict:
    """The error curves' values at ``keeps`` (the groups whose width is on their curve) and their sum (None unless
    every group's is)."""
    errors = {name: curves[name][keep] for name, keep in keeps.items() if keep in curves.get(name, {})}
    return {"predicted_error": errors,
            "predicted_error_total": sum(errors.values()) if len(errors) == len(keeps) else None}


def _scaled(base: dict[str, float], budget, sizer,
            round_to: int | dict[str, int | None] | None) -> tuple[dict[str, int], dict[str, int]]:
    """``base`` (keep counts, not necessarily whole) times one factor, whole and in each group's multiple: the
    allocations at the largest factor whose size is at or below the target and at the next one above it."""
    groups = sizer.groups

    def keeps_at(factor: float) -> dict[str, int]:
        return {name: keep_count(c, min(1.0, factor * base[name] / c), sizer.multiple(name, round_to))
                for name, c in groups.items()}

    low, high = 0.0, max(c / max(base[name], 1e-9) for name, c in groups.items())
    for _ in range(40):  # the size grows with the factor: bisect for the largest factor at or below the target
        mid = (low + high) / 2
        if sizer.fraction(keeps_at(mid), budget.metric) <= budget.fraction:
            low = mid
        else:
            high = mid
    return keeps_at(low), keeps_at(high)


#: candidate widths per group for the error allocation: about this many steps from one channel to all
ERROR_STEPS = 16


def error_widths(sizer, round_to: int | dict[str, int | None] | None) -> dict[str, list[int]]:
    """The candidate keep counts of every group: about :data:`ERROR_STEPS` of them, multiples of a step of about
    1/16 of its channels (itself a multiple of the group's ``round_to`` multiple), and all of its channels."""
    widths = {}
    for name, channels in sizer.groups.items():
        multiple = sizer.multiple(name, round_to) or 1
        step = multiple * max(1, round(channels / ERROR_STEPS / multiple))
        widths[name] = sorted({*range(step, channels, step), channels})
    return widths


def _search_error(budget, sizer, curves: dict[str, dict[int, float]]) -> dict[str, int]:
    """The allocation of least summed error (errors of the same network output: comparable across groups) whose size
    meets the target: :func:`_narrow` to it, then :func:`_grow_back` within the tolerance."""
    return _grow_back(_narrow(budget, sizer, curves), budget, sizer, curves)


def _narrow(budget, sizer, curves: dict[str, dict[int, float]]) -> dict[str, int]:
    """From every group whole, narrow one group a step at a time, always the one whose next candidate width adds
    the least error per unit of the target's metric it removes, until the size is at or below the target (with
    costs that add up and convex curves, each allocation on the way is the least error at its size)."""
    keeps = {name: channels for name, channels in sizer.groups.items()}
    current = sizer.fraction(keeps, budget.metric)
    while current > budget.fraction:
        best = None
        for name, curve in curves.items():
            narrower = [w for w in curve if w < keeps[name]]
            if not narrower:
                continue
            width = max(narrower)
            trial = {**keeps, name: width}
            fraction = sizer.fraction(trial, budget.metric)
            saved = current - fraction
            if saved <= 0:
                continue
            cost = (curve[width] - curve[keeps[name]]) / saved
            if best is None or cost < best[0]:
                best = (cost, trial, fraction)
        if best is None:
            break
        _, keeps, current = best
    return keeps


def _grow_back(keeps: dict[str, int], budget, sizer, curves: dict[str, dict[int, float]]):
    """The last step of the search may land below the target by more than one group's step: widen, one step at a
    time, the group whose next width removes the most error while the size stays within the tolerance."""
    ceiling = budget.fraction * (1 + budget.tolerance)
    while True:
        best = None
        for name, curve in curves.items():
            wider = [w for w in curve if w > keeps[name]]
            if not wider:
                continue
            trial = {**keeps, name: min(wider)}
            gain = curve[keeps[name]] - curve[min(wider)]
            if sizer.fraction(trial, budget.metric) <= ceiling and (best is None or gain > best[0]):
                best = (gain, trial)
        if best is None:
            return keeps
        keeps = best[1]
