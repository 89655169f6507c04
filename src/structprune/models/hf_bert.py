"""Hugging Face BERT-family models: attention heads and FFN neurons as prunable groups.

Torch-Pruning's graph does not know that a BERT layer's attention channels come in heads of
``attention_head_size``, nor that the config must follow the modules. This adapter reads the
structure off the modules instead (duck-typed, so BERT, RoBERTa, ELECTRA, MiniLM ... that share
BERT's layer layout all work) and offers two kinds of groups per encoder layer:

* ``<layer>.attention`` — one channel per **head**. The hidden representation is the per-head
  context (the input of the attention output projection), so the consumer is
  ``attention.output.dense`` with ``attention_head_size`` taps per channel; the producers are
  ``query``, ``key`` and ``value`` (a head's rows of each).
* ``<layer>.intermediate`` — one channel per **FFN neuron**: producer ``intermediate.dense``,
  consumer ``output.dense`` (its input is the post-activation FFN representation).

The skip connection and the LayerNorm after each consumer are not part of f (as for residual CNNs).
After removal each layer's ``num_attention_heads``/``all_head_size`` and the FFN Linear shapes are
consistent, and the per-layer sizes are written to the config (``structprune_layers``) so that
:func:`load_pretrained` rebuilds the pruned model in a fresh process. transformers 5 dropped
``pruned_heads``, so its own ``from_pretrained`` cannot load models whose layers differ in size.

transformers is an optional dependency (``pip install 'structprune[transformers]'``); it is only
imported to save and load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import StructPruneError, first_line
from ..graph import Consumer, Group, Producer, register_family, write_consumer_weights

HEADS, FFN = "heads", "ffn"
PARTS = (HEADS, FFN)
CONFIG_KEY = "structprune_layers"


def encoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every module laid out like a BERT encoder layer, in model order."""
    return [(name, module) for name, module in model.named_modules() if _is_bert_layer(module)]


def is_supported(model: nn.Module) -> bool:
    """Whether ``model`` has BERT-family encoder layers this adapter can prune."""
    return bool(encoder_layers(model))


def part_names(model: nn.Module, part: str) -> list[str]:
    """Names of the modules that hold ``part`` ("heads": each layer's ``attention``, "ffn": its
    ``intermediate``); pass the other part's names as ``ignored_layers`` to prune only one kind."""
    if part not in PARTS:
        raise StructPruneError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    suffix = "attention" if part == HEADS else "intermediate"
    return [_group_name(name, suffix) for name, _ in encoder_layers(model)]


def _group_name(layer_name: str, suffix: str) -> str:
    return f"{layer_name}.{suffix}" if layer_name else suffix


def _is_bert_layer(module: nn.Module) -> bool:
    self_attn = _get(module, "attention", "self")
    return (all(_is_linear(module, "attention", "self", p) for p in ("query", "key", "value"))
            and hasattr(self_attn, "attention_head_size") and hasattr(self_attn, "num_attention_heads")
            and _is_linear(module, "attention", "output", "dense") and _is_linear(module, "intermediate", "dense")
            and _is_linear(module, "output", "dense"))


def _get(module, *path):
    for attr in path:
        module = getattr(module, attr, None)
    return module


def _is_linear(module, *path) -> bool:
    return isinstance(_get(module, *path), nn.Linear)


