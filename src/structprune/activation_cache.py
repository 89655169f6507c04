"""Resume a forward pass part-way: the kept calibration inputs of one block stand in for everything before it.

Most networks are mostly a chain: block after block, each reading the one tensor the block before returned
(a ResNet's residual blocks, a VGG's layers, a transformer's layers). :class:`Chain` finds the longest such
chain in one traced forward pass: modules called once, each taking as its first input the very tensor the
one before returned. Resuming at block k means that every block before k returns the kept input of block k
(the code between blocks still runs: embeddings, masks, the stem). Whether that computes the same as the
whole pass is checked on the model, for every cut at once before the first is used: every module after the
cut must see the same input and the model must return the same output. A cut that fails (a tensor kept from
before the cut and read after it, as in a U-Net or a DenseNet) is never used.

:class:`ActivationCache` keeps, for every calibration batch, the input of one block. A group's capture resumes
there instead of running from the model input, and records the input of the earliest block the group changes,
for the next group. Groups come shallow to deep, so each capture runs only the blocks between the cut and the
group's consumers (and stops there), instead of the whole prefix of the network. After each removal the
modules that changed are compared with the cut, and a change before it drops the cache (the next capture runs
from the input). Memory: at most ``limit_bytes`` of kept inputs; beyond that nothing is kept.

The group's producers that read the cut block's own input (a residual block's first conv, a VGG layer) have
their outputs kept with it, within the same bound. Their group's removal keeps some of their output rows and
changes nothing they read, so the next pass, which resumes at that cut, takes those rows of the kept outputs
instead of running them again (checked against a real run on its first batch; a difference makes the layer
run from then on).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batches import output_tensors, run_forward


@dataclass
class _Call:
    name: str
    start: int
    input: Tensor | None
    end: int = -1
    output: object = None


class Chain:
    """The longest chain of blocks in ``model``'s forward pass on ``example_inputs`` (see the module doc).

    ``nodes``: the blocks' names, in order; ``calls``: how often each module ran in the pass (a capture knows
    from it when every consumer has read a batch); :meth:`key` places any module after a block.
    """

    def __init__(self, model: nn.Module, example_inputs):
        calls = _trace(model, example_inputs)
        self.calls = {name: len(c) for name, c in calls.items()}
        once = sorted((c[0] for name, c in calls.items() if name and len(c) == 1
                       and isinstance(c[0].input, Tensor) and isinstance(c[0].output, Tensor) and c[0].end >= 0),
                      key=lambda call: call.start)
        self.nodes = _longest_path(once)
        self._starts = [call.start for call in self.nodes]
        self._first = {name: c[0].start for name, c in calls.items()}
        self._nodes = [call.name for call in self.nodes]
        self._per_sample = [call.input[:1].nelement() * call.input.element_size() for call in self.nodes]
        self._usable: dict[int, bool] | None = None  # per cut, once checked
        node_inputs = {id(call.input): i for i, call in enumerate(self.nodes)}
        #: modules called once whose input is a block's own input: module name -> that block
        self._reads_block_input = {name: node_inputs[id(c[0].input)] for name, c in calls.items()
                                   if len(c) == 1 and isinstance(c[0].input, Tensor) and id(c[0].input) in node_inputs}

    def __len__(self) -> int:
        return len(self.nodes)

    def key(self, name: str) -> int:
        """The last block that starts no later than module ``name`` first runs (-1: it runs before the chain; a
        module that never ran counts as after every block)."""
        start = self._first.get(name)
        if start is None:
            return len(self.nodes)
        return bisect.bisect_right(self._starts, start) - 1  # the blocks' starts are in order

    def bytes_per_sample(self, cut: int) -> int:
        return self._per_sample[cut]

    def reads_block_input(self, name: str) -> int | None:
        """The block whose own input module ``name`` reads (it runs once, first thing on it), else None."""
        return self._reads_block_input.get(name)

    def usable(self, model: nn.Module, example_inputs, cut: int) -> bool:
        """Whether resuming ``model`` at block ``cut`` computes what its whole forward pass does. Every cut is
        checked at the first question, on one whole pass (each cut then costs a pass from it to the end)."""
        if cut < 1 or cut >= len(self.nodes):
            return False
        if self._usable is None:
            self._usable = _resumable_cuts(model, example_inputs, self._nodes)
        return self._usable.get(cut, False)

    def resumed(self, model: nn.Module, cut: int, value):
        """Within the block, ``model``'s blocks before ``cut`` return ``value()`` instead of running."""
        return _stubbed(model, self._nodes[:cut], value)

    def node(self, model: nn.Module, cut: int) -> nn.Module:
        return model.get_submodule(self._nodes[cut])


