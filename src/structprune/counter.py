"""Torch-Pruning's MACs counter as hooks on a model: its per-layer-type rules (``op_counter``), which layers it
counts (the outermost of a type it knows), and the object its hooks add to. :mod:`structprune.measure` counts a
model with these; :mod:`structprune.sizing` reads each layer call's count off the dense model with the same rules,
so that both agree with ``tp.utils.count_ops_and_params`` by construction.
"""

from __future__ import annotations

from torch import nn
from torch_pruning.utils import op_counter


class Tally:
    """A layer as Torch-Pruning's counter hooks see it: its attributes, and a ``__flops__`` they add to."""

    def __init__(self, module: nn.Module):
        object.__setattr__(self, "_module", module)
        self.__flops__ = 0

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    @property
    def __class__(self):  # isinstance() inside the hooks (RNN kinds) sees the layer's class
        return type(self._module)


def outermost_counted(model: nn.Module, rules: dict) -> list[nn.Module]:
    """The layers Torch-Pruning's counter counts: those of a type in ``rules`` inside no other such layer (a
    layer kept in two containers is listed, and counted, twice, as the counter does)."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if type(module) in rules:
            found.append(module)
        else:
            for child in module.children():
                visit(child)

    visit(model)
    return found


def counter_rules() -> dict:
    """Torch-Pruning's counter hook per layer type (its own and the ones registered with it)."""
    return {**op_counter.MODULES_MAPPING, **op_counter.CUSTOM_MODULES_MAPPING}
