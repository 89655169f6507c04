"""MACs and parameters of a pruned model from its keep counts alone, without pruning a copy.

A size target is met by search: the allocation's size is asked for at many candidate keep counts. Pruning a
copy of the model for each and counting it (:class:`structprune.allocate.Sizer`'s exact path) costs a deep copy,
a dependency graph and a forward pass per candidate. This module reads the dense model once instead.

Torch-Pruning's counter (:func:`structprune.measure.count`) adds, per layer call, a product of the call's sizes.
Removing channels changes no size but channel counts, so each call's count is its dense count times the kept
fraction of the channels it reads and writes:

* a Conv/Linear layer of the graph: weight part × f_in × f_out, bias part × f_out, where f_in is the kept
  fraction of its input features (a consumer: each group channel stands for ``channel_index.shape[1]`` of them)
  and f_out of its outputs (a producer); a depthwise conv (groups = channels, pruned together): × f_out;
* any other layer the counter knows (BatchNorm, LayerNorm, activations, pooling, upsampling): × f of the tensor
  it reads, its elements being the channels times sizes that do not change;
* a Conv/Linear in no group: its count (a layer that reads or writes a group's channels is in the group: a
  consumer, a producer, or a depthwise conv carried through, which is a producer).

The fraction of each tensor of the traced pass is a layer's f_out where a layer made it, a layer's f_in where a
layer reads it, and passes unchanged through a per-channel layer and through any module whose input and output
hold as many elements (a Flatten, a Dropout); it is propagated both ways until nothing changes. Parameters follow
the same fractions. Whatever this does not cover (a layer call whose fraction stays unknown, a grouped conv that
is not depthwise, recurrent and attention layers, attention products, a parameter of an unknown layer) makes
:func:`analytic_sizes` return None, and the Sizer prunes copies as before; the Sizer also checks the chosen
allocation on a pruned copy (:meth:`structprune.allocate.Sizer.confirm`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .attention import find_blocks
from .batches import run_forward
from .counter import Tally, counter_rules, outermost_counted
from .layers import is_linear, is_transposed_linear

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: layers Torch-Pruning's counter counts whose count is their tensor's elements times a constant
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
                nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.Upsample,
                nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)

#: a kept fraction: (dense channels, {group: channels of the tensor per group channel})
Fraction = tuple[int, dict[str, int]]


@dataclass
class _Layer:
    """What a Conv/Linear of the graph reads and writes: dense sizes and the groups that shrink them."""

    inputs: int
    outputs: int
    depthwise: bool = False  # its inputs are its outputs' channels (pruned with them)
    reads: dict[str, int] = field(default_factory=dict)  # group -> input features per group channel
    writes: dict[str, int] = field(default_factory=dict)  # group -> output channels per group channel

    def f_in(self) -> Fraction:
        return self.f_out() if self.depthwise else (self.inputs, self.reads)

    def f_out(self) -> Fraction:
        return self.outputs, self.writes


@dataclass
class _Call:
    module: nn.Module
    input: Tensor | None
    output: Tensor | None
    macs: float
    counted: bool  # the outermost layer of a type Torch-Pruning's counter knows (its count is the call's)


class AnalyticSizes:
    """``size(keeps)`` → {"params", "macs"} of the model pruned to ``keeps`` (group name → channels kept)."""

    def __init__(self, groups: dict[str, int], macs: list[tuple[float, Fraction, Fraction | None]],
                 params: list[tuple[float, Fraction, Fraction | None]], batch: int):
        self.groups = groups
        self.macs, self.params = macs, params  # (dense amount, fraction, second fraction or None)
        self.batch = batch

    def size(self, keeps: dict[str, int]) -> dict[str, int]:
        removed = {g: c - keeps.get(g, c) for g, c in self.groups.items()}

        def kept(fraction: Fraction | None) -> float:
            if fraction is None:
                return 1.0
            dense, per_group = fraction
            return (dense - sum(w * removed.get(g, 0) for g, w in per_group.items())) / dense

        def total(terms) -> float:
            return sum(amount * kept(first) * kept(second) for amount, first, second in terms)

        # the counts are whole numbers (summed in floats: rounded), the MACs per sample as Torch-Pruning divides
        return {"params": round(total(self.params)), "macs": int(round(total(self.macs)) / self.batch)}


def analytic_sizes(model: nn.Module, example_inputs, groups: list) -> AnalyticSizes | None:
    """:class:`AnalyticSizes` of ``model`` (dense) for the graph's ``groups`` (resolved on a model with the same
    module names), or None where the module docstring's rules do not cover the model."""
    names = {module: name for name, module in model.named_modules()}
    if any(is_transposed_linear(m) for m in names) or find_blocks(model)[0]:
        return None  # their counts have parts Torch-Pruning's counter does not make (measure.count)
    by_name = dict(model.named_modules())
    layers: dict[str, _Layer] = {}
    for group in groups:
        for members, side in ((group.producers, "writes"), (group.consumers, "reads")):
            for member in members:
                layer = _layer(layers, by_name.get(member.name), member.name)
                if layer is None:
                    return None
                per_group = getattr(layer, side)
                per_group[group.name] = per_group.get(group.name, 0) + int(member.channel_index.shape[1])
    calls, batch = _trace(model, example_inputs)
    if calls is None:
        return None
    fractions = _fractions(calls, layers, names)
    macs: list[tuple[float, Fraction, Fraction | None]] = []
    per_channel: dict[nn.Module, Fraction] = {}  # a per-channel layer's fraction (its parameters')
    for call in calls:
        if not call.counted:
            continue
        name = names[call.module]
        if name in layers:
            macs += _layer_terms(call, layers[name])
        elif isinstance(call.module, _PER_CHANNEL):
            fraction = fractions.get(id(call.input)) if call.input is not None else None
            if fraction is None:
                return None  # its tensor's size is not known
            if per_channel.setdefault(call.module, fraction) != fraction and any(call.module.parameters(False)):
                return None  # a layer with parameters run on tensors of two sizes
            macs.append((call.macs, fraction, None))
        elif isinstance(call.module, _LAYERS):
            macs.append((call.macs, None, None))  # in no group: its channels stay
        elif call.macs:
            return None  # recurrent, attention, …: no rule here
    params: list[tuple[float, Fraction, Fraction | None]] = []
    for module, name in names.items():
        own = list(module.named_parameters(recurse=False))
        if name in layers:
            params += [(float(p.numel()), layers[name].f_in(), layers[name].f_out())
                       if n == "weight" and not _depthwise(module) else (float(p.numel()), layers[name].f_out(), None)
                       for n, p in own]
        elif module in per_channel:
            params += [(float(p.numel()), per_channel[module], None) for _, p in own]
        elif isinstance(module, _LAYERS) or not own:
            params += [(float(p.numel()), None, None) for _, p in own]
        else:
            return None  # a parameter whose size no rule here follows
    return AnalyticSizes({g.name: g.channels for g in groups}, macs, params, batch)


