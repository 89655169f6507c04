"""Size and speed of a model: parameters, MACs (Torch-Pruning's counter), latency, accuracy."""

from __future__ import annotations

import math
import time
import timeit
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .attention import attention_macs
from .batches import batch_inputs, run_forward, take_samples
from .counter import Tally, counter_rules, outermost_counted
from .errors import StructPruneError
from .layers import is_linear, is_transposed_linear


def count(model: nn.Module, example_inputs) -> dict[str, int]:
    """{"params": ..., "macs": ...} for one forward pass on ``example_inputs``.

    MACs are Torch-Pruning's count over layers, plus what its counter does not see: the attention products
    (Q·Kᵀ and A·V, 2·L²·heads·head_size per block and sample) of every transformer block
    :mod:`structprune.attention` describes, and Hugging Face's transposed Linear layers (``Conv1D``, GPT-2).

    The layers' count is Torch-Pruning's own rule (``tp.utils.count_ops_and_params``: its per-layer formulas,
    the outermost layer of a type it knows counts, the total per sample of the first input), applied by hooks on
    the model itself: no deep copy of the model per count.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counting(model) as size:
            run_forward(model, example_inputs)
    finally:
        model.train(was_training)
    return size()


@contextmanager
def counting(model: nn.Module) -> Iterator[Callable[[], dict[str, int]]]:
    """While open, the forward passes of ``model`` are counted as :func:`count` counts one (run them in eval mode,
    with gradients or without); yields a function that gives the size ({"params", "macs"}) of what ran. Another pass
    that must run anyway (a trace) can count the model with it, instead of a pass of its own."""
    rules = counter_rules()
    counted = [Tally(module) for module in outermost_counted(model, rules)]
    batch: list[int] = []
    transposed: list[int] = []
    hooks = [model.register_forward_hook(lambda _m, args, _out: batch.append(len(args[0]) if args else 1))]
    hooks += [tally._module.register_forward_hook(lambda _m, args, out, tally=tally: rules[type(tally._module)](
        tally, args, out)) for tally in counted]
    hooks += [m.register_forward_hook(lambda m, _args, out: transposed.append(out[..., :1].numel() * m.weight.numel()))
              for m in model.modules() if is_transposed_linear(m)]

    def size() -> dict[str, int]:  # per sample: the layers' as Torch-Pruning's counter has it, and the rest alike
        samples = max(sum(batch), 1)
        macs = int(sum(tally.__flops__ for tally in counted) / samples)
        return {"params": int(sum(p.numel() for p in model.parameters())),
                "macs": macs + (sum(attention) + sum(transposed)) // samples}

    try:
        with attention_macs(model) as attention:
            yield size
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def output_sizes(model: nn.Module, example_inputs) -> dict[str, dict[str, int]]:
    """Per Conv/Linear layer: output ``elements`` per sample and output ``positions`` per sample
    (spatial positions of a conv, tokens of a Linear on sequences, 1 otherwise)."""
    sizes, hooks = {}, []
    names = {module: name for name, module in model.named_modules()}

    def record(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() >= 1 and output.shape[0] > 0:
            per_sample = output[0].numel()
            channels = output.shape[1] if isinstance(module, nn.modules.conv._ConvNd) else output.shape[-1]
            sizes[names[module]] = {"elements": per_sample, "positions": max(1, per_sample // max(channels, 1))}

    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) or is_linear(module):
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        run_forward(model, take_samples(example_inputs, 1, next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return sizes


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, device=None) -> float:
    """Top-1 accuracy (%) over a loader of (inputs, targets)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for inputs, targets in loader:
            logits = model(inputs.to(device))
            correct += int((logits.argmax(dim=1) == targets.to(device)).sum())
            total += len(targets)
    finally:
        model.train(was_training)
    return 100.0 * correct / max(total, 1)


def repeat_batch(example_inputs, batch: int):
    """A batch of ``batch`` copies of the first sample of ``example_inputs`` (a tensor or a dict of tensors)."""
    inputs = batch_inputs(example_inputs)
    if isinstance(inputs, dict):
        return {k: v[:1].expand(batch, *v.shape[1:]).contiguous() for k, v in inputs.items()}
    return inputs[:1].expand(batch, *inputs.shape[1:]).contiguous()


