"""Width (hidden-size) pruning of a decoder language model: channels of the residual stream removed everywhere.

The residual stream's channels run through the whole model: the token embeddings write them, every block's norms
normalise them, the attention's query/key/value and the FFN's up (and gate) projections read them (after a norm),
the attention's output and the FFN's down projections write into them, and the LM head reads them after the last
norm. One group, then, removed from all of them at once (Minitron's width pruning of the embedding channels):

* **Importance** (Minitron): channel c's energy in the outputs of every norm, Σ over norms and real tokens of
  y_c², on the calibration batches (padding left out by their attention mask); the ``keep`` channels of largest
  energy stay, in their order.
* **Refit of the readers**: a norm over fewer channels normalises differently (its root mean square or variance is
  over the kept channels), so each reader's weights on the kept channels are refitted by least squares: the target
  is its dense output on the dense stream, its input the pruned norm's output on the same stream's kept channels
  (:func:`structprune.refit` 's normal equations and ridge; kept only where it lowers the error). A reader tied to
  the embeddings (a tied LM head) keeps the sliced embedding.
* **Surgery**: embedding columns, norm weights (and biases), writer rows (and biases), reader columns, and the
  config's ``hidden_size``; the result is checked against the model its class builds from that config (every
  parameter the same shape), so transformers' ``from_pretrained`` and :func:`structprune.load` read it back.

Supported: causal language models of ``nn.Linear`` projections whose attention and FFN blocks a registered layout
describes (Llama, Mistral, Qwen2 and the like); anything else is refused by name.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import find_blocks, layer_sizes, resize, sync_config
from .batches import batch_inputs, run_forward
from .errors import StructPruneError
from .methods.base import NormalEquations
from .progress import bar
from .refit import RIDGE, _solve


@dataclass
class HiddenResult:
    """The model with ``kept`` stream channels (a copy), every channel's importance, what the refit did per reader
    and the seconds it took."""

    model: nn.Module
    channels: int
    kept: list[int]
    importance: list[float]
    refit: dict[str, dict]
    seconds: float

    def to_dict(self) -> dict:
        return {"hidden_before": self.channels, "hidden_after": len(self.kept), "kept": self.kept,
                "refit": self.refit, "seconds": self.seconds}


@dataclass
class Stream:
    """The modules the residual stream runs through."""

    width: int
    embeddings: list[nn.Embedding]
    norms: list[nn.Module]
    readers: list[nn.Linear]
    writers: list[nn.Linear]
    names: dict[nn.Module, str]


def stream_of(model: nn.Module) -> Stream:
    """The residual stream's modules of a supported causal language model, or a one-line refusal."""
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None)
    if not isinstance(width, int) or not hasattr(model, "get_output_embeddings"):
        raise StructPruneError("hidden: only a Hugging Face language model (a config with hidden_size) is pruned in "
                               "width")
    head = model.get_output_embeddings()
    if head is None:
        raise StructPruneError(f"hidden: {type(model).__name__} has no LM head; width pruning takes a causal "
                               f"language model (Llama, Mistral, Qwen2 ...)")
    attention, feed_forward = find_blocks(model)
    if not attention or not feed_forward:
        raise StructPruneError(f"hidden: no attention or FFN blocks structprune knows in {type(model).__name__}")
    readers = [b.layer(p) for b in attention for p in b.layout.projections()]
    readers += [b.layer(p) for b in feed_forward for p in b.layout.up] + [head]
    writers = [b.layer(b.layout.output) for b in attention] + [b.layer(b.layout.down) for b in feed_forward]
    for layer in readers + writers:
        if type(layer) is not nn.Linear:
            raise StructPruneError(f"hidden: {type(layer).__name__} layers are not pruned in width (nn.Linear only)")
    if any(layer.in_features != width for layer in readers) or any(layer.out_features != width for layer in writers):
        raise StructPruneError("hidden: a projection does not read or write the residual stream's width")
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.embedding_dim == width]
    norms = [m for m in model.modules() if _is_norm(m) and tuple(m.weight.shape) == (width,)]
    if not embeddings or not norms:
        raise StructPruneError("hidden: no token embeddings or norms of the stream's width found")
    names = {m: n for n, m in model.named_modules()}
    return Stream(width, embeddings, norms, readers, writers, names)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or (type(module).__name__.endswith("RMSNorm") and
                                                isinstance(getattr(module, "weight", None), Tensor))


