"""Transformer blocks, pruned in whole attention heads and whole feed-forward neurons.

Torch-Pruning's graph does not know that attention channels come in heads, nor which module attributes
must follow the weights. This module does, for any family that a few lines of data describe: an
:class:`AttentionLayout` says which attributes of an attention module hold the query, key, value and
output projections (or one fused q|k|v layer), the head size and the head counts to rewrite; a
:class:`FeedForwardLayout` which layers make and read the FFN neurons. Families register their layouts
(:func:`register`; :mod:`structprune.models.hf` has Hugging Face's BERT, RoBERTa, ALBERT, DistilBERT,
ViT, GPT-2 and Llama-style models), and this module imports no model family.

The groups offered (:class:`TransformerGraph`, the same interface as :class:`structprune.graph.PruningGraph`):

* ``<attention>``: one channel per **key/value group**, i.e. per head of ordinary multi-head attention and
  per key/value head of grouped-query attention (Llama, Mistral: the query heads that share it go with it).
  The hidden representation is the per-head context (the output projection's input), so the consumer is the
  output projection; the producers are the rows of the q, k and v projections that belong to those heads.
  After removal the head counts and widths named by the layout are rewritten.
* ``<ffn>``: one channel per **FFN neuron**: producers the up (and gate) projections, consumer the down one.

The residual stream (the model width) is never pruned, so the skip connections and the LayerNorms stay as they
are. A layer that runs several times per forward (ALBERT's shared layers) is one decision for all its uses.
Linear layers may be ``nn.Linear`` or Hugging Face's ``Conv1D`` (GPT-2: a transposed weight).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import StructPruneError
from .groups import Consumer, Group, Producer, write_consumer_weights
from .layers import is_attention, is_linear, keep_input_features, keep_output_features, out_features

HEADS, FFN = "heads", "ffn"
PARTS = (HEADS, FFN)


@dataclass(frozen=True)
class AttentionLayout:
    """Where one family's multi-head attention keeps its parts, as attribute paths of the attention module.

    ``query``/``key``/``value``: the projections (None with ``fused``: one layer whose rows are [q | k | v],
    GPT-2's ``c_attn``); ``output``: the output projection (may reach a sibling: ``"output.dense"`` of BERT's
    attention); ``head_dim``: the attribute holding the head size; ``heads``/``kv_heads``/``widths``: attributes
    holding the number of query heads, of key/value heads and the query width (heads × head size), rewritten
    after pruning when the module has them. ``config_heads``/``config_kv_heads``/``config_head_dim``: the
    config fields that express the head count and size, set when every layer keeps the same number (so that the
    family's own loader rebuilds the pruned shapes); empty where the config cannot express it (BERT derives the
    head size from the model width).
    """

    family: str
    output: str
    head_dim: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    fused: str | None = None
    heads: tuple[str, ...] = ()
    kv_heads: tuple[str, ...] = ()
    widths: tuple[str, ...] = ()
    config_heads: str = ""
    config_kv_heads: str = ""
    config_head_dim: str = ""

    def projections(self) -> tuple[str, ...]:
        return (self.fused,) if self.fused else (self.query, self.key, self.value)

    def paths(self) -> tuple[str, ...]:
        return (*self.projections(), self.output)


@dataclass(frozen=True)
class FeedForwardLayout:
    """Where one family's feed-forward block keeps its parts, as attribute paths of a module.

    ``up``: the layers whose outputs are the FFN neurons (two for a gated FFN: gate and up); ``down``: the layer
    that reads them; ``name``: the path that names the group (``"intermediate"``, ``"mlp"``); ``config_width``:
    the config field of the FFN width, set when every layer keeps the same width.
    """

    family: str
    up: tuple[str, ...]
    down: str
    name: str
    config_width: str = ""

    def paths(self) -> tuple[str, ...]:
        return (*self.up, self.down)


_ATTENTION: list[AttentionLayout] = []
_FEED_FORWARD: list[FeedForwardLayout] = []


def register(*layouts: AttentionLayout | FeedForwardLayout) -> None:
    """Make layouts known; the first that fits a module claims it (register specific layouts first)."""
    for layout in layouts:
        (_ATTENTION if isinstance(layout, AttentionLayout) else _FEED_FORWARD).append(layout)


@dataclass
class _Block:
    """A module matched by a layout (``module`` is the one the layout's paths start from); ``name`` names its
    group."""

    name: str
    module: nn.Module
    layout: AttentionLayout | FeedForwardLayout

    def layer(self, path: str) -> nn.Module:
        return attribute(self.module, path)

    def layers(self) -> list[nn.Module]:
        """The Linear layers the layout names: producers first, the consumer last."""
        return [self.layer(p) for p in self.layout.paths()]


class AttentionBlock(_Block):
    """An attention module matched by a layout, with its head geometry as it is now."""

    @property
    def head_dim(self) -> int:
        return int(attribute(self.module, self.layout.head_dim))

    @property
    def width(self) -> int:
        """Query rows: heads × head size."""
        return self.layer(self.layout.output).weight.numel() // out_features(self.layer(self.layout.output))

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def kv_heads(self) -> int:
        if self.layout.fused:
            return self.heads
        return out_features(self.layer(self.layout.key)) // self.head_dim

    def indices(self) -> dict[str, Tensor]:
        """Per projection (and the output projection), its rows (columns) of each key/value group."""
        d, groups = self.head_dim, self.kv_heads
        query = torch.arange(self.width).reshape(groups, -1)  # a group's query heads are contiguous
        out = {self.layout.output: query}
        if self.layout.fused:
            out[self.layout.fused] = torch.cat([query, query + self.width, query + 2 * self.width], dim=1)
        else:
            kv = torch.arange(groups * d).reshape(groups, d)
            out.update({self.layout.query: query, self.layout.key: kv, self.layout.value: kv})
        return out

    def sizes(self) -> dict[str, int]:
        return {"heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim}


class FeedForwardBlock(_Block):
    """A feed-forward block matched by a layout."""

    @property
    def neurons(self) -> int:
        return out_features(self.layer(self.layout.up[0]))

    def sizes(self) -> dict[str, int]:
        return {"neurons": self.neurons}


def attribute(module, path: str):
    """The attribute at a dotted ``path`` of ``module`` (``""``: the module itself), or None."""
    for attr in path.split(".") if path else ():
        module = getattr(module, attr, None)
    return module


def _attention_fits(module: nn.Module, layout: AttentionLayout) -> bool:
    head_dim = attribute(module, layout.head_dim)
    if not isinstance(head_dim, int) or head_dim < 1:  # most modules: no head size, nothing else to look up
        return False
    layers = [attribute(module, p) for p in layout.paths()]
    if not all(is_linear(m) for m in layers):
        return False
    *projections, output = layers
    width = output.weight.numel() // out_features(output)
    if width % head_dim:
        return False
    if layout.fused:
        return out_features(projections[0]) == 3 * width
    query, key, value = map(out_features, projections)
    return query == width and key == value and key % head_dim == 0 and width % key == 0


def _ffn_fits(module: nn.Module, layout: FeedForwardLayout) -> bool:
    ups = [attribute(module, p) for p in layout.up]
    down = attribute(module, layout.down)
    if not all(is_linear(m) for m in (*ups, down)):
        return False
    widths = {out_features(m) for m in ups}
    return len(widths) == 1 and down.weight.numel() // out_features(down) == widths.pop()


def find_blocks(model: nn.Module) -> tuple[list[AttentionBlock], list[FeedForwardBlock]]:
    """The attention and feed-forward blocks of ``model`` that a registered layout describes, in model order.

    A layer belongs to at most one block (the first layout that fits claims it)."""
    # a layout's paths name submodules: a module without any (most of a model) fits none
    modules = [(name, module) for name, module in model.named_modules() if module._modules]
    attention, claimed = [], set()
    for name, module in modules:
        layout = next((layout for layout in _ATTENTION if _attention_fits(module, layout)), None)
        if layout is not None:
            layers = {id(attribute(module, p)) for p in layout.paths()}
            if not claimed & layers:
                claimed |= layers
                attention.append(AttentionBlock(name, module, layout))
    # a feed-forward block is one beside an attention block (in the same transformer layer, or the layer
    # itself), so that attribute names alone (fc1, fc2) never take a classifier head for an FFN
    layer_names = {_parent(b.name) for b in attention}
    feed_forward = []
    names = {module: name for name, module in model.named_modules()} if layer_names else {}
    for name, module in modules:
        if name not in layer_names and _parent(name) not in layer_names:
            continue
        layout = next((layout for layout in _FEED_FORWARD if _ffn_fits(module, layout)), None)
        if layout is not None:
            layers = {id(attribute(module, p)) for p in layout.paths()}
            if not claimed & layers:
                claimed |= layers
                feed_forward.append(FeedForwardBlock(names[attribute(module, layout.name)], module, layout))
    return attention, feed_forward


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def is_supported(model: nn.Module) -> bool:
    """Whether ``model`` has attention blocks a registered layout describes."""
    return bool(find_blocks(model)[0])


def part_names(model: nn.Module, part: str) -> list[str]:
    """Names of the groups of ``part`` (``"heads"``: attention blocks, ``"ffn"``: feed-forward blocks); pass
    the other part's names as ``ignored_layers`` to prune only one kind."""
    if part not in PARTS:
        raise StructPruneError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    attention, feed_forward = find_blocks(model)
    return [b.name for b in (attention if part == HEADS else feed_forward)]


class TransformerGraph:
    """Head and FFN-neuron groups of a transformer, and their physical removal.

    Same interface as :class:`structprune.graph.PruningGraph` (groups, apply, skipped, history).

    Parameters
    ----------
    model: the model to prune; modified in place by :meth:`apply`.
    parts: which groups to offer: ``"heads"``, ``"ffn"`` or both.
    ignored_layers: modules whose groups are never pruned (a block, or any layer inside it).
    """

    def __init__(self, model: nn.Module, example_inputs=None, ignored_layers: Sequence[nn.Module] = (),
                 parts: Sequence[str] = PARTS):
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise StructPruneError(f"parts must be a non-empty subset of {', '.join(PARTS)}; got {list(parts)!r}")
        self.model = model
        self.example_inputs = example_inputs
        self.parts = tuple(parts)
        self.skipped: list[tuple[str, str]] = []
        self._names = {module: name for name, module in model.named_modules()}
        attention, feed_forward = find_blocks(model)
        ignored = set(map(id, ignored_layers))
        self._blocks: list[AttentionBlock | FeedForwardBlock] = []
        for part, blocks in ((HEADS, attention), (FFN, feed_forward)):
            for block in blocks if part in self.parts else ():
                if not any(id(m) in ignored for m in self._inside(block)):
                    self._blocks.append(block)
        self._blocks.sort(key=lambda b: list(self._names.values()).index(self.name_of(b.layers()[0])))
        #: the layers whose outputs are added into the residual stream
        self.residual_layers = {self.name_of(b.layers()[-1]) for b in attention + feed_forward}
        #: groups left out by scope="inner": none, heads and FFN neurons are all block-internal
        self.out_of_scope: list[str] = []
        self._warn_undescribed(attention)
        if not self._blocks:
            raise StructPruneError("the model has no attention or feed-forward block left to prune "
                                   "(every group is ignored, or no registered layout describes the model)")

    def _warn_undescribed(self, attention: list[AttentionBlock]) -> None:
        """Attention modules (with a head count) that no layout describes stay whole, and say so."""
        inside = {id(m) for b in attention for m in b.module.modules()}
        for name, module in self.model.named_modules():
            if id(module) in inside or not is_attention(module):
                continue
            inside |= {id(m) for m in module.modules()}
            self.skipped.append((name, f"attention {type(module).__name__} matches no registered layout "
                                       f"(structprune.attention.register); its heads are not pruned"))
            warnings.warn(f"structprune: group {name} is not pruned: {self.skipped[-1][1]}", stacklevel=3)

    def _inside(self, block) -> list[nn.Module]:
        named = self.model.get_submodule(block.name) if isinstance(block, FeedForwardBlock) else block.module
        return [block.module, named, *named.modules(), *block.layers()]

    def __len__(self) -> int:
        return len(self._blocks)

    def name_of(self, module: nn.Module) -> str:
        return self._names.get(module, type(module).__name__)

    def groups(self) -> Iterator[Group]:
        for block in self._blocks:
            yield self._heads(block) if isinstance(block, AttentionBlock) else self._ffn(block)

    def all_groups(self) -> list[Group]:
        return list(self.groups())

    def _heads(self, block: AttentionBlock) -> Group:
        index = block.indices()
        producers = [Producer(self.name_of(block.layer(p)), block.layer(p), index[p])
                     for p in block.layout.projections()]
        out = block.layer(block.layout.output)
        consumer = _consumer(self.name_of(out), out, index[block.layout.output])
        return Group(block.name, block.kv_heads, producers, [consumer], root=block, root_fn=HEADS)

    def _ffn(self, block: FeedForwardBlock) -> Group:
        index = torch.arange(block.neurons)[:, None]
        producers = [Producer(self.name_of(block.layer(p)), block.layer(p), index) for p in block.layout.up]
        down = block.layer(block.layout.down)
        return Group(block.name, block.neurons, producers, [_consumer(self.name_of(down), down, index)],
                     root=block, root_fn=FFN)

    def apply(self, group: Group, keep_idx: Tensor, consumer_weights: dict[str, Tensor] | None = None,
              consumer_biases: dict[str, Tensor] | None = None) -> None:
        """Keep ``keep_idx`` (key/value groups or neurons) of ``group``; write replacement consumer weights first."""
        keep_idx = write_consumer_weights(group, keep_idx, consumer_weights, consumer_biases)
        if len(keep_idx) == group.channels:
            return
        # rows in their original order: a fused q|k|v layer keeps its queries, then keys, then values
        for producer in group.producers:
            keep_output_features(producer.module, producer.channel_index[keep_idx].reshape(-1).sort().values)
        for consumer in group.consumers:
            keep_input_features(consumer.module, consumer.channel_index[keep_idx].reshape(-1).sort().values)
        if group.root_fn == HEADS:
            _rewrite_head_counts(group.root, len(keep_idx), group.channels)
        sync_config(self.model)  # a Hugging Face config follows its weights (saving and from_pretrained read it)

    def history(self) -> list:
        return []  # the pruned shapes live in the model's recorded sizes (layer_sizes), not in a replay log

    def forget(self) -> None:
        """After a callback that may have changed the model (``after_group``): groups are built from the blocks'
        layers at every :meth:`groups` call, so only the module names are read afresh."""
        self._names = {module: name for name, module in self.model.named_modules()}


def _consumer(name: str, layer: nn.Module, index: Tensor) -> Consumer:
    ones = torch.ones(out_features(layer), device=layer.weight.device)
    return Consumer(name, layer, index, ones, 0 * ones)


def _rewrite_head_counts(block: AttentionBlock, kept_groups: int, groups: int) -> None:
    layout, module = block.layout, block.module
    for attr in layout.heads:
        if isinstance(attribute(module, attr), int):
            _set(module, attr, kept_groups * (attribute(module, attr) // groups))
    for attr in layout.kv_heads:
        if isinstance(attribute(module, attr), int):
            _set(module, attr, kept_groups)
    for attr in layout.widths:
        if isinstance(attribute(module, attr), int):
            _set(module, attr, block.width)


def _set(module, path: str, value) -> None:
    *parents, attr = path.split(".")
    for parent in parents:
        module = getattr(module, parent)
    setattr(module, attr, value)


# -- sizes ----------------------------------------------------------------------------------------------------


def layer_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per block, as the modules are now: ``{"heads", "kv_heads", "head_dim"}`` of attention,
    ``{"neurons"}`` of a feed-forward block."""
    attention, feed_forward = find_blocks(model)
    return {b.name: b.sizes() for b in attention + feed_forward}


def resize(model: nn.Module, sizes: dict[str, dict[str, int]]) -> None:
    """Give the blocks of a freshly built model the sizes in ``sizes`` (:func:`layer_sizes`), by the same surgery
    as pruning, keeping the first heads and neurons (the weights are loaded afterwards)."""
    graph = TransformerGraph(model)
    groups = graph.all_groups()
    unknown = sorted(set(sizes) - {g.name for g in groups})
    if unknown:
        raise StructPruneError(f"recorded sizes name blocks the model does not have: {', '.join(unknown[:3])}")
    for group in groups:
        size = sizes.get(group.name)
        if size is None:
            continue
        keep = size["kv_heads"] if group.root_fn == HEADS else size["neurons"]
        if group.root_fn == HEADS and size.get("head_dim", group.root.head_dim) != group.root.head_dim:
            raise StructPruneError(f"recorded sizes: {group.name} has head size {size['head_dim']}, the model "
                                   f"{group.root.head_dim}")
        if not isinstance(keep, int) or not 1 <= keep <= group.channels:
            raise StructPruneError(f"recorded sizes: {group.name} keeps {keep!r} of {group.channels}")
        graph.apply(group, torch.arange(keep))


def uniform_config(model: nn.Module, config=None) -> dict[str, int]:
    """Config fields that describe the pruned model exactly, where every block of a kind has the same size and
    the family's config can say it (FFN width; head count and size where the config has a head size). With
    ``config``, only the width and head-count fields it has (a layout shared by families whose configs differ)."""
    attention, feed_forward = find_blocks(model)
    fields: dict[str, int] = {}
    widths = {(b.layout.config_width, b.neurons) for b in feed_forward}
    if len(widths) == 1 and next(iter(widths))[0]:
        key, width = widths.pop()
        if config is None or hasattr(config, key):
            fields[key] = width
    shapes = {(b.layout, b.heads, b.kv_heads, b.head_dim) for b in attention}
    if len(shapes) == 1:
        layout, heads, kv_heads, head_dim = shapes.pop()
        if layout.config_heads and layout.config_head_dim and (config is None or hasattr(config, layout.config_heads)):
            fields[layout.config_heads], fields[layout.config_head_dim] = heads, head_dim
            if layout.config_kv_heads:
                fields[layout.config_kv_heads] = kv_heads
    return fields


@contextlib.contextmanager
def attention_macs(model: nn.Module) -> Iterator[list[int]]:
    """While open, each forward pass of ``model`` appends to the yielded list the MACs of every attention block's
    products Q·Kᵀ and A·V, which no layer performs: 2·tokens²·(heads × head size) per sample, self-attention."""
    macs: list[int] = []
    hooks = []
    for block in find_blocks(model)[0]:
        def record(_m, _args, output, block=block) -> None:
            if isinstance(output, Tensor) and output.dim() == 3:
                samples, tokens = output.shape[:2]
                macs.append(2 * samples * tokens * tokens * block.width)

        hooks.append(block.layer(block.layout.projections()[0]).register_forward_hook(record))
    try:
        yield macs
    finally:
        for hook in hooks:
            hook.remove()


#: the config attribute where a pruned model's block sizes are recorded (a Hugging Face config's, for one)
CONFIG_KEY = "structprune_layers"


def sync_config(model: nn.Module) -> None:
    """Write the blocks' sizes into ``model.config`` (``structprune_layers``), and the config's own fields
    where they describe the pruned model exactly (:func:`uniform_config`); a model without a Hugging Face style
    config (an object with ``to_dict``) is left as it is."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    setattr(config, CONFIG_KEY, layer_sizes(model))
    for key, value in uniform_config(model, config).items():
        setattr(config, key, value)


# The built-in layouts: the transformers families (data: the attribute paths of their layers). One entry per layout;
# more specific layouts first (the first that fits a module claims it). A new family is one more entry and a test.
register(
    # BERT, RoBERTa, ELECTRA, MiniLM, ... (and ViT in transformers 4): attention.self.{query,key,value}, output.dense
    AttentionLayout("bert", query="self.query", key="self.key", value="self.value", output="output.dense",
                    head_dim="self.attention_head_size", heads=("self.num_attention_heads",),
                    widths=("self.all_head_size",)),
    AttentionLayout("vit-4", query="attention.query", key="attention.key", value="attention.value",
                    output="output.dense", head_dim="attention.attention_head_size",
                    heads=("attention.num_attention_heads",), widths=("attention.all_head_size",)),
    # ALBERT: query, key, value, dense on one module (its layers are shared: one decision for all their uses)
    AttentionLayout("albert", query="query", key="key", value="value", output="dense", head_dim="attention_head_size",
                    heads=("num_attention_heads",), widths=("all_head_size",)),
    # DistilBERT
    AttentionLayout("distilbert", query="q_lin", key="k_lin", value="v_lin", output="out_lin",
                    head_dim="attention_head_size", heads=("n_heads",)),
    # Llama, Mistral, Qwen2, ... (grouped-query attention: whole key/value groups) and ViT/DeiT in transformers 5
    AttentionLayout("llama", query="q_proj", key="k_proj", value="v_proj", output="o_proj", head_dim="head_dim",
                    heads=("num_heads", "num_attention_heads"), kv_heads=("num_key_value_heads",),
                    config_heads="num_attention_heads", config_kv_heads="num_key_value_heads",
                    config_head_dim="head_dim"),
    # BART, mBART, Marian, Pegasus, Whisper, ... (self- and cross-attention; their FFN is fc1/fc2, as ViT's)
    AttentionLayout("bart", query="q_proj", key="k_proj", value="v_proj", output="out_proj", head_dim="head_dim",
                    heads=("num_heads",)),
    # GPT-2: one fused Conv1D c_attn with rows [q | k | v], split at split_size
    AttentionLayout("gpt2", fused="c_attn", output="c_proj", head_dim="head_dim", heads=("num_heads",),
                    widths=("split_size",)),
    FeedForwardLayout("bert", up=("intermediate.dense",), down="output.dense", name="intermediate",
                      config_width="intermediate_size"),
    FeedForwardLayout("albert", up=("ffn",), down="ffn_output", name="ffn", config_width="intermediate_size"),
    FeedForwardLayout("distilbert", up=("lin1",), down="lin2", name="", config_width="hidden_dim"),
    FeedForwardLayout("llama", up=("gate_proj", "up_proj"), down="down_proj", name="",
                      config_width="intermediate_size"),
    FeedForwardLayout("vit", up=("fc1",), down="fc2", name="", config_width="intermediate_size"),
    FeedForwardLayout("gpt2", up=("c_fc",), down="c_proj", name="", config_width="n_inner"),
)
