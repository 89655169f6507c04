"""Prunable groups of coupled channels, and the surgery that removes them.

This is the only module that knows about Torch-Pruning. It turns Torch-Pruning's
DependencyGraph into plain data that the rest of structprune can read:

* a :class:`Group` is a set of channels that must be removed together (for a residual stream,
  every conv that writes into it and every layer that reads it);
* its *producers* are the Conv/Linear layers whose outputs are those channels;
* its *consumers* are the Conv/Linear layers that read them, each with the index map from a
  group channel to the consumer's input features (one feature for a conv, ``H*W`` features for a
  Linear after a Flatten), and the eval-mode scale of a BatchNorm directly after it.

:meth:`PruningGraph.apply` writes optional replacement consumer weights for the kept channels and
then removes the others for real (Torch-Pruning rewrites every coupled layer), so the pruned model
is smaller and faster, not masked.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch
import torch_pruning as tp
from torch import Tensor, nn

from . import attention
from .batches import output_tensors, run_forward
from .errors import StructPruneError, first_line
from .groups import Consumer, Group, Producer, write_consumer_weights
from .layers import (
    CONVS,
    LINEAR_LAYERS,
    TRANSPOSED_CONVS,
    WEIGHT_LAYERS,
    batchnorm_affine,
    in_features,
    is_attention,
    out_features,
)

#: what a graph offers: every group, or only the groups no residual stream shares
SCOPES = ("all", "inner")


class PruningGraph:
    """Groups of a model, shallow to deep, and physical removal of channels.

    Parameters
    ----------
    model: the model to prune; it is modified in place by :meth:`apply`.
    example_inputs: a batch the model accepts (a tensor, a tuple of tensors or a dict of kwargs).
    ignored_layers: layers whose outputs must never lose channels, in addition to the output layers,
        which are found automatically (no group containing them is offered).
    scope: "all" offers every group; "inner" only groups whose channels no residual stream shares
        (no addition of several layers' outputs: block-internal channels, as the i-SpaSP paper prunes).
        The groups left out are listed in ``out_of_scope``.
    observe: a context manager entered around the one forward pass of the model on ``example_inputs`` (eval mode,
        gradients on: the pass Torch-Pruning traces; :func:`structprune.measure.counting` counts the model on
        it); what it yields is :attr:`observed`.
    """

    def __init__(self, model: nn.Module, example_inputs, ignored_layers: Sequence[nn.Module] = (),
                 scope: str = "all", observe: contextlib.AbstractContextManager | None = None):
        if scope not in SCOPES:
            raise StructPruneError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.model = model
        self.example_inputs = example_inputs
        self._names = {module: name for name, module in model.named_modules()}
        self._attention = _attention_scopes(model)
        self._param_names = {param: name for name, param in model.named_parameters()}
        was_training = model.training
        model.eval()  # tracing must not update BatchNorm statistics (nor fail on a batch of one)
        # one forward pass serves all three: Torch-Pruning traces its outputs, the hooks of _ordered_forward
        # order the layers, and ``observe`` watches it
        ran: dict = {}
        try:  # padding couples no channels, and Torch-Pruning loops forever on the slices of circular padding
            with _zero_padding(model), _hooks_removed_on_error(model), torch.enable_grad():
                try:
                    self.dg = tp.DependencyGraph().build_dependency(
                        model, example_inputs, forward_fn=lambda m, x: self._ordered_forward(x, observe, ran),
                        verbose=False)
                except Exception as exc:
                    if "outputs" not in ran:  # the user's forward, not ours: report it as bad input
                        raise StructPruneError(f"example_inputs: the model's forward pass failed on them "
                                               f"({first_line(exc)})") from exc
                    # the forward ran: it is the tracing of its outputs that failed
                    raise StructPruneError(
                        f"Torch-Pruning could not trace the model's outputs ({first_line(exc)}); a model whose "
                        f"output holds more than tensors (a Hugging Face cache: pass use_cache=False with the "
                        f"inputs) or returns no tensor computed from them cannot be traced") from exc
            order = ran["order"]
            #: what ``observe`` yielded around the pass that orders the layers (eval mode, the example inputs):
            #: a pass another part can watch instead of running its own
            self.observed = ran["observed"]
        finally:
            model.train(was_training)
        self.output_layers = self._find_output_layers()
        ignored = list(ignored_layers) + self.output_layers
        roots = []
        #: root -> its Torch-Pruning group as get_all_groups found it, which _resolve takes (instead of searching
        #: it again) until the model changes
        self._found: dict[nn.Module, list] = {}
        self.out_of_scope: list[str] = []
        # every group, the ignored ones too: Torch-Pruning's get_all_groups(ignored_layers=...) yields the same
        # groups (same roots) less those with an ignored layer among their outputs, without a second search
        tp_groups = list(self.dg.get_all_groups(root_module_types=WEIGHT_LAYERS))
        #: names of the Conv/Linear layers whose outputs are added into a residual stream
        self.residual_layers = {self.name_of(item.dep.target.module) for tp_group in tp_groups
                                if _is_residual(tp_group) for item in tp_group
                                if self._is_out(item) and isinstance(item.dep.target.module, WEIGHT_LAYERS)}
        ignored_ids = {id(m) for m in ignored + list(self.dg.IGNORED_LAYERS_IN_TRACING)}
        for tp_group in tp_groups:
            if any(id(item.dep.target.module) in ignored_ids for item in tp_group if self._is_out(item)):
                continue
            if scope == "inner" and _is_residual(tp_group):
                self.out_of_scope.append(self.name_of(tp_group[0].dep.target.module))
                continue
            producers = [item.dep.target.module for item in tp_group if self._is_out(item)]
            position = min(order.get(m, len(order)) for m in producers)
            roots.append((position, tp_group[0].dep.target.module, tp_group[0].dep.handler))
            self._found[tp_group[0].dep.target.module] = tp_group
        roots.sort(key=lambda r: r[0])
        self._roots = [(module, fn) for _, module, fn in roots]
        self.skipped: list[tuple[str, str]] = []  # (group, reason)
        self._resolved: dict[nn.Module, tuple[tuple, Group]] = {}  # root -> (the sizes it was read from, group)

    # -- discovery -----------------------------------------------------------------------------

    def groups(self) -> Iterator[Group]:
        """Yield each prunable group, shallow to deep, resolved at the moment it is reached.

        Resolving lazily matters: pruning one group shifts indices that later groups see (for
        instance behind a concatenation), so a group is read off the model as it is when its turn comes.
        Groups that cannot be pruned are skipped with a warning that names the layer.

        A group resolved before is reused while the sizes it was read from stay: its producers' outputs, its
        consumers' inputs and outputs, its BatchNorms' channels (what another group's removal changes: the
        offsets behind a concatenation or a split, a BatchNorm after a consumer). Pruning a network in order
        changes other groups' layers only on their other side (a producer's inputs), so most are reused.
        """
        for root, root_fn in self._roots:
            kept = self._resolved.get(root)
            if kept is not None:
                sizes = _sizes(kept[1])
                if kept[0] == sizes:
                    yield kept[1]
                    continue
                if kept[0][0] == sizes[0] and [c[0] for c in kept[0][1]] == [c[0] for c in sizes[1]]:
                    # only consumers' outputs changed (a residual stream's removal behind a block): the channel
                    # tables hold, the BatchNorms after those consumers are read again
                    group = self._with_output_affines(kept[1], [old[1] != new[1] for old, new in
                                                                zip(kept[0][1], sizes[1], strict=True)])
                    self._resolved[root] = (sizes, group)
                    yield group
                    continue
            group = self._resolve(root, root_fn)
            if group is not None:
                self._resolved[root] = (_sizes(group), group)
                yield group

    def forget(self) -> None:
        """Resolve every group afresh from now on (the model may have changed in ways sizes do not show)."""
        self._resolved.clear()
        self._found.clear()

    def all_groups(self) -> list[Group]:
        """All prunable groups of the model as it is now (no pruning in between)."""
        return list(self.groups())

    def __len__(self) -> int:
        return len(self._roots)

    def name_of(self, module: nn.Module) -> str:
        return self._names.get(module, type(module).__name__)

    def _resolve(self, root: nn.Module, root_fn) -> Group | None:
        pruner = self.dg.get_pruner_of_module(root)
        channels = pruner.get_out_channels(root)
        name = self.name_of(root)
        tp_group = self._found.pop(root, None) or self.dg.get_pruning_group(root, root_fn, list(range(channels)))
        members = self._super_channels(tp_group, channels)
        if isinstance(members, str):
            return self._skip(name, members)
        producers, consumers, batchnorms = [], [], []
        for item in tp_group:
            module = item.dep.target.module
            if isinstance(module, nn.Parameter) and module.dim() > 1:
                # a custom layer's own weight matrix: Torch-Pruning has to guess which dimension to cut
                return self._skip(name, f"custom layer parameter {self._param_names.get(module, '?')} "
                                        f"{tuple(module.shape)} is not a Conv/Linear/norm weight")
            if not isinstance(module, nn.Module):
                continue
            index = _channel_index(item.idxs, item.root_idxs, channels)
            if index is None:
                return self._skip(name, f"layer {self.name_of(module)} maps channels unevenly")
            index = index[members].reshape(len(members), -1)
            if self._is_out(item):
                if isinstance(module, WEIGHT_LAYERS):
                    producers.append(Producer(self.name_of(module), module, index))
                elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                    batchnorms.append(Producer(self.name_of(module), module, index))
            elif self.dg.is_in_channel_pruning_fn(item.dep.handler):
                if _is_pass_through(module):
                    continue
                if not isinstance(module, LINEAR_LAYERS):  # a transposed conv, among others: its rows are not patches
                    return self._skip(name, f"consumer {self.name_of(module)} ({type(module).__name__}) is not a "
                                            f"Linear, Conv1d or Conv2d")
                if isinstance(module, CONVS) and module.padding_mode != "zeros":
                    # its input rows would be padded with other values than the ones the layer reads
                    return self._skip(name, f"consumer {self.name_of(module)} pads with "
                                            f"padding_mode={module.padding_mode!r}; only zero padding is supported")
                consumers.append(Consumer(self.name_of(module), module, index, *self._consumer_affine(module)))
        if not consumers:
            return self._skip(name, "no Linear/Conv1d/Conv2d reads these channels")
        attention = self._inside_attention(tp_group, producers, consumers)
        if attention is not None:
            return self._skip(name, attention)
        return Group(name, len(members), producers, consumers, root, root_fn, batchnorms, _is_residual(tp_group),
                     members)

    def _super_channels(self, tp_group, channels: int) -> Tensor | str:
        """The group's channels as :attr:`Group.members` (a reason, as a string, when grouped convolutions couple
        them unevenly or all into one): every grouped conv ties together the channels it reads (or writes) at the
        same position of each of its conv groups, which must be removed together to keep its groups equal."""
        parent = list(range(channels))

        def find(c: int) -> int:
            while parent[c] != c:
                parent[c] = parent[parent[c]]
                c = parent[c]
            return c

        grouped = []
        for item in tp_group:
            module = item.dep.target.module
            if isinstance(module, TRANSPOSED_CONVS) and module.groups > 1:
                return f"{self.name_of(module)} is a grouped {type(module).__name__}"
            if not (isinstance(module, CONVS) and module.groups > 1) or _is_pass_through(module):
                continue
            if self._is_out(item):
                block = module.out_channels // module.groups
            elif self.dg.is_in_channel_pruning_fn(item.dep.handler):
                block = module.in_channels // module.groups
            else:
                continue
            grouped.append(self.name_of(module))
            first: dict[int, int] = {}
            for idx, root in zip(item.idxs, item.root_idxs, strict=False):
                if root is None or root >= channels:
                    continue
                position = first.setdefault(idx % block, root)
                parent[find(root)] = find(position)
        if not grouped:
            return torch.arange(channels)[:, None]
        classes: dict[int, list[int]] = {}
        for c in range(channels):
            classes.setdefault(find(c), []).append(c)
        if len({len(m) for m in classes.values()}) != 1 or len(classes) < 2:
            return (f"the grouped convolutions {', '.join(dict.fromkeys(grouped))} couple its channels "
                    f"{'unevenly' if len(classes) > 1 else 'all together'}")
        return torch.tensor(sorted(classes.values()))

    def _inside_attention(self, tp_group, producers: list[Producer], consumers: list[Consumer]) -> str | None:
        """Why a group must stay whole when its channels are an attention's head dimensions, else None.

        Channels that an attention module produces and reads itself (its q/k/v rows and the output projection's
        columns) come in heads; removing some of them unevenly would mix heads, and shrinking an
        ``nn.MultiheadAttention``'s embed_dim changes its head size and its attention scaling. Neither is what
        the dense model computes on the kept channels, so such groups are refused by name (structprune prunes
        whole heads of the attention layouts :mod:`structprune.attention` describes)."""
        for item in tp_group:
            if isinstance(item.dep.target.module, nn.MultiheadAttention):
                mha = item.dep.target.module
                return (f"nn.MultiheadAttention {self.name_of(mha)} would lose embed_dim channels, which changes its "
                        f"head size and attention scaling (PyTorch's module needs its heads to span the model "
                        f"width); to prune its heads, use an attention module with Linear q/k/v/o layers and "
                        f"describe it with structprune.attention.register")
        inside = {self._attention.get(p.module) for p in producers} & {self._attention.get(c.module) for c in consumers}
        inside.discard(None)
        if inside:
            scope = sorted(inside)[0]
            return (f"its channels are the heads of attention {scope}, which structprune prunes only in whole heads "
                    f"of a layout structprune.attention knows (structprune.attention.register); pruning them here "
                    f"would mix heads")
        return None

    def _skip(self, name: str, reason: str) -> None:
        if (name, reason) not in self.skipped:
            self.skipped.append((name, reason))
            warnings.warn(f"structprune: group {name} is not pruned: {reason}", stacklevel=3)
        return None

    def _is_out(self, item) -> bool:
        return self.dg.is_out_channel_pruning_fn(item.dep.handler)

    def _with_output_affines(self, group: Group, changed: list[bool]) -> Group:
        """``group`` with the BatchNorm scale and shift after each consumer flagged in ``changed`` read again."""
        consumers = []
        for consumer, again in zip(group.consumers, changed, strict=True):
            if again:
                scale, shift, normalized, batchnorm = self._consumer_affine(consumer.module)
                consumer = replace(consumer, output_scale=scale, output_shift=shift, normalized=normalized,
                                   batchnorm=batchnorm)
            consumers.append(consumer)
        return replace(group, consumers=consumers)

    def _consumer_affine(self, module: nn.Module) -> tuple[Tensor, Tensor, bool, nn.Module | None]:
        """A consumer's (output_scale, output_shift, normalized, batchnorm) as :class:`Consumer` holds them."""
        scale, shift, batchnorm = self._output_affine(module)
        if scale is None:
            scale = torch.ones(module.weight.shape[0], device=module.weight.device)
            return scale, torch.zeros_like(scale), False, batchnorm
        return scale, shift, True, batchnorm

    def _output_affine(self, consumer: nn.Module) -> tuple[Tensor | None, Tensor | None, nn.Module | None]:
        """(γ/σ, β − γμ/σ) of a BatchNorm that reads the consumer's output directly, else (None, None); and that
        BatchNorm when it is the output's only reader."""
        node = self.dg.module2node.get(consumer)
        for nxt in node.outputs if node is not None else []:
            bn = nxt.module
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                return (*batchnorm_affine(bn), bn if len(node.outputs) == 1 else None)
        return None, None, None

    def _find_output_layers(self) -> list[nn.Module]:
        """Conv/Linear layers whose outputs reach the model's output without passing another Conv/Linear,
        also when other layers read them too (a last hidden state that a pooler also reads)."""
        def is_output(node) -> bool:
            return (not node.outputs or node.module in self._output_modules
                    or isinstance(node.module, tp.ops._OutputOp))

        found = []
        for module, node in self.dg.module2node.items():
            if not isinstance(module, WEIGHT_LAYERS):
                continue
            if is_output(node):
                found.append(module)
                continue
            stack, seen = list(node.outputs), set()
            while stack:
                nxt = stack.pop()
                if id(nxt) in seen:
                    continue
                seen.add(id(nxt))
                if isinstance(nxt.module, WEIGHT_LAYERS):
                    continue
                if is_output(nxt):
                    found.append(module)
                    break
                stack.extend(nxt.outputs)
        return list(dict.fromkeys(found))

    def _ordered_forward(self, example_inputs, observe: contextlib.AbstractContextManager | None, ran: dict):
        """The model's forward pass on ``example_inputs``, inside ``observe``, recording into ``ran``: "order",
        the order in which the Conv/Linear layers first run, "observed", what ``observe`` yielded, and
        "outputs" once the pass returned. It also finds the modules whose own output tensors are (part of) the
        model's output (``_output_modules``)."""
        order: dict[nn.Module, int] = {}
        produced: dict[int, nn.Module] = {}  # id of an output tensor -> the module that returned it

        def record(module: nn.Module, _inputs) -> None:
            order.setdefault(module, len(order))

        def remember(module: nn.Module, _inputs, output) -> None:
            for tensor in output_tensors(output):
                produced[id(tensor)] = module

        hooks = [m.register_forward_pre_hook(record) for m in self.model.modules() if isinstance(m, WEIGHT_LAYERS)]
        hooks += [m.register_forward_hook(remember) for m in self.model.modules() if m is not self.model]
        try:
            with observe if observe is not None else contextlib.nullcontext() as observed:
                outputs = run_forward(self.model, example_inputs)
        finally:
            for hook in hooks:
                hook.remove()
        self._output_modules = {produced[id(t)] for t in output_tensors(outputs) if id(t) in produced}
        ran.update(order=order, observed=observed, outputs=True)
        return outputs

    # -- surgery -------------------------------------------------------------------------------

    def apply(self, group: Group, keep_idx: Tensor, consumer_weights: dict[str, Tensor] | None = None,
              consumer_biases: dict[str, Tensor] | None = None) -> None:
        """Keep ``keep_idx`` of ``group`` and physically remove every other channel.

        ``consumer_weights`` maps a consumer name to its new canonical weight (out, len(keep_idx),
        taps) for the kept channels (PFP's reweighting, least-squares refits); ``consumer_biases`` to its
        new bias.
        """
        keep_idx = write_consumer_weights(group, keep_idx, consumer_weights, consumer_biases)
        mask = torch.ones(group.channels, dtype=torch.bool)
        mask[keep_idx] = False
        members = group.members if group.members is not None else torch.arange(group.channels)[:, None]
        prune_idx = members[mask].reshape(-1).sort().values.tolist()
        if not prune_idx:
            return
        self._found.clear()  # every group is searched again on the changed model
        tp_group = self.dg.get_pruning_group(group.root, group.root_fn, prune_idx)
        tp_group.prune()

    def history(self) -> list:
        """Torch-Pruning's record of every removal, enough to replay the surgery on a fresh model."""
        return [list(entry) for entry in self.dg.pruning_history()]

    def replay(self, history: list) -> None:
        """Redo recorded removals (see :meth:`history`) on this graph's model."""
        self._found.clear()
        self.dg.load_pruning_history([list(entry) for entry in history])


