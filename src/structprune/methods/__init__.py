"""Pruning methods: one file each, one registry line each.

>>> from structprune import methods
>>> methods.get("ispasp", iterations=20).name
'ispasp'
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ..errors import StructPruneError
from .base import ConsumerView, GroupView, Method, ProducerView, Selection

_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str):
    def decorate(factory):
        _REGISTRY[name] = factory
        return factory

    return decorate


def available() -> list[str]:
    return sorted(_REGISTRY)


def options(name: str) -> dict[str, object]:
    """The keyword options of a method and their defaults."""
    factory = _factory(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()}


def get(name: str, **kwargs) -> Method:
    """Build a method by name with its options, e.g. ``get("pfp-rand", delta=1e-6, seed=0)``."""
    factory = _factory(name)
    allowed = options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise StructPruneError(f"method {name!r} has no option {', '.join(unknown)}; "
                               f"its options are: {', '.join(allowed) or 'none'}")
    return factory(**kwargs)


def _factory(name: str):
    if name not in _REGISTRY:
        raise StructPruneError(f"method must be one of {', '.join(available())}; got {name!r}")
    return _REGISTRY[name]


from . import bn_scale, fpgm, gfs, ispasp, magnitude, pfp, random, taylor, thinet  # noqa: E402, F401

__all__ = ["ConsumerView", "GroupView", "Method", "ProducerView", "Selection", "available", "get", "options",
           "register"]