@torch.no_grad()
def latency(model: nn.Module, example_inputs, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass, in milliseconds (see :func:`latency_stats`)."""
    return latency_stats(model, example_inputs, min_runs=repeats, warmup=warmup)["median_ms"]


@torch.no_grad()
def latency_stats(model: nn.Module, example_inputs, min_runs: int = 20, warmup: int = 3,
                  min_seconds: float = 0.2) -> dict:
    """Forward-pass time of ``model`` on ``example_inputs``, without gradients, as inference runs (see
    :func:`time_call`)."""
    model.eval()
    inputs = batch_inputs(example_inputs)
    return time_call(lambda: run_forward(model, inputs), _on_cuda(model), min_runs, warmup, min_seconds)


def _on_cuda(model: nn.Module) -> bool:
    return next(model.parameters(), torch.empty(0)).device.type != "cpu"


def _timer(run, on_cuda: bool):
    """A ``torch.utils.benchmark.Timer`` of ``run()`` on this process's threads."""
    from torch.utils import benchmark

    return benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads(),
                           # the default timer synchronises any accelerator present: only wanted for a model on it
                           timer=benchmark.utils.timer.timer if on_cuda else timeit.default_timer)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_call(run, on_cuda: bool = False, min_runs: int = 20, warmup: int = 3, min_seconds: float = 0.2) -> dict:
    """Wall time of ``run()`` with ``torch.utils.benchmark.Timer`` (what PyTorch's own benchmarks use): ``warmup``
    untimed runs, then blocks of runs until at least ``min_runs`` runs and ``min_seconds``. CUDA is synchronised
    by the timer only when ``on_cuda`` (the model is on CUDA). Returns median and interquartile range (ms), the
    runs, and the CPU threads used, so that two measurements can be compared honestly."""
    for _ in range(warmup):
        run()
    timer = _timer(run, on_cuda)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        measurement = timer.timeit(1)
        times.extend(measurement.raw_times)
    q1, median, q3 = _quartiles([t * 1000 for t in times])
    return {"median_ms": median, "iqr_ms": q3 - q1, "runs": len(times), "threads": torch.get_num_threads()}


@torch.no_grad()
def fastest_medians(runs: Sequence[Callable[[], object]], rounds: int = 3, on_cuda: bool = False,
                    **timing) -> list[float]:
    """The fastest median (ms) of each of ``runs`` over ``rounds`` rounds, every round timing them in turn
    (:func:`time_call` with ``timing``): a slow spell of the machine costs each run one round, not the comparison.
    Without gradients."""
    best = [math.inf] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            best[i] = min(best[i], time_call(run, on_cuda, **timing)["median_ms"])
    return best