class TransformerGraph:
    """Head and FFN groups of a BERT-family model, and their physical removal.

    Same interface as :class:`structprune.graph.PruningGraph` (groups, apply, skipped, history).

    Parameters
    ----------
    model: the model to prune; modified in place by :meth:`apply`.
    parts: which groups to offer: ``"heads"``, ``"ffn"`` or both.
    ignored_layers: modules whose groups are never pruned (an encoder layer, its attention, its
        intermediate, or any Linear inside them).
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
        ignored = set(map(id, ignored_layers))
        self._roots: list[tuple[str, str, nn.Module]] = []  # (group name, part, encoder layer)
        for name, layer in encoder_layers(model):
            for part, suffix, scope in ((HEADS, "attention", layer.attention), (FFN, "intermediate", layer)):
                inside = [layer, scope, *scope.modules()] if part == HEADS else [
                    layer, layer.intermediate, layer.intermediate.dense, layer.output.dense]
                if part in self.parts and not any(id(m) in ignored for m in inside):
                    self._roots.append((_group_name(name, suffix), part, layer))
        #: the layers whose outputs are added into the residual stream (hidden states)
        self.residual_layers = {self.name_of(m) for _, layer in encoder_layers(model)
                                for m in (layer.attention.output.dense, layer.output.dense)}
        #: groups left out by scope="inner": none, heads and FFN neurons are all block-internal
        self.out_of_scope: list[str] = []
        if not self._roots:
            raise StructPruneError("the model has no BERT-style encoder layer left to prune "
                                   "(every group is ignored, or the model is not BERT-family)")

    def __len__(self) -> int:
        return len(self._roots)

    def name_of(self, module: nn.Module) -> str:
        return self._names.get(module, type(module).__name__)

    def groups(self) -> Iterator[Group]:
        for name, part, layer in self._roots:
            yield self._heads(name, layer) if part == HEADS else self._ffn(name, layer)

    def all_groups(self) -> list[Group]:
        return list(self.groups())

    def _heads(self, name: str, layer: nn.Module) -> Group:
        attn = layer.attention.self
        heads, size = attn.num_attention_heads, attn.attention_head_size
        index = torch.arange(heads * size).reshape(heads, size)
        producers = [Producer(self.name_of(getattr(attn, p)), getattr(attn, p), index)
                     for p in ("query", "key", "value")]
        dense = layer.attention.output.dense
        consumer = Consumer(self.name_of(dense), dense, index, _ones(dense), 0 * _ones(dense))
        return Group(name, heads, producers, [consumer], root=layer, root_fn=HEADS)

    def _ffn(self, name: str, layer: nn.Module) -> Group:
        up, down = layer.intermediate.dense, layer.output.dense
        index = torch.arange(up.out_features)[:, None]
        return Group(name, up.out_features, [Producer(self.name_of(up), up, index)],
                     [Consumer(self.name_of(down), down, index, _ones(down), 0 * _ones(down))], root=layer, root_fn=FFN)

    def apply(self, group: Group, keep_idx: Tensor, consumer_weights: dict[str, Tensor] | None = None,
              consumer_biases: dict[str, Tensor] | None = None) -> None:
        """Keep ``keep_idx`` (heads or neurons) of ``group``; write replacement consumer weights first."""
        keep_idx = write_consumer_weights(group, keep_idx, consumer_weights, consumer_biases)
        if len(keep_idx) == group.channels:
            return
        rows = group.producers[0].channel_index[keep_idx].reshape(-1)
        for producer in group.producers:
            _keep_rows(producer.module, rows)
        for consumer in group.consumers:
            _keep_columns(consumer.module, rows)
        if group.root_fn == HEADS:
            attn = group.root.attention.self
            attn.num_attention_heads = len(keep_idx)
            attn.all_head_size = len(keep_idx) * attn.attention_head_size
        sync_config(self.model)

    def history(self) -> list:
        return []  # the pruned shapes live in the config (layer_sizes), not in a replay log


register_family(is_supported, TransformerGraph)  # build_graph gives BERT-family encoders this graph


def _ones(linear: nn.Linear) -> Tensor:
    return torch.ones(linear.out_features, device=linear.weight.device)


def _keep_rows(linear: nn.Linear, rows: Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), linear.bias.requires_grad)
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: Tensor) -> None:
    columns = columns.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone(), linear.weight.requires_grad)
    linear.in_features = len(columns)


# -- sizes, save and load ------------------------------------------------------------------------


def layer_sizes(model: nn.Module) -> list[dict[str, int]]:
    """Per encoder layer: ``num_attention_heads`` and ``intermediate_size`` as the modules are now."""
    return [{"num_attention_heads": layer.attention.self.num_attention_heads,
             "intermediate_size": layer.intermediate.dense.out_features} for _, layer in encoder_layers(model)]


def sync_config(model: nn.Module) -> None:
    """Write the modules' per-layer sizes into ``model.config`` (``structprune_layers``); when every layer
    has the same FFN width, ``intermediate_size`` too, so that such a model also loads with transformers'
    own ``from_pretrained`` as long as no head was removed."""
    config = getattr(model, "config", None)
    if config is None:
        return
    sizes = layer_sizes(model)
    setattr(config, CONFIG_KEY, sizes)
    widths = {s["intermediate_size"] for s in sizes}
    if len(widths) == 1 and hasattr(config, "intermediate_size"):
        config.intermediate_size = widths.pop()


def resize(model: nn.Module, sizes: list[dict[str, int]]) -> None:
    """Give each encoder layer of a freshly built model the sizes in ``sizes`` (weights are then loaded)."""
    layers = encoder_layers(model)
    if len(layers) != len(sizes):
        raise StructPruneError(f"{CONFIG_KEY} lists {len(sizes)} layers but the model has {len(layers)}")
    wanted = {}
    for (name, layer), size in zip(layers, sizes, strict=True):
        attn = layer.attention.self
        heads, inter = int(size["num_attention_heads"]), int(size["intermediate_size"])
        if not 1 <= heads <= attn.num_attention_heads or not 1 <= inter <= layer.intermediate.dense.out_features:
            raise StructPruneError(f"{CONFIG_KEY}: sizes {size} do not fit a layer with "
                                   f"{attn.num_attention_heads} heads and {layer.intermediate.dense.out_features} "
                                   f"FFN neurons")
        wanted[_group_name(name, "attention")], wanted[_group_name(name, "intermediate")] = heads, inter
    graph = TransformerGraph(model)
    for group in graph.groups():  # the same surgery as pruning, keeping the first channels
        graph.apply(group, torch.arange(wanted[group.name]))


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise StructPruneError("Hugging Face models need transformers: "
                               "pip install 'structprune[transformers]'") from None
    return transformers


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, force: bool = False, tokenizer=None,
                    extra: dict | None = None) -> Path:
    """``model.save_pretrained`` into a new directory ``path``, with the per-layer sizes in its config.

    The directory is written next to ``path`` and renamed into place, so an interrupted save leaves
    nothing half-written; an existing ``path`` is an error unless ``force``. ``extra`` (the pruning
    report) goes to ``structprune.json`` in the directory; a tokenizer, if given, is saved too.
    """
    if not hasattr(model, "save_pretrained"):
        raise StructPruneError(f"{type(model).__name__} is not a Hugging Face model (no save_pretrained)")
    path = Path(path)
    if path.exists() and not force:
        raise StructPruneError(f"output {path} already exists; pass --force (force=True) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        sync_config(model)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "structprune.json").write_text(json.dumps(extra, indent=2, default=str))
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_pretrained(path: str | os.PathLike, model_class=None, *, trust_checkpoint: bool = False) -> nn.Module:
    """Load a Hugging Face model directory, pruned by structprune or not, in eval mode.

    The architecture comes from the config (``architectures``; or pass ``model_class``), the
    per-layer sizes from ``structprune_layers``, the weights from the safetensors files. A directory
    with only pickled weights (``pytorch_model.bin``) is read tensors-only; one whose pickle holds
    anything else is refused unless ``trust_checkpoint`` (it could run code).
    """
    transformers = transformers_module()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise StructPruneError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise StructPruneError(f"{path}/config.json is not a usable config ({first_line(exc)})") from None
    sizes = getattr(config, CONFIG_KEY, None)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else transformers.AutoModel
        if model_class is None:
            raise StructPruneError(f"{path}: transformers has no class {names[0]!r}; pass model_class")
    state = _read_weights(path, trust_checkpoint)  # read here, never by transformers' own (pickle) loader
    model = model_class._from_config(config) if hasattr(model_class, "_from_config") else model_class(config)
    if sizes:
        resize(model, sizes)
    _load_weights(model, state, path)
    return model.eval()


def _load_weights(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise StructPruneError(f"{path}: weights do not fit the model: {first_line(exc)}") from None
    buffers = {name for name, _ in model.named_buffers()}  # e.g. position_ids: persistent in older checkpoints
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = [k for k in unexpected if k not in buffers and not any(p.search(k) for p in ignored)]
    if unexpected:
        raise StructPruneError(f"{path}: weights not in the model: {', '.join(unexpected[:5])}")
    if missing:  # save_pretrained leaves out tied weights (e.g. an MLM decoder); tying restores them
        model.tie_weights()
        loaded = {p.data_ptr() for name, p in model.named_parameters() if name not in missing}
        untied = [k for k in missing if k not in dict(model.named_parameters())
                  or model.get_parameter(k).data_ptr() not in loaded]
        if untied:
            raise StructPruneError(f"{path}: weights missing from the checkpoint: {', '.join(untied[:5])}")


def _read_weights(path: Path, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        return _read_pickled_weights(path / "pytorch_model.bin", trust_checkpoint)
    else:
        raise StructPruneError(f"{path}: no model.safetensors (save with save_pretrained's safetensors format)")
    from safetensors.torch import load_file

    state = {}
    for name in files:
        try:
            state.update(load_file(path / name))
        except Exception as exc:
            raise StructPruneError(f"{path / name} is not readable (truncated or corrupted?): {exc}") from None
    return state


def _read_pickled_weights(file: Path, trust_checkpoint: bool) -> dict[str, Tensor]:
    """A ``pytorch_model.bin``: tensors only, unless the caller trusts the file."""
    from ..checkpoint import load_tensors

    state = load_tensors(file, trust_checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise StructPruneError(f"{file} does not hold a dict of tensors (a state dict)")
    return state
