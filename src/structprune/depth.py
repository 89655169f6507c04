"""Depth pruning: whole transformer layers removed, chosen on calibration data by their block influence or by the
measured loss of removing them.

The block influence of layer i (ShortGPT, Men et al. 2024; Minitron's depth ranking) is how much the layer changes
the residual stream it reads: BI_i = 1 − mean over the real tokens t of cos(x_i[t], x_{i+1}[t]), x_i the layer's
input hidden state and x_{i+1} its output, on the calibration batches (padding left out by their attention mask).
A layer that hardly turns its input (BI near 0) is the one whose removal costs least; the ``keep`` layers of
largest influence stay. The ``"loss"`` criterion measures instead (as Shortened LLaMA's perplexity criterion, Kim
et al. 2024): greedily, one layer at a time, the layer whose removal (with those already chosen) leaves the least
loss on the first :data:`LOSS_SAMPLES` calibration sequences goes — a causal language model's next-token loss, any
other model's 1 − cosine similarity of its sentence embeddings to the dense model's. It costs a forward pass over
those sequences per layer and per dropped layer.

Removal keeps the model a model of its family: the stack (the ``nn.ModuleList`` holding the layers) keeps the
survivors in order, every ``layer_idx`` attribute inside them (a decoder's key/value cache index) is renumbered,
the config's ``num_hidden_layers`` and its per-layer lists (``layer_types``) follow, and the recorded block sizes
(``structprune_layers``) are rewritten under the new names, so that ``structprune.load`` and, where every layer
has the same sizes, transformers' own ``from_pretrained`` read it back.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .attention import find_blocks, sync_config
from .batches import batch_inputs, first_batches, run_forward
from .errors import StructPruneError
from .measure import embedding_similarity, is_causal_lm, perplexity, sentence_embeddings
from .progress import bar

CRITERIA = ("influence", "loss", "last", "random")
#: calibration sequences the loss criterion measures every candidate removal on
LOSS_SAMPLES = 128


@dataclass
class DepthResult:
    """The model without the dropped layers (a copy), which layers went (indices into the original stack), every
    layer's block influence (None for the other criteria), and the seconds it took."""

    model: nn.Module
    stack: str
    dropped: list[int]
    influence: list[float] | None
    seconds: float
    criterion: str = "influence"
    kept: list[int] = field(default_factory=list)
    #: the loss criterion's: the loss with each layer removed alone (None for the other criteria)
    losses: list[float] | None = None

    def to_dict(self) -> dict:
        return {"stack": self.stack, "criterion": self.criterion, "layers_before": len(self.kept) + len(self.dropped),
                "layers_after": len(self.kept), "dropped": self.dropped, "kept": self.kept,
                "influence": self.influence, "losses": self.losses, "seconds": self.seconds}


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ``nn.ModuleList`` of the transformer layers (the list whose items hold the attention
    blocks); a model with several stacks (an encoder-decoder), shared layers (ALBERT) or none is refused."""
    attention, _ = find_blocks(model)
    modules = dict(model.named_modules())
    stacks = set()
    for block in attention:
        parts = block.name.split(".")
        owner = next((".".join(parts[:i - 1]) for i in range(len(parts), 0, -1)
                      if parts[i - 1].isdigit() and isinstance(modules.get(".".join(parts[:i - 1])), nn.ModuleList)),
                     None)
        if owner is None:
            raise StructPruneError(f"depth: attention block {block.name} is not in a list of layers")
        stacks.add(owner)
    if len(stacks) != 1:
        raise StructPruneError("depth: the model has no transformer layers structprune knows" if not stacks else
                               f"depth: the model has {len(stacks)} stacks of layers ({', '.join(sorted(stacks))}); "
                               f"one stack (an encoder or a decoder) is pruned in depth")
    name = stacks.pop()
    layers = modules[name]
    declared = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(declared, int) and declared != len(layers):
        raise StructPruneError(f"depth: {name} holds {len(layers)} layers but the config runs {declared} (shared "
                               f"layers, as ALBERT's): layers cannot be removed one by one")
    return name, layers


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable, progress: bool = True) -> list[float]:
    """BI of every layer of the stack (:func:`layer_stack`): 1 − the mean cosine similarity, over the real tokens of
    ``batches`` (dicts of tokenised text, or inputs), between the hidden state a layer reads and the one it
    returns."""
    _, layers = layer_stack(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = torch.zeros(len(layers), dtype=torch.float64)
    current: dict = {}

    def hooks(i: int):
        def before(_module, args, kwargs):
            current[i] = args[0] if args else kwargs["hidden_states"]

        def after(_module, _args, _kwargs, output):
            x, y = current.pop(i).float(), hidden_states_of(output).float()
            cos = nn.functional.cosine_similarity(x, y, dim=-1)  # (batch, tokens)
            mask = current.get("mask")
            if mask is not None and mask.shape == cos.shape:
                cos = cos[mask.bool()]
            sums[i] += float(cos.double().sum())
            tokens[i] += cos.numel()
        return before, after

    handles = []
    for i, layer in enumerate(layers):
        before, after = hooks(i)
        handles += [layer.register_forward_pre_hook(before, with_kwargs=True),
                    layer.register_forward_hook(after, with_kwargs=True)]
    training = model.training
    model.eval()
    try:
        for batch in bar(batches, desc="block influence", unit="batch", enabled=progress):
            inputs = batch_inputs(batch)
            current["mask"] = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            run_forward(model, inputs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    if not bool((tokens > 0).all()):
        raise StructPruneError("depth: a layer saw no token of the calibration batches")
    return (1 - sums / tokens).tolist()


def choose(layers: int, keep: int, criterion: str = "influence", influence: Sequence[float] | None = None,
           seed: int = 0) -> list[int]:
    """The indices of the ``layers - keep`` layers to drop, in order: the least influential, the last ones, or
    random ones (``seed``)."""
    if criterion not in CRITERIA:
        raise StructPruneError(f"depth: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    _check_keep(layers, keep)
    if criterion == "last":
        return list(range(keep, layers))
    if criterion == "random":
        return sorted(random.Random(seed).sample(range(layers), layers - keep))
    if criterion == "loss":
        raise StructPruneError("depth: the loss criterion measures removals on the model: use prune_depth")
    if influence is None or len(influence) != layers:
        raise StructPruneError("depth: the influence criterion needs every layer's block influence")
    order = sorted(range(layers), key=lambda i: (influence[i], i))
    return sorted(order[:layers - keep])


def _check_keep(layers: int, keep: int) -> None:
    if not 1 <= keep <= layers:
        raise StructPruneError(f"depth: keep must be between 1 and the {layers} layers, got {keep}")


def drop_layers(model: nn.Module, drop: Sequence[int]) -> None:
    """Remove the layers ``drop`` (indices into the stack) from ``model`` in place, keeping it loadable (the
    config, ``layer_idx`` and the recorded sizes follow)."""
    name, layers = layer_stack(model)
    if len(set(drop)) != len(drop) or any(not 0 <= i < len(layers) for i in drop) or len(drop) >= len(layers):
        raise StructPruneError(f"depth: cannot drop layers {list(drop)} of {len(layers)}")
    kept = [i for i in range(len(layers)) if i not in set(drop)]
    survivors = nn.ModuleList(layers[i] for i in kept)
    for new, layer in enumerate(survivors):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, survivors)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        for key in ("layer_types",):
            value = getattr(config, key, None)
            if isinstance(value, (list, tuple)) and len(value) == len(layers):
                setattr(config, key, [value[i] for i in kept])
        if hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(kept)
        sync_config(model)


def prune_depth(model: nn.Module, batches: Iterable, keep: int | float, criterion: str = "influence", seed: int = 0,
                progress: bool = True) -> DepthResult:
    """A copy of ``model`` with ``keep`` of its transformer layers (a number, or a fraction of them in (0, 1)),
    the others dropped by ``criterion``: ``"influence"`` (the least block influence on ``batches``), ``"loss"``
    (the least measured loss of removing them, greedily: :func:`removal_losses`), ``"last"`` or ``"random"``.
    ``model`` itself is left as it is."""
    start = time.perf_counter()
    name, layers = layer_stack(model)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise StructPruneError(f"depth: keep must be a number of layers or a fraction, got {keep!r}")
    count = keep if isinstance(keep, int) else round(keep * len(layers))
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise StructPruneError(f"depth: a fraction of the layers must be in (0, 1], got {keep}")
    influence = block_influence(model, batches, progress) if criterion == "influence" else None
    if criterion == "loss":
        _check_keep(len(layers), count)
        drop, losses = removal_losses(model, batches, len(layers) - count, progress)
    else:
        drop, losses = choose(len(layers), count, criterion, influence, seed), None
    pruned = copy.deepcopy(model)
    if drop:
        drop_layers(pruned, drop)
    return DepthResult(pruned, name, drop, influence, time.perf_counter() - start, criterion,
                       [i for i in range(len(layers)) if i not in drop], losses)


@torch.no_grad()
def removal_losses(model: nn.Module, batches: Iterable, count: int, progress: bool = True
                   ) -> tuple[list[int], list[float]]:
    """The ``count`` layers to drop, chosen greedily by the loss their removal leaves on the first
    :data:`LOSS_SAMPLES` sequences of ``batches`` (see the module doc), and the loss after each layer's removal
    alone (the first round's measurements; a record like the block influence). ``model`` is left as it is: a
    removed layer is skipped (its output replaced by its input) while the loss is measured."""
    _, layers = layer_stack(model)
    batches = list(first_batches(batches, LOSS_SAMPLES))
    if is_causal_lm(model):
        def loss() -> float:
            return math.log(perplexity(model, batches))
    else:
        reference = sentence_embeddings(model, batches)

        def loss() -> float:
            return 1 - embedding_similarity(reference, sentence_embeddings(model, batches))
    skipped: set[int] = set()

    def skip(i: int):
        def hook(_module, args, kwargs, output):
            if i not in skipped:
                return output
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden
        return hook

    handles = [layer.register_forward_hook(skip(i), with_kwargs=True) for i, layer in enumerate(layers)]
    dropped, alone = [], []
    done = bar(total=sum(len(layers) - k for k in range(count)), desc="layer removals", unit="pass",
               enabled=progress)
    try:
        for _ in range(count):
            losses = {}
            for i in (i for i in range(len(layers)) if i not in dropped):
                skipped.clear()
                skipped.update([*dropped, i])
                losses[i] = loss()
                done.update(1)
            if not alone:
                alone = [losses[i] for i in range(len(layers))]
            dropped.append(min(losses, key=lambda i: (losses[i], i)))
    finally:
        done.close()
        skipped.clear()
        for handle in handles:
            handle.remove()
    return sorted(dropped), alone


def hidden_states_of(output) -> Tensor:
    """The hidden states a layer returns (a tensor, or the first of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output