def prune_hidden(model: nn.Module, calib: Iterable, keep: int | float, refit: bool = True,
                 progress: bool = True) -> HiddenResult:
    """A copy of ``model`` keeping ``keep`` channels of its residual stream (a count, or a fraction of them),
    chosen and refitted on the calibration batches (dicts of ``input_ids`` and ``attention_mask``)."""
    start = time.perf_counter()
    stream = stream_of(model)
    number = isinstance(keep, (int, float)) and not isinstance(keep, bool)
    count = (keep if isinstance(keep, int) else round(keep * stream.width)) if number else 0
    if not number or not (isinstance(keep, int) or 0 < keep < 1) or not 1 <= count <= stream.width:
        raise StructPruneError(f"hidden: keep must be a channel count in [1, {stream.width}] or a fraction in "
                               f"(0, 1), got {keep!r}")
    batches = list(calib)
    if not batches:
        raise StructPruneError("hidden: no calibration batches")
    was_training = model.training
    model.eval()
    try:
        importance = _importance(model, stream, batches, progress)
        kept = torch.sort(torch.topk(importance, count).indices).values
        fits = _refit_equations(model, stream, batches, kept, progress) if refit and count < stream.width else {}
    finally:
        model.train(was_training)
    pruned = copy.deepcopy(model)
    report = _slice(pruned, stream_of(pruned), kept, fits)
    return HiddenResult(pruned, stream.width, kept.tolist(), importance.tolist(), report,
                        time.perf_counter() - start)


def _mask(batch) -> Tensor | None:
    inputs = batch_inputs(batch)
    return inputs.get("attention_mask") if isinstance(inputs, dict) else None