def _sizes(group: Group) -> tuple:
    """What a resolution of ``group`` depends on that pruning other groups may change (see
    :meth:`PruningGraph.groups`): output sizes of its producers and BatchNorms, input and output sizes of its
    consumers."""
    return (tuple(out_features(p.module) for p in (*group.producers, *group.batchnorms)),
            tuple((in_features(c.module), out_features(c.module)) for c in group.consumers))


@contextlib.contextmanager
def _zero_padding(model: nn.Module) -> Iterator[None]:
    """Convolutions pad with zeros while this is open (same shapes, same channel coupling), then as before."""
    changed = [(m, m.padding_mode) for m in model.modules() if isinstance(m, CONVS) and m.padding_mode != "zeros"]
    for module, _ in changed:
        module.padding_mode = "zeros"
    try:
        yield
    finally:
        for module, mode in changed:
            module.padding_mode = mode


@contextlib.contextmanager
def _hooks_removed_on_error(model: nn.Module) -> Iterator[None]:
    """On an error inside, the forward hooks added to ``model``'s modules meanwhile are removed: Torch-Pruning's
    trace removes its own only after a forward pass that returned."""
    before = {module: set(module._forward_hooks) for module in model.modules()}
    try:
        yield
    except BaseException:
        for module, hooks in before.items():
            for key in [k for k in module._forward_hooks if k not in hooks]:
                del module._forward_hooks[key]
        raise