@contextmanager
def _stubbed(model: nn.Module, names: list[str], value) -> Iterator[None]:
    """Within the block, the modules ``names`` (blocks of a chain, in order) return ``value()`` instead of
    running: the first of them fetches it on each pass, the others return that same tensor (one copy per pass,
    not one per block). Code between blocks that changed it in place would change what the cut block reads:
    the cut check runs this same way, so such a cut is never used."""
    stubbed = [model.get_submodule(name) for name in names]
    fetched: list = [None]

    def first(*_args, **_kwargs):
        fetched[0] = value()
        return fetched[0]

    def again(*_args, **_kwargs):
        return fetched[0]

    for i, module in enumerate(stubbed):
        module.forward = first if i == 0 else again
    try:
        yield
    finally:
        for module in stubbed:
            del module.forward


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    """Each module's (first) name: the key of every per-module record here."""
    return {module: name for name, module in model.named_modules()}


def _trace(model: nn.Module, example_inputs) -> dict[str, list[_Call]]:
    """Every module call of one forward pass, in order: when it started and ended, its first input and its
    output (kept alive, so that tensor identity can be compared)."""
    names = _module_names(model)
    calls: dict[str, list[_Call]] = {}
    clock = itertools.count()
    open_calls: dict[str, list[_Call]] = {}

    def before(module, args):
        name = names[module]
        call = _Call(name, next(clock), args[0] if args and isinstance(args[0], Tensor) else None)
        calls.setdefault(name, []).append(call)
        open_calls.setdefault(name, []).append(call)

    def after(module, _args, output):
        call = open_calls[names[module]].pop()
        call.end, call.output = next(clock), output

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        with torch.no_grad():
            run_forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _longest_path(nodes: list[_Call]) -> list[_Call]:
    """The longest sequence of calls each of which takes the tensor the one before returned, after it ended."""
    by_output: dict[int, list[int]] = {}
    best, before = [1] * len(nodes), [-1] * len(nodes)
    for i, call in enumerate(nodes):
        for j in by_output.get(id(call.input), ()):
            if nodes[j].end < call.start and best[j] + 1 >= best[i]:
                best[i], before[i] = best[j] + 1, j  # ties: the later-starting (innermost) block
        by_output.setdefault(id(call.output), []).append(i)
    if not nodes:
        return []
    i = max(range(len(nodes)), key=lambda n: best[n])
    path = []
    while i >= 0:
        path.append(nodes[i])
        i = before[i]
    return path[::-1] if len(path) > 1 else []


def _checksum(x) -> tuple | None:
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.is_complex()):
        return None if not isinstance(x, Tensor) else (tuple(x.shape), int(x.sum()))
    x = x.detach().double()
    return tuple(x.shape), float(x.sum()), float(x.abs().sum())