@torch.no_grad()
def latency_ratio(model: nn.Module, reference: nn.Module, example_inputs, min_pairs: int = 10, block: int = 4,
                  warmup: int = 3, min_seconds: float = 0.4) -> dict:
    """Forward time of ``model`` over that of ``reference`` on ``example_inputs``, timed in pairs of blocks: ``block``
    runs of one, then of the other (which goes first alternates), each block's first run left out (the switch
    from the other model costs it extra: on CPU single alternating runs read ResNet-56's ratio 0.648 on average
    where blocks read 0.579, benchmarks/latency_ratio.py), until at least ``min_pairs`` pairs and
    ``min_seconds``; the median of the pairs' ratios of block medians, without gradients, as inference runs. A
    machine whose speed drifts (load, clocks: the dense ResNet-56 at 84–118 ms within minutes on this project's
    shared one) moves both blocks of a pair alike, so the ratio holds where two separate medians would not.
    Returns "ratio", its interquartile range, "pairs", each model's median ("model_ms", "reference_ms") and the
    CPU threads used."""
    if block < 2:
        raise StructPruneError(f"block must be at least 2 (its first run is left out), got {block!r}")
    timers = []
    for module in (model, reference):
        module.eval()
        inputs = batch_inputs(example_inputs)

        def run(module=module, inputs=inputs):
            return run_forward(module, inputs)

        for _ in range(warmup):
            run()
        timers.append(_timer(run, _on_cuda(module)))
    medians: list[tuple[float, float]] = []
    start = time.perf_counter()
    while len(medians) < min_pairs or time.perf_counter() - start < min_seconds:
        first = len(medians) % 2  # 0: the model first, 1: the reference first
        pair = [0.0, 0.0]
        for i in (first, 1 - first):
            times = [timers[i].timeit(1).raw_times[0] for _ in range(block)][1:]
            pair[i] = sorted(times)[len(times) // 2]
        medians.append((pair[0], pair[1]))
    q1, median, q3 = _quartiles([m / r for m, r in medians])
    model_ms, reference_ms = (float(v) for v in torch.tensor(medians, dtype=torch.float64).median(dim=0).values * 1000)
    return {"ratio": median, "iqr": q3 - q1, "pairs": len(medians), "model_ms": model_ms,
            "reference_ms": reference_ms, "threads": torch.get_num_threads()}


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    """Unit-length sentence embeddings: the mean of the last hidden states over real (unmasked) tokens,
    as sentence-transformers' all-MiniLM-L6-v2 computes them. (N, hidden) on the CPU. An encoder-decoder's are its
    encoder's and its decoder's (reading the input shifted right, as in training), each of unit length, side by
    side divided by √2: their cosine similarity is the mean of the two halves'."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in batches:
            if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
                out.append(_encoder_decoder_embeddings(model, batch))
                continue
            hidden = run_forward(model, batch)
            hidden = getattr(hidden, "last_hidden_state", hidden)
            if isinstance(hidden, (tuple, list)):
                hidden = hidden[0]
            out.append(_mean_pooled(hidden, batch["attention_mask"]))
    finally:
        model.train(was_training)
    return torch.cat(out)


def _mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return nn.functional.normalize(pooled.float(), dim=-1).cpu()


def _encoder_decoder_embeddings(model: nn.Module, batch: dict) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    start = getattr(model.config, "decoder_start_token_id", None)
    start = start if start is not None else getattr(model.config, "bos_token_id", None) or 0
    decoder_ids = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
    decoder_mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
    output = run_forward(model, {**batch, "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask,
                                 "output_hidden_states": True, "use_cache": False})
    halves = [_mean_pooled(output.encoder_last_hidden_state, mask),
              _mean_pooled(output.decoder_hidden_states[-1], decoder_mask)]
    return torch.cat(halves, dim=1) / math.sqrt(2)


def output_vector(model: nn.Module, inputs) -> torch.Tensor:
    """A model's output on ``inputs`` as one float vector (its logits, or last hidden states, or first tensor); with
    an ``attention_mask`` among the inputs, the real tokens' only (a padding position's output is read by nothing)."""
    output = run_forward(model, inputs)
    output = getattr(output, "logits", getattr(output, "last_hidden_state", output))
    output = output[0] if isinstance(output, (tuple, list)) else output
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and output.dim() >= 2 and tuple(output.shape[:2]) == tuple(mask.shape):
        output = output[mask.to(output.device).bool()]
    return output.float().flatten()


def embedding_similarity(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows of two unit-length embedding matrices."""
    return float((reference * embeddings).sum(dim=1).mean())


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal language model (``…ForCausalLM``): judged by perplexity, distilled on its tokens."""
    return any(cls.__name__.endswith("ForCausalLM") for cls in type(model).__mro__)


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict]) -> float:
    """exp of the mean negative log-likelihood of every real next token (``attention_mask`` 1 at a token and the
    one it predicts from) of a causal language model, over batches of tokenised text."""
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        for batch in batches:
            logits = run_forward(model, batch).logits[:, :-1].float()
            targets = batch["input_ids"][:, 1:]
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
            real = (mask[:, 1:] * mask[:, :-1]).bool()
            losses = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            nll += float(losses[real].sum())
            tokens += int(real.sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise StructPruneError("perplexity: no token with a next token to predict in the batches")
    return math.exp(nll / tokens)


@torch.no_grad()
def sliding_perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, stride: int, progress=None) -> float:
    """Perplexity of a causal language model on one long token sequence ``ids`` (1-D), read in windows of at most
    ``seq_len`` tokens that start every ``stride`` tokens (transformers' perplexity guide): each token is predicted
    once, in the first window that reaches it, from the tokens of that window before it (at least
    ``seq_len - stride`` of them after the first window); a token that is the first of its window is not predicted
    (the sequence's first token, and with ``stride == seq_len`` each window's). ``progress(done, total)``: called
    after each window."""
    if not 0 < stride <= seq_len:
        raise StructPruneError(f"perplexity: the stride must be in [1, seq_len = {seq_len}], got {stride}")
    if ids.dim() != 1 or len(ids) < 2:
        raise StructPruneError("perplexity: the text gives fewer than 2 tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, predicted, end, starts = 0.0, 0, 1, range(0, max(1, len(ids) - seq_len + stride), stride)
    try:
        for i, begin in enumerate(starts):
            stop = min(begin + seq_len, len(ids))
            window = ids[begin:stop].to(device)[None]
            logits = run_forward(model, {"input_ids": window, "use_cache": False}).logits[0, :-1].float()
            new = min(stop - end, stop - begin - 1)  # not predicted before, with context in this window
            losses = nn.functional.cross_entropy(logits[-new:], window[0, -new:], reduction="sum")
            nll, predicted, end = nll + float(losses), predicted + new, stop
            if progress is not None:
                progress(i + 1, len(starts))
            if stop == len(ids):
                break
    finally:
        model.train(was_training)
    return math.exp(nll / predicted)


@torch.no_grad()
def agreement(model: nn.Module, reference: nn.Module, loader: Iterable, device=None) -> float:
    """How often (%) ``model``'s top-1 class is ``reference``'s, over a loader of inputs or (inputs, labels): the
    accuracy a model keeps against the one it was pruned from, with no labels."""
    device = device or next(model.parameters()).device
    states = model.training, reference.training
    model.eval()
    reference.eval()
    same = total = 0
    try:
        for batch in loader:
            inputs = batch_inputs(batch).to(device)
            same += int((model(inputs).argmax(dim=1) == reference(inputs).argmax(dim=1)).sum())
            total += len(inputs)
    finally:
        model.train(states[0])
        reference.train(states[1])
    return 100.0 * same / max(total, 1)
