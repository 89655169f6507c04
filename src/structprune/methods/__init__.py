"""Pruning methods: one file each, one line each in the table below.

>>> from structprune import methods
>>> methods.get("ispasp", iterations=20).name
'ispasp'

Your own method: a class with the :class:`Method` contract (subclass :class:`MethodBase`), passed to
:func:`structprune.prune` as an instance, or registered by name with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry
from . import bn_scale, fpgm, gfs, ispasp, magnitude, pfp, random, taylor, thinet
from .base import ConsumerView, GroupView, Method, MethodBase, Needs, ProducerView, Selection, options_of

METHODS: Registry[Method] = Registry("method")
for _name, _factory in {
    "bn-scale": bn_scale.bn_scale,
    "fpgm": fpgm.fpgm,
    "gfs": gfs.gfs,
    "ispasp": ispasp.ispasp,
    "magnitude": magnitude.magnitude,
    "pfp": pfp.pfp,
    "pfp-rand": pfp.pfp_rand,
    "pfp-top": pfp.pfp_top,
    "random": random.random,
    "taylor": taylor.taylor,
    "thinet": thinet.thinet,
}.items():
    METHODS.add(_name, _factory)


def register(name: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """``@register("mine")`` on a factory of your method makes it available by name (``prune(method="mine")``)."""
    return METHODS.register(name)


def available() -> list[str]:
    return METHODS.available()


def options(name: str) -> dict[str, object]:
    """The keyword options of a method and their defaults."""
    return METHODS.options(name)


def get(name: str, **kwargs) -> Method:
    """Build a method by name with its options, e.g. ``get("pfp-rand", delta=1e-6, seed=0)``."""
    return METHODS.create(name, **kwargs)


__all__ = ["METHODS", "ConsumerView", "GroupView", "Method", "MethodBase", "Needs", "ProducerView", "Selection",
           "available", "get", "options", "options_of", "register"]
