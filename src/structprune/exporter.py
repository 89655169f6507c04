"""Export a (pruned) model for deployment, ONNX or TorchScript, and check the exported file against PyTorch.

>>> import structprune  # doctest: +SKIP
>>> structprune.export("resnet20-ispasp.pt", "resnet20-ispasp.onnx")  # doctest: +SKIP

The exported model takes the same inputs as the PyTorch one, with a dynamic batch axis (and a dynamic
sequence axis for token inputs). After writing, the file is run on a fresh random batch of another size than
the one it was exported with (so the dynamic axes are exercised) and its outputs are compared with PyTorch's:
ONNX with ONNX Runtime when it is installed (``pip install 'structprune[onnx]'``), TorchScript by loading the
written archive. A larger difference than ``atol`` is an error and nothing is written. The file records
where it came from and the source model's size (params, MACs) as JSON metadata, which ``structprune eval``
reads back.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import allocate
from .checkpoint import example_input, load
from .errors import StructPruneError, first_line, strip_ansi
from .measure import count, output_sizes, time_call
from .safe_io import check_output, write_atomic
from .version import __version__

FORMATS = ("onnx", "torchscript")
#: file suffixes that name a format when ``format`` is not given
SUFFIXES = {".onnx": "onnx", ".ts": "torchscript", ".torchscript": "torchscript", ".jit": "torchscript"}
METADATA_KEY = "structprune"  # ONNX metadata_props key / TorchScript extra file name (.json)
TOKENS = 128  # the example sequence length of a language model without a recorded example


@dataclass
class ExportResult:
    """What :func:`export` wrote and how it was checked."""

    path: Path
    format: str
    inputs: list[str]
    outputs: list[str]
    opset: int | None  # ONNX only
    checked_with: str | None  # "onnxruntime", "torchscript", or None when not checked
    max_abs_diff: float | None
    atol: float
    seconds: float
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def export(model, out: str | os.PathLike, format: str | None = None, example_inputs=None, *, opset: int | None = None,
           check: bool = True, atol: float = 1e-4, force: bool = False, trust_checkpoint: bool = False,
           seed: int = 0, source: str | None = None) -> ExportResult:
    """Write ``model`` (an ``nn.Module``, a :class:`~structprune.PruneResult`, or the path of a checkpoint or of
    a Hugging Face model directory) to ``out`` as ONNX or TorchScript.

    format: ``"onnx"`` or ``"torchscript"``; default from ``out``'s suffix (``.onnx``; ``.ts``/``.torchscript``
        /``.jit``), else ``"onnx"``.
    example_inputs: one batch of inputs (a tensor or a dict of keyword tensors); default: the input shape the
        checkpoint records, or 128 tokens for a Hugging Face model.
    opset: the ONNX opset; default: the exporter's own (``torch.onnx``'s default for this torch), capped at the
        newest the installed ``onnx`` knows.
    check: compare the written file's outputs with PyTorch's on a random batch (``atol``, max abs difference).
    source: what the file's metadata names as its origin (default: the path, or the model's class).
    """
    start = time.perf_counter()
    if source is None:
        source = str(model) if isinstance(model, (str, os.PathLike)) else type(getattr(model, "model", model)).__name__
    model = _as_module(model, trust_checkpoint)
    was_training = model.training
    try:
        return _export(model.eval(), Path(out), format, example_inputs, opset, check, atol, force, seed, source,
                       start)
    finally:
        model.train(was_training)


def _export(model: nn.Module, out: Path, format, example_inputs, opset, check, atol, force, seed, source,
            start) -> ExportResult:
    format = _format(format, out)
    check_output(out, force, what="out:")
    if atol <= 0:
        raise StructPruneError(f"atol must be > 0, got {atol}")
    example = _example(model, example_inputs)
    if format == "onnx":
        _warn_if_unaligned(model, example)
    names, args = _positional(example)
    wrapper = _TensorOutputs(model, names).eval()
    device = next(model.parameters(), torch.empty(0)).device
    with torch.no_grad():
        output_names = [name for name, _ in _named_outputs(wrapper.raw(*args))]
    size = count(model, example)
    metadata = {"source": source, "format": format, "inputs": _input_specs(names, args), "outputs": output_names,
                **size, "structprune_version": __version__, "torch_version": torch.__version__}
    check_inputs = _check_batch(model, names, args, seed)
    result = ExportResult(out, format, names, output_names, None, None, None, atol, 0.0, metadata)

    def write(tmp: str) -> None:
        if format == "onnx":
            result.opset = _write_onnx(wrapper, args, names, output_names, tmp, opset, metadata)
        else:
            _write_torchscript(wrapper, args, tmp, metadata)
        if check:
            expected = _flat(wrapper(*check_inputs))
            got, result.checked_with = _run_exported(tmp, format, names, check_inputs, device)
            if result.checked_with is not None:
                shapes = [(tuple(e.shape), tuple(g.shape)) for e, g in zip(expected, got, strict=True)]
                if any(a != b for a, b in shapes):
                    raise StructPruneError(f"the exported {format} model's outputs have shapes "
                                           f"{[b for _, b in shapes]} where PyTorch's have {[a for a, _ in shapes]} "
                                           f"on a random batch; nothing was written")
                result.max_abs_diff = max(float((e.cpu().float() - g.float()).abs().max()) if e.numel() else 0.0
                                          for e, g in zip(expected, got, strict=True))
                if not result.max_abs_diff <= atol:
                    raise StructPruneError(
                        f"the exported {format} model's outputs differ from PyTorch's by {result.max_abs_diff:.3g} "
                        f"(more than atol={atol:g}) on a random batch; nothing was written")
        result.metadata["check"] = {"checked_with": result.checked_with, "max_abs_diff": result.max_abs_diff,
                                    "atol": atol, "batch": int(check_inputs[0].shape[0])}

    with torch.no_grad():
        write_atomic(out, write, force=force)
    result.seconds = time.perf_counter() - start
    return result


#: the share of a pruned model's convolution MACs in widths off the CPU's block above which an ONNX export warns:
#: ResNet-20 at half the MACs with the defaults keeps one of 21 convolutions at 7 outputs (about 5% of the MACs)
#: and runs ×1.94 faster than dense in ONNX Runtime against ×2.03 with every group in multiples of 8; with every
#: width as it falls (more than a tenth) ×1.60, MobileNetV2 ×1.00 against ×2.05 (benchmarks/export.py,
#: 2026-12-03, AVX2)
UNALIGNED_SHARE = 0.1


def _warn_if_unaligned(model: nn.Module, example) -> None:
    """A pruned model whose convolutions keep widths off ONNX Runtime's blocks (this CPU's
    :func:`~structprune.allocate.cpu_multiple`: benchmarks/README.md, export.py and conv_widths.py) can be no
    faster there than the dense one: where the user chose the widths (a keep ratio, an explicit round_to; not a
    size target with round_to="auto", whose widths are as aligned as the target allows) and such convolutions hold
    more than :data:`UNALIGNED_SHARE` of the convolutions' MACs on ``example``, say so, and how to prune instead."""
    if not getattr(model, "structprune_history", None) or getattr(model, "structprune_widths", "given") == "auto":
        return  # not pruned by structprune (its widths are the architect's), or widths structprune chose
    aligned = allocate.HARDWARE_MULTIPLE["cpu"]
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    odd = [name for name, m in convs.items() if m.out_channels % aligned]
    if not odd:
        return
    positions = {name: size["positions"] for name, size in output_sizes(model, example).items()}
    macs = {name: m.weight.numel() * positions.get(name, 0) for name, m in convs.items()}
    share = sum(macs[name] for name in odd) / max(sum(macs.values()), 1)
    if share > UNALIGNED_SHARE:
        warnings.warn(f"structprune: {len(odd)} of {len(convs)} convolutions ({share:.0%} of their MACs) keep widths "
                      f"that are not multiples of {aligned}, which ONNX Runtime runs little faster than the dense "
                      f"ones; prune with --round-to {aligned} (round_to={aligned}), or to a --target-flops, which "
                      f"rounds by default", stacklevel=4)


