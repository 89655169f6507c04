"""Model zoo: one file per family, a registry decorator and a single factory.

>>> from structprune import models
>>> net = models.create("lenet5", num_classes=10, in_channels=1)
>>> sorted(models.available())[:3]
['lenet300', 'lenet5', 'mobilenetv2']
"""

from __future__ import annotations

import inspect
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


def create(name: str, num_classes: int = 10, in_channels: int = 1, **kwargs) -> nn.Module:
    """Build a zoo model by name.

    The returned module remembers how it was built (``model.structprune_arch``), which is what
    lets :func:`structprune.load` rebuild a pruned copy in a fresh process.

    Parameters
    ----------
    name: one of :func:`available`.
    num_classes: outputs of the classifier.
    in_channels: channels of the input images (1 for Fashion-MNIST, 3 for CIFAR).
    kwargs: family-specific options (``width_mult``, ``input_size``, ...).
    """
    factory = _factory(name)
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


# Importing the family files fills the registry.
from . import lenet, mobilenetv2, resnet_cifar, vgg  # noqa: E402, F401