def _fractions(calls: list[_Call], layers: dict[str, _Layer], names: dict[nn.Module, str]) -> dict[int, Fraction]:
    """id(tensor) → its kept fraction, for the tensors of the traced pass the rules reach (module docstring)."""
    fractions: dict[int, Fraction] = {}

    def settle(tensor: Tensor | None, fraction: Fraction) -> bool:
        if tensor is None or id(tensor) in fractions:
            return False
        fractions[id(tensor)] = fraction
        return True

    for call in calls:  # what the layers fix
        layer = layers.get(names[call.module])
        if layer is not None:
            settle(call.output, layer.f_out())
            settle(call.input, layer.f_in())
        elif isinstance(call.module, _LAYERS):  # in no group: every layer reading or writing one is in ``layers``
            settle(call.output, (1, {}))
            settle(call.input, (1, {}))
    changed = True
    while changed:  # what passes through unchanged, both ways
        changed = False
        for call in calls:
            if names[call.module] in layers or call.input is None or call.output is None:
                continue
            if not isinstance(call.module, _PER_CHANNEL) and call.input.numel() != call.output.numel():
                continue
            for a, b in ((call.input, call.output), (call.output, call.input)):
                if id(a) in fractions:
                    changed |= settle(b, fractions[id(a)])
    return fractions


def _layer(layers: dict[str, _Layer], module: nn.Module | None, name: str) -> _Layer | None:
    """The record of a graph layer (None for a layer no rule here covers: a grouped conv that is not depthwise)."""
    if not isinstance(module, _LAYERS) or (_depthwise(module)
                                           and not module.groups == module.in_channels == module.out_channels):
        return None
    if name not in layers:
        inputs = module.in_features if is_linear(module) else module.in_channels
        outputs = module.out_features if is_linear(module) else module.out_channels
        layers[name] = _Layer(inputs, outputs, _depthwise(module))
    return layers[name]


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1


def _layer_terms(call: _Call, layer: _Layer) -> list:
    """A layer call's MACs: weight part × f_in × f_out, bias part × f_out (Torch-Pruning's formulas: a conv's bias
    is one per output element, a Linear's one per output feature); a depthwise conv's all × f_out."""
    module, output = call.module, call.output
    if _depthwise(module):
        return [(call.macs, layer.f_out(), None)]
    bias = 0.0 if module.bias is None else float(output.shape[-1] if isinstance(module, nn.Linear) else output.numel())
    return [(call.macs - bias, layer.f_in(), layer.f_out()), (bias, layer.f_out(), None)]


def _trace(model: nn.Module, example_inputs) -> tuple[list[_Call] | None, int]:
    """Every module call of one forward pass: its first input and output tensors (kept alive, so that their ids
    stay theirs) and Torch-Pruning's count for it (:func:`structprune.measure.count`'s rule)."""
    rules = counter_rules()
    counted = Counter(outermost_counted(model, rules))  # a layer kept in two containers counts twice
    calls: list[_Call] = []
    batch: list[int] = []

    def hook(module, args, output):
        tensor = args[0] if args and isinstance(args[0], Tensor) else None
        macs = 0.0
        if module in counted:
            tally = Tally(module)
            rules[type(module)](tally, args, output)
            macs = float(tally.__flops__) * counted[module]
        calls.append(_Call(module, tensor, output if isinstance(output, Tensor) else None, macs, module in counted))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    handles.append(model.register_forward_hook(lambda _m, args, _o: batch.append(len(args[0]) if args else 1)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_forward(model, example_inputs)
    except Exception:
        return None, 1
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls, max(sum(batch), 1)