def _as_module(model, trust_checkpoint: bool) -> nn.Module:
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).exists():
            raise StructPruneError(f"model {model} does not exist")
        return load(model, trust_checkpoint=trust_checkpoint)
    model = getattr(model, "model", model)  # a PruneResult
    if not isinstance(model, nn.Module):
        raise StructPruneError(f"model must be an nn.Module, a PruneResult or a checkpoint path, "
                               f"got {type(model).__name__}")
    return model


def _format(format: str | None, out: Path) -> str:
    if format is None:
        return SUFFIXES.get(out.suffix.lower(), "onnx")
    if format not in FORMATS:
        raise StructPruneError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    return format


def _example(model: nn.Module, example_inputs):
    if example_inputs is not None:
        if not isinstance(example_inputs, (Tensor, dict)):
            raise StructPruneError(f"example_inputs must be a tensor or a dict of tensors, got "
                                   f"{type(example_inputs).__name__}")
        return example_inputs
    recorded = example_input(model)
    if recorded is not None:
        return recorded.to(next(model.parameters()).device)
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None) is not None:  # a Hugging Face language model: a batch of tokens
        device = next(model.parameters()).device
        length = min(TOKENS, getattr(config, "max_position_embeddings", TOKENS) or TOKENS)
        return {"input_ids": torch.zeros(1, length, dtype=torch.long, device=device),
                "attention_mask": torch.ones(1, length, dtype=torch.long, device=device)}
    raise StructPruneError("the model does not record its input shape: pass example_inputs (one batch of inputs)")


