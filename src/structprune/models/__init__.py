"""Model zoo: one file per family, a registry decorator and a single factory.

>>> from structprune import models
>>> net = models.create("lenet5", num_classes=10, in_channels=1)
>>> sorted(models.available())[:3]
['lenet300', 'lenet5', 'mobilenetv2']
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable

from torch import nn

from ..errors import StructPruneError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return decorate


def available() -> list[str]:
    return sorted(_REGISTRY)


def accepts(name: str, option: str) -> bool:
    """Whether zoo model ``name`` takes the keyword ``option`` (e.g. "width_mult", "input_size")."""
    return option in inspect.signature(_factory(name)).parameters


def _factory(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise StructPruneError(f"model must be one of {', '.join(available())}; got {name!r}")
    return _REGISTRY[name]


def create(name: str, num_classes: int | None = None, in_channels: int | None = None, *, trusted: bool = True,
           **kwargs) -> nn.Module:
    """Build a zoo model by name, or any ``nn.Module`` by its import path.

    The returned module remembers how it was built (``model.structprune_arch``), which is what
    lets :func:`structprune.load` rebuild a pruned copy in a fresh process.

    Parameters
    ----------
    name: one of :func:`available`, or ``"package.module:qualname"`` of an ``nn.Module`` class or of a
        function returning one (called with the given keyword options, which must be JSON data).
    num_classes: outputs of the classifier (zoo default 10).
    in_channels: channels of the input images (zoo default 1: Fashion-MNIST; 3 for CIFAR).
    trusted: whether ``name`` comes from the caller (True) or from a file (see :mod:`structprune.checkpoint`).
    kwargs: family-specific options (``width_mult``, ``input_size``, ...).
    """
    if ":" in name:
        return _from_import(name, trusted, num_classes=num_classes, in_channels=in_channels, **kwargs)
    factory = _factory(name)
    num_classes = 10 if num_classes is None else num_classes
    in_channels = 1 if in_channels is None else in_channels
    if num_classes < 1:
        raise StructPruneError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise StructPruneError(f"in_channels must be >= 1, got {in_channels}")
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise StructPruneError(f"model {name!r} does not accept these options: {exc}") from None
    model.structprune_arch = {
        "name": name,
        "kwargs": {"num_classes": num_classes, "in_channels": in_channels, **kwargs},
    }
    return model


def _from_import(spec: str, trusted: bool, **kwargs) -> nn.Module:
    from ..checkpoint import resolve_constructor

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError):
        raise StructPruneError(f"the options of {spec} must be JSON data (numbers, strings, lists, dicts), "
                               f"so that a checkpoint can record them; got {kwargs!r}") from None
    constructor = resolve_constructor(spec, trusted)
    try:
        model = constructor(**kwargs)
    except TypeError as exc:
        raise StructPruneError(f"{spec} does not accept these options: {exc}") from None
    if not isinstance(model, nn.Module):
        raise StructPruneError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    model.structprune_arch = {"import": spec, "kwargs": kwargs}
    return model


# Importing the family files fills the registry (and hf registers the transformers' layouts and graph).
from . import hf, lenet, mobilenetv2, resnet_cifar, vgg  # noqa: E402, F401