def _attention_scopes(model: nn.Module) -> dict[nn.Module, str]:
    """Each layer inside an attention module (:func:`is_attention`) -> that module's name (the innermost one)."""
    scopes: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        if is_attention(module):
            for child in module.modules():
                scopes[child] = name
    return scopes


def _is_residual(tp_group) -> bool:
    """Whether a Torch-Pruning group's channels pass an addition (or subtraction) of several tensors."""
    return any(isinstance(item.dep.target.module, tp.ops._ElementWiseOp)
               and re.fullmatch(r"(Add|Sub)Backward\d*", str(item.dep.target.module._grad_fn)) for item in tp_group)


#: model families whose prunable groups are not Torch-Pruning's channel groups: (matches, graph class), added by
#: the family's own module (e.g. :mod:`structprune.models.hf`: transformers get attention heads and FFN neurons,
#: :mod:`structprune.attention`), so that this module knows no model family
_FAMILIES: list[tuple[Callable[[nn.Module], bool], Callable]] = []


def register_family(matches: Callable[[nn.Module], bool], graph_class: Callable) -> None:
    """Route models for which ``matches(model)`` is true to ``graph_class(model, example_inputs,
    ignored_layers)`` instead of :class:`PruningGraph` (the graph class offers the same interface, and prunes
    only inner groups: the residual stream stays whole)."""
    _FAMILIES.append((matches, graph_class))