def _positional(example) -> tuple[list[str], tuple[Tensor, ...]]:
    """Input names and tensors, in order; two samples, so that the batch axis is not specialised to 1."""
    items = list(example.items()) if isinstance(example, dict) else [("input", example)]
    for name, value in items:
        if not isinstance(value, Tensor):
            raise StructPruneError(f"example input {name!r} is a {type(value).__name__}, not a tensor")
    return [n for n, _ in items], tuple(torch.cat([v[:1], v[:1]]) for _, v in items)


class _TensorOutputs(nn.Module):
    """The model with positional tensor inputs and a flat tuple of tensor outputs (what both exporters want)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def raw(self, *args: Tensor):
        """The model's own outputs."""
        if self.names == ["input"]:
            return self.model(args[0])
        return self.model(**dict(zip(self.names, args, strict=True)))

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        return tuple(t for _, t in _named_outputs(self.raw(*args)))


def _named_outputs(outputs) -> list[tuple[str, Tensor]]:
    if isinstance(outputs, Tensor):
        return [("output", outputs)]
    if isinstance(outputs, dict):  # transformers' ModelOutput is a dict of its non-None fields
        items = [(k, v) for k, v in outputs.items() if isinstance(v, Tensor)]
    elif isinstance(outputs, (tuple, list)):
        items = [(f"output_{i}", v) for i, v in enumerate(outputs) if isinstance(v, Tensor)]
    else:
        items = []
    if not items:
        raise StructPruneError(f"the model returns {type(outputs).__name__}, with no tensor to export")
    return items


def _flat(outputs) -> list[Tensor]:
    return [outputs] if isinstance(outputs, Tensor) else list(outputs)


def _dynamic_axes(names: list[str], args: tuple[Tensor, ...]) -> dict[str, dict[int, str]]:
    """Batch axis for every input; a sequence axis too for token inputs (integer, 2-d)."""
    return {n: ({0: "batch", 1: "sequence"} if a.dim() == 2 and not a.is_floating_point() else {0: "batch"})
            for n, a in zip(names, args, strict=True)}