def _same(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None or len(a) == 2:
        return a == b
    return a[0] == b[0] and all(abs(x - y) <= 1e-5 * max(abs(x), abs(y), 1.0) for x, y in zip(a[1:], b[1:],
                                                                                               strict=True))


def _resumable_cuts(model: nn.Module, example_inputs, nodes: list[str]) -> dict[int, bool]:
    """For each cut 1..len(nodes)-1: whether a pass resumed there on the whole pass's input of that block gives
    every module that runs in both the same input, and the same outputs."""
    names = _module_names(model)
    seen: dict[str, list] = {}
    kept: dict[str, Tensor] = {}

    def record(module, args):
        seen.setdefault(names[module], []).append(_checksum(args[0]) if args else None)

    def keep(module, args):
        kept[names[module]] = args[0].detach().clone()

    def run(extra=()) -> tuple[dict[str, list], list[Tensor]]:
        seen.clear()
        handles = [m.register_forward_pre_hook(record) for m in names] + list(extra)
        try:
            with torch.no_grad():
                return dict(seen), [t.clone() for t in output_tensors(run_forward(model, example_inputs))]
        finally:
            for handle in handles:
                handle.remove()

    training = model.training
    model.eval()
    try:
        try:
            whole, whole_out = run([model.get_submodule(n).register_forward_pre_hook(keep) for n in nodes[1:]])
        except Exception:
            return {}
        result = {}
        for cut in range(1, len(nodes)):
            try:
                with _stubbed(model, nodes[:cut], lambda cut=cut: kept[nodes[cut]].clone()):
                    part, part_out = run()
            except Exception:
                result[cut] = False
                continue
            result[cut] = _same_pass(whole, whole_out, part, part_out, set(nodes[:cut]))
        return result
    finally:
        model.train(training)


def _same_pass(whole: dict[str, list], whole_out: list[Tensor], part: dict[str, list], part_out: list[Tensor],
               stubbed: set[str]) -> bool:
    for name, sums in part.items():
        if name in stubbed:
            continue
        if name not in whole or len(whole[name]) != len(sums) or not all(map(_same, whole[name], sums)):
            return False
    return len(whole_out) == len(part_out) and all(
        a.shape == b.shape and _close(a, b) for a, b in zip(whole_out, part_out, strict=True))


def _close(a: Tensor, b: Tensor, chunk: int = 1 << 20) -> bool:
    """``allclose`` in float64, a million elements at a time (a language model's logits are vocabulary-wide: in
    float64 at once, several hundred MB for one sequence)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return all(torch.allclose(a[i:i + chunk].double(), b[i:i + chunk].double(), rtol=1e-5, atol=1e-6)
               for i in range(0, len(a), chunk))


class ActivationCache:
    """Inputs of one block of ``chain`` in ``model`` for every calibration batch (see the module doc)."""

    def __init__(self, model: nn.Module, chain: Chain, example_inputs, samples: int, limit_bytes: int):
        self.model, self.chain, self.example_inputs = model, chain, example_inputs
        self.samples, self.limit_bytes = samples, limit_bytes
        self.cut: int | None = None
        self.values: list[Tensor] = []
        self.batch = 0
        #: outputs, per batch, of the group's producers that read the cut block's own input (recorded with it);
        #: once the group's removal says which rows each keeps (:meth:`pruned`), the next pass that resumes at
        #: the cut takes them instead of running those producers again
        self._outputs: dict[str, list[Tensor]] = {}
        self._rows: dict[str, Tensor] = {}

    def plan(self, reads: Iterable[str], changes: Iterable[str] = ()) -> tuple[int | None, int | None]:
        """(block to resume at, block whose input to record) for a pass that must reach the modules ``reads``
        and after which the modules ``changes`` change; None for either when it cannot be done."""
        reads, changes = list(reads), list(changes)
        if not reads:
            return None, None
        first_read = min(self.chain.key(name) for name in reads)
        start = self.cut if self.cut is not None and self.cut <= first_read else None
        record = min(self.chain.key(name) for name in reads + changes)
        if (record < 1 or record >= len(self.chain) or (start is not None and record < start) or record == start
                or self.chain.bytes_per_sample(record) * self.samples > self.limit_bytes
                or not self.chain.usable(self.model, self.example_inputs, record)):
            record = None
        return start, record

    @contextmanager
    def resumed(self, start: int | None, record: int | None, producers: Iterable[str] = ()) -> Iterator[None]:
        """Passes within the block resume at ``start`` (for the batch :attr:`batch`) and record the input of
        block ``record``, and the outputs of those of the modules ``producers`` that read it (see
        :meth:`pruned`); once the block ends without an error, the recorded inputs are the cache."""
        recorded: list[Tensor] = []
        handles = []
        if record is not None:
            handles.append(self.chain.node(self.model, record).register_forward_pre_hook(
                lambda _module, args: recorded.append(args[0].detach().clone()), prepend=True))
        outputs = _Outputs(self.limit_bytes - self.chain.bytes_per_sample(record) * self.samples
                           if record is not None else 0)
        for name in producers if record is not None else ():
            module = self.model.get_submodule(name)
            if (self.chain.reads_block_input(name) == record and _channel_dim(module) is not None
                    and "forward" not in vars(module)):  # a module whose forward is already replaced: left alone
                handles.append(module.register_forward_hook(outputs.keeper(name)))
        stubs = self._stubs() if start is not None and start == self.cut else {}
        self._outputs, self._rows = {}, {}  # used by this pass or never
        values = self.values
        try:
            with _taking(stubs, lambda: self.batch):
                if start is None:
                    yield
                else:
                    with self.chain.resumed(self.model, start, lambda: values[self.batch].clone()):
                        yield
        finally:
            for handle in handles:
                handle.remove()
        if recorded:
            self.cut, self.values = record, recorded
            self._outputs = outputs.complete(len(recorded))

    def pruned(self, producers: Iterable[tuple[str, Tensor]]) -> None:
        """The group whose capture recorded producer outputs was removed: (producer, the output rows it keeps,
        ascending) for each. A producer whose input the removal left alone computes those rows of what it
        computed before, so the next pass that resumes at the cut takes them (checked on its first batch)."""
        self._rows = {name: rows for name, rows in producers if name in self._outputs}

    def _stubs(self) -> dict[nn.Module, tuple[list[Tensor], Tensor, int]]:
        modules = {name: self.model.get_submodule(name) for name in self._rows}
        return {modules[name]: (self._outputs[name], rows, _channel_dim(modules[name]))
                for name, rows in self._rows.items()}

    def drop(self) -> None:
        self.cut, self.values = None, []
        self._outputs, self._rows = {}, {}

    def changed(self, names: Iterable[str]) -> None:
        """Modules ``names`` changed: a change before the cut makes the kept inputs stale."""
        if self.cut is not None and any(self.chain.key(name) < self.cut for name in names):
            self.drop()


def _channel_dim(module: nn.Module) -> int | None:
    """The dimension of a Conv1d/Conv2d's or Linear's output that holds its output channels."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return 1
    return -1 if isinstance(module, nn.Linear) else None


class _Outputs:
    """A forward hook per module keeping a clone of each output, within ``limit_bytes`` in all."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes, self.bytes = limit_bytes, 0
        self.kept: dict[str, list[Tensor]] = {}

    def keeper(self, name: str):
        self.kept[name] = []

        def keep(_module, _args, output) -> None:
            if not isinstance(output, Tensor) or self.bytes + output.nelement() * output.element_size() > \
                    self.limit_bytes:
                self.kept[name] = None  # over the bound (or not one tensor): not kept at all
            elif self.kept[name] is not None:
                self.bytes += output.nelement() * output.element_size()
                self.kept[name].append(output.detach().clone())

        return keep

    def complete(self, batches: int) -> dict[str, list[Tensor]]:
        """The modules whose output was kept for every one of ``batches`` batches."""
        return {name: kept for name, kept in self.kept.items() if kept is not None and len(kept) == batches}


@contextmanager
def _taking(stubs: dict[nn.Module, tuple[list[Tensor], Tensor, int]], batch) -> Iterator[None]:
    """Within the block each module in ``stubs`` returns the kept rows of its recorded output for the batch
    ``batch()`` instead of running. On the first call each runs once more and its output is compared with
    the kept rows; if they differ (its input changed after all), it runs from then on."""
    real = {}

    def stub(module: nn.Module, outputs: list[Tensor], rows: Tensor, dim: int):
        checked, failed = [False], [False]

        def forward(*args, **kwargs):
            if failed[0]:
                return real[module](*args, **kwargs)
            kept = outputs[batch()].index_select(dim, rows.to(outputs[0].device))
            if not checked[0]:
                checked[0] = True
                computed = real[module](*args, **kwargs)
                scale = float(computed.detach().abs().max()) if computed.numel() else 0.0
                if computed.shape != kept.shape or not torch.allclose(computed, kept, rtol=1e-4,
                                                                       atol=1e-5 * scale + 1e-12):
                    failed[0] = True
                    return computed
            return kept

        return forward

    for module, (outputs, rows, dim) in stubs.items():
        real[module] = module.forward
        module.forward = stub(module, outputs, rows, dim)
    try:
        yield
    finally:
        for module in stubs:
            del module.forward


def state(model: nn.Module) -> dict[str, tuple]:
    """Each module's own parameters and buffers by identity, storage and shape (to tell which ones changed)."""
    return {name: tuple((id(t), t.data_ptr(), tuple(t.shape))
                        for t in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)))
            for name, module in model.named_modules()}


def changed_modules(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    return [name for name, entry in after.items() if before.get(name) != entry]