def build_graph(model: nn.Module, example_inputs, ignored_layers: Sequence[nn.Module] = (), scope: str = "all",
                observe: contextlib.AbstractContextManager | None = None):
    """The graph for ``model``: a registered family's own (:func:`register_family`; BERT-family encoders get
    heads and FFN groups), everything else a :class:`PruningGraph`. ``observe``: see :class:`PruningGraph`; a
    family's graph runs no pass, and its ``observed`` is None."""
    families = [*_FAMILIES, (attention.is_supported, attention.TransformerGraph)]
    for matches, graph_class in families:
        if matches(model):
            if scope not in SCOPES:
                raise StructPruneError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
            graph = graph_class(model, example_inputs, ignored_layers)
            graph.observed = None
            return graph
    return PruningGraph(model, example_inputs, ignored_layers, scope, observe)


def _is_pass_through(module: nn.Module) -> bool:
    """Layers that carry channels through one-to-one (their own parameters are pruned with the group)."""
    if isinstance(module, CONVS):
        return module.groups == module.in_channels == module.out_channels and module.groups > 1
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU,
                               nn.modules.instancenorm._InstanceNorm))


def _channel_index(idxs: Sequence[int], root_idxs: Sequence[int], channels: int) -> Tensor | None:
    """(channels, k) table of a layer's indices per group channel, each row ascending; None if channels map to
    unequal counts (or to none)."""
    n = min(len(idxs), len(root_idxs))
    if not n or None in root_idxs[:n]:
        return None
    if n == channels and list(root_idxs[:n]) == list(range(n)):  # most layers: group channel i is index idxs[i]
        return torch.tensor(list(idxs[:n]), dtype=torch.long).reshape(n, 1)
    roots = torch.tensor(list(root_idxs[:n]), dtype=torch.long)
    index = torch.tensor(list(idxs[:n]), dtype=torch.long)
    if int(roots.min()) < 0 or int(roots.max()) >= channels:
        return None
    counts = torch.bincount(roots, minlength=channels)
    width = int(counts[0])
    if width == 0 or bool((counts != width).any()):
        return None
    order = torch.argsort(roots * (int(index.max()) + 1) + index)  # by channel, then index
    return index[order].reshape(channels, width)