def _write_onnx(wrapper: nn.Module, args, names, output_names, path: str, opset: int | None, metadata: dict) -> int:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise StructPruneError(f"ONNX export needs the onnx and onnxscript packages ({exc.name} is missing): "
                               f"pip install 'structprune[onnx]'") from None
    from torch.onnx._constants import ONNX_DEFAULT_OPSET

    opset = opset if opset is not None else min(ONNX_DEFAULT_OPSET, onnx.defs.onnx_opset_version())
    axes = _dynamic_axes(names, args)
    shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in axes[n]} for n in names)
    quiet = logging.getLogger("torch.onnx"), logging.getLogger("torch._export")
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), _quiet_warnings():
            program = torch.onnx.export(wrapper, args, None, input_names=names, output_names=output_names,
                                        opset_version=opset, dynamo=True, dynamic_shapes=(shapes,), verbose=False)
    except Exception as exc:
        raise StructPruneError(f"ONNX export failed: {_exporter_reason(exc)}") from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    if proto.ByteSize() >= 2**31 - 2**20:
        raise StructPruneError("the model is larger than ONNX's 2 GiB single-file limit; export it as TorchScript")
    onnx.save_model(proto, path)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _exporter_reason(exc: Exception) -> str:
    """The line of torch.onnx's long report that says what went wrong."""
    lines = strip_ansi(str(exc)).splitlines()
    if "## Exception summary" in lines:
        summary = [line for line in lines[lines.index("## Exception summary") + 1:] if line.strip()]
        if summary:
            return summary[0].split(">: ", 1)[-1]
    return first_line(exc)