def _importance(model: nn.Module, stream: Stream, batches: list, progress: bool) -> Tensor:
    """Σ over the norms and the real tokens of each channel's squared norm output, float64."""
    total = torch.zeros(stream.width, dtype=torch.float64)
    mask = None

    def hook(_module, _args, output):
        rows = output.reshape(-1, stream.width) if mask is None else output[mask.bool()]
        total.add_(rows.double().square().sum(0).cpu())

    handles = [norm.register_forward_hook(hook) for norm in stream.norms]
    try:
        with torch.no_grad():
            for batch in bar(batches, desc="hidden: importance", unit="batch", enabled=progress):
                mask = _mask(batch)
                run_forward(model, batch_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    return total


def _key(tensor: Tensor) -> tuple:
    return tensor.data_ptr(), tuple(tensor.shape)


def _refit_equations(model: nn.Module, stream: Stream, batches: list, kept: Tensor, progress: bool
                     ) -> dict[str, NormalEquations]:
    """Per reader, the least-squares system of its dense output (on the dense stream) from the pruned norm's output
    on the kept channels of the same stream: Σ [X' 1]ᵀ[X' 1], [X' 1]ᵀ·Y, Y², float64."""
    sliced = {norm: _keep_norm_channels(copy.deepcopy(norm), kept) for norm in stream.norms}  # as it will be
    readers = set(stream.readers)
    pruned_inputs: dict[tuple, Tensor] = {}  # a norm's output (its storage and shape) -> the pruned norm's output
    equations: dict[str, NormalEquations] = {}
    mask = None

    def norm_hook(module, args, output):
        with torch.no_grad():
            pruned_inputs[_key(output)] = sliced[module](args[0][..., kept.to(args[0].device)])

    def reader_hook(module, args, output):
        x = pruned_inputs.get(_key(args[0]))  # the LM head reads a view of the last norm's output
        if x is None:  # a reader that does not read a norm's output directly: left as it is
            return
        rows_x = x.reshape(-1, len(kept)) if mask is None else x[mask.bool()]
        rows_y = output.reshape(-1, output.shape[-1]) if mask is None else output[mask.bool()]
        if module.bias is not None:
            rows_y = rows_y - module.bias
        z = torch.cat([rows_x.double(), torch.ones(len(rows_x), 1, dtype=torch.float64, device=rows_x.device)], 1)
        y = rows_y.double()
        add = NormalEquations((z.T @ z).cpu(), (z.T @ y).cpu(), y.square().sum(0).cpu(),
                              torch.ones(y.shape[1], dtype=torch.float64))
        name = stream.names[module]
        old = equations.get(name)
        equations[name] = add if old is None else NormalEquations(
            old.gram + add.gram, old.cross + add.cross, old.target_sq + add.target_sq, old.scale_sq)

    handles = [n.register_forward_hook(norm_hook) for n in stream.norms]
    handles += [r.register_forward_hook(reader_hook) for r in readers]
    try:
        with torch.no_grad():
            for batch in bar(batches, desc="hidden: refit", unit="batch", enabled=progress):
                mask = _mask(batch)
                run_forward(model, batch_inputs(batch))
                pruned_inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return equations


def _slice(model: nn.Module, stream: Stream, kept: Tensor, fits: dict) -> dict[str, dict]:
    """Keep the ``kept`` stream channels in every module of ``stream`` (of ``model``, in place), the readers'
    refitted weights where the refit lowers their error; the config follows; the model is checked against the one
    its class builds from that config. Returns the refit's report per reader."""
    report = {}
    by_name = {stream.names[r]: r for r in stream.readers}
    tied = {id(p) for e in stream.embeddings for p in e.parameters()}
    with torch.no_grad():
        for name, reader in by_name.items():
            equations = fits.get(name)
            if id(reader.weight) in tied:
                report[name] = "not refitted: tied to the embeddings"
                continue
            prior = reader.weight[:, kept].T.double().cpu()
            weight = reader.weight[:, kept]
            if equations is not None:
                fitted, _ = _solve(equations, prior, RIDGE, fit_bias=False)
                before, after = equations.error(prior), equations.error(fitted)
                if after < before:
                    weight = fitted.T.to(reader.weight)
                report[name] = {"error_before": before, "error_after": min(after, before), "applied": after < before}
            reader.weight = nn.Parameter(weight.contiguous())
            reader.in_features = len(kept)
        for embedding in stream.embeddings:
            embedding.weight = nn.Parameter(embedding.weight[:, kept].contiguous())
            embedding.embedding_dim = len(kept)
        for reader in stream.readers:  # a head tied to the embeddings shares its new weight
            if id(reader.weight) in tied:
                source = next(e for e in stream.embeddings if e.weight.shape[0] == reader.out_features)
                reader.weight = source.weight
                reader.in_features = len(kept)
        for writer in stream.writers:
            writer.weight = nn.Parameter(writer.weight[kept].contiguous())
            if writer.bias is not None:
                writer.bias = nn.Parameter(writer.bias[kept].contiguous())
            writer.out_features = len(kept)
        for norm in stream.norms:
            _keep_norm_channels(norm, kept)
    model.config.hidden_size = len(kept)
    sync_config(model)
    _check_rebuilds(model)
    return report


def _keep_norm_channels(norm: nn.Module, kept: Tensor) -> nn.Module:
    """``norm`` (in place) normalising the ``kept`` channels only: its weight and bias sliced."""
    with torch.no_grad():
        norm.weight = nn.Parameter(norm.weight[kept].contiguous())
        if getattr(norm, "bias", None) is not None:
            norm.bias = nn.Parameter(norm.bias[kept].contiguous())
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (len(kept),)
    return norm


def _check_rebuilds(model: nn.Module) -> None:
    """The model's parameters have the shapes its class builds from its config (on the meta device: no memory)."""
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as exc:  # a family whose config cannot say the new width
        raise StructPruneError(f"hidden: {type(model).__name__} cannot be rebuilt at hidden_size "
                               f"{model.config.hidden_size} ({type(exc).__name__}: {exc})") from None
    resize(fresh, layer_sizes(model))
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k in actual if expected.get(k) != actual[k]]
    if wrong:
        raise StructPruneError(f"hidden: after the width pruning {wrong[0]} is {actual[wrong[0]]}, but "
                               f"{type(model).__name__} at this config builds {expected.get(wrong[0])}: not "
                               f"supported for this family")