def _write_torchscript(wrapper: nn.Module, args, path: str, metadata: dict) -> None:
    try:
        with _quiet_warnings():
            traced = torch.jit.trace(wrapper, args, check_trace=False, strict=False)
    except Exception as exc:
        raise StructPruneError(f"TorchScript export (torch.jit.trace) failed: {first_line(exc)}") from None
    with _quiet_warnings():  # torch 2.13 deprecates TorchScript in favour of torch.export; it still runs it
        torch.jit.save(traced, path, _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


@contextlib.contextmanager
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter notes about Python values; the check judges
        yield


def _check_batch(model: nn.Module, names, args, seed: int) -> tuple[Tensor, ...]:
    """A random batch of 3 (not the export's 2), token sequences 3/4 as long (when the axis is dynamic): normal
    floats, token ids below the vocabulary size, masks with some padding."""
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    axes = _dynamic_axes(names, args)
    batch = []
    for name, arg in zip(names, args, strict=True):
        shape = [3, *arg.shape[1:]]
        if 1 in axes[name] and shape[1] > 3:
            shape[1] -= shape[1] // 4
        if arg.is_floating_point():
            value = torch.randn(shape, generator=gen, dtype=torch.float32).to(arg.dtype)
        elif "mask" in name:
            value = torch.ones(shape, dtype=arg.dtype)
            if value.dim() == 2 and value.shape[1] > 1:
                value[1, value.shape[1] // 2:] = 0  # one padded sentence
        elif "type" in name:  # token_type_ids
            value = torch.zeros(shape, dtype=arg.dtype)
        else:
            value = torch.randint(0, int(vocab), shape, generator=gen, dtype=arg.dtype)
        batch.append(value.to(arg.device))
    return tuple(batch)


def _run_exported(path: str, format: str, names, inputs, device) -> tuple[list[Tensor], str | None]:
    if format == "torchscript":
        with _quiet_warnings():
            loaded = torch.jit.load(path, map_location=device)
        return _flat(loaded(*inputs)), "torchscript"
    if not has_onnxruntime():
        warnings.warn("structprune: ONNX Runtime is not installed, so the exported model's outputs were not "
                      "compared with PyTorch's (pip install 'structprune[onnx]')", stacklevel=3)
        return [], None
    session = onnx_session(path)
    outputs = session.run(None, {n: v.cpu().numpy() for n, v in zip(names, inputs, strict=True)})
    return [torch.from_numpy(o) for o in outputs], "onnxruntime"


def has_onnxruntime() -> bool:
    """Whether ONNX Runtime (the ``[onnx]`` extra) can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_session(path: str | os.PathLike):
    """An ONNX Runtime CPU inference session on ``path``."""
    try:
        import onnxruntime
    except ImportError:
        raise StructPruneError("running an ONNX file needs ONNX Runtime: pip install 'structprune[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch, for fair latencies
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise StructPruneError(f"{path}: ONNX Runtime cannot load it ({first_line(exc)})") from None


def _input_specs(names, args) -> list[dict]:
    return [{"name": n, "shape": [1, *a.shape[1:]], "dtype": str(a.dtype).replace("torch.", "")}
            for n, a in zip(names, args, strict=True)]


# -- reading an exported file back (structprune eval) ------------------------------------------------------------

def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (by suffix) rather than a checkpoint."""
    return Path(path).suffix.lower() in SUFFIXES


class ExportedModel(nn.Module):
    """An exported file run like a PyTorch model (CPU): ``model(x)`` or ``model(**inputs)`` returns tensors.

    ``metadata`` is what :func:`export` recorded (source, params, MACs, inputs); ``runtime`` says what runs it.
    """

    def __init__(self, path: str | os.PathLike, *, trust_checkpoint: bool = False) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise StructPruneError(f"{path} does not exist")
        self.path, self.format = path, SUFFIXES[path.suffix.lower()]
        if self.format == "onnx":
            self.session = onnx_session(path)
            self.input_names = [i.name for i in self.session.get_inputs()]
            meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
            self.runtime = "onnxruntime"
        else:
            if not trust_checkpoint:
                raise StructPruneError(f"{path}: a TorchScript file is a program that runs when loaded; load it "
                                       f"only from a source you trust, with --trust-checkpoint "
                                       f"(trust_checkpoint=True)")
            extra = {f"{METADATA_KEY}.json": ""}
            try:
                with _quiet_warnings():
                    self.module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            except Exception as exc:
                raise StructPruneError(f"{path}: not a TorchScript archive ({first_line(exc)})") from None
            meta = extra[f"{METADATA_KEY}.json"] or None
            self.runtime = "torchscript"
        try:
            self.metadata = json.loads(meta) if meta else {}
        except ValueError:
            self.metadata = {}
        if self.format == "torchscript":
            self.input_names = [i["name"] for i in self.metadata.get("inputs", [])] or ["input"]

    def example_input(self) -> Tensor | None:
        """A zero tensor shaped like the recorded (single) input, or None."""
        specs = self.metadata.get("inputs") or []
        if len(specs) != 1:
            return None
        return torch.zeros(specs[0]["shape"], dtype=getattr(torch, specs[0]["dtype"]))

    def forward(self, *args: Tensor, **kwargs: Tensor):
        values = list(args) + [kwargs[n] for n in self.input_names[len(args):]]
        if self.format == "onnx":
            feeds = {n: v.detach().cpu().numpy() for n, v in zip(self.input_names, values, strict=True)}
            outputs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        else:
            outputs = _flat(self.module(*[v.cpu() for v in values]))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def latency_stats(self, example_inputs: Tensor, **kwargs) -> dict:
        """Median and IQR (ms) of one call on ``example_inputs``, timed like PyTorch models are."""
        if self.format == "onnx":
            feeds = {self.input_names[0]: example_inputs.detach().cpu().numpy()}
            return time_call(lambda: self.session.run(None, feeds), **kwargs)
        with torch.no_grad():
            return time_call(lambda: self.module(example_inputs.cpu()), **kwargs)
