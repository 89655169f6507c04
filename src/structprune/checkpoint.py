"""Save and load models, pruned or not, so that they load in a fresh process as they were.

A checkpoint is tensors plus JSON, written with ``torch.save`` and read with ``weights_only=True``
only, so that opening a file never runs code from it:

* ``meta``: a JSON string with ``arch`` (how to build the original model: a zoo name, or an importable
  ``module:qualname`` of an ``nn.Module`` class, and its keyword options), ``history`` (Torch-Pruning's
  record of every channel removal, replayed on the rebuilt model), ``example_input`` (shape and dtype of
  one input, to trace the rebuilt model for the replay), ``widths`` (who chose the pruned widths: "auto",
  structprune for a size target, or "given") and ``extra`` (the CLI's report and the data it ran on);
* ``state_dict``: the weights of the pruned model;
* ``digest``: SHA-256 of the meta string and every tensor's bytes. A file damaged on disk or in transit
  is refused instead of loading other weights than were saved.

Models are rebuilt by calling their constructor, never by unpickling a module. A constructor named by
a file is only called when it is an ``nn.Module`` class, a zoo name, or a model that torchvision's or timm's
registry builds by name (``"torchvision:resnet18"``); any other callable, a function of those libraries included,
needs ``trust_checkpoint=True``, since calling what a file names with arguments the file chooses can run any
code. Checkpoints of structprune 0.1 that stored a pickled model (models from outside the
zoo) are refused unless ``trust_checkpoint=True``; ``structprune convert --trust-checkpoint OLD NEW``
rewrites one once in this format.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from . import models
from .errors import StructPruneError, first_line
from .graph import PruningGraph
from .models import hf
from .safe_io import load_tensors, write_atomic

FORMAT = "structprune"
VERSION = 2


def save(model_or_result, path: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> Path:
    """Save a model (or a :class:`~structprune.PruneResult`'s model) to ``path``.

    ``extra`` is stored alongside (the CLI keeps its report there). Existing files are kept unless ``force``.
    A Hugging Face model is saved as a ``save_pretrained`` directory at ``path`` instead
    (:func:`structprune.models.hf.save_pretrained`).

    A model from outside the zoo is rebuilt at load time by calling its class: either it records how
    (``model.structprune_arch = {"import": "mypkg.nets:MyNet", "kwargs": {...}}``, as
    :func:`structprune.models.create` does for ``"mypkg.nets:MyNet"``), or its class takes no required
    arguments and rebuilds the same structure, which is checked here.
    """
    model = getattr(model_or_result, "model", model_or_result)
    if not isinstance(model, nn.Module):
        raise StructPruneError(f"save expects a model or a PruneResult, got {type(model_or_result).__name__}")
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        return hf.save_pretrained(model, path, force=force, extra=extra)
    checkpoint = pack(model, extra)
    return write_atomic(path, lambda tmp: torch.save(checkpoint, tmp), force=force)


def pack(model: nn.Module, extra: dict | None = None) -> dict:
    """The checkpoint dict of ``model`` (what :func:`save` writes; :func:`unpack` rebuilds it)."""
    history = [list(entry) for entry in getattr(model, "structprune_history", [])]
    example = getattr(model, "structprune_example_input", None)
    if history and example is None:
        raise StructPruneError(f"cannot save this pruned {type(model).__name__}: its input shape was not recorded "
                               f"(structprune records one tensor input), so the pruning cannot be replayed on load")
    arch = getattr(model, "structprune_arch", None) or _derived_arch(model, history, example)
    meta = json.dumps({"arch": arch, "history": history, "example_input": example, "extra": extra or {},
                       "widths": getattr(model, "structprune_widths", None)}, default=str, allow_nan=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "version": VERSION, "meta": meta, "state_dict": state, "digest": digest(meta, state)}


def digest(meta: str, state: dict) -> str:
    """SHA-256 of the meta string and of every tensor (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256(meta.encode())
    for name in sorted(state):
        tensor = state[name]
        h.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _derived_arch(model: nn.Module, history: list, example) -> dict:
    """An import spec for a model of a class that rebuilds with no arguments, checked by rebuilding it."""
    cls = type(model)
    spec = f"{cls.__module__}:{cls.__qualname__}"
    how = ("build it with structprune.models.create('mypkg.module:Class', **kwargs), or set "
           "model.structprune_arch = {'import': 'mypkg.module:Class', 'kwargs': {...}} before saving")
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise StructPruneError(f"cannot save a {cls.__qualname__}: its class is defined in a script or a function, "
                               f"so a fresh process cannot import it to rebuild the model; move it into a module "
                               f"and {how}")
    required = [p.name for p in inspect.signature(cls).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise StructPruneError(f"cannot save a {spec}: structprune rebuilds a model by calling its class, and "
                               f"{cls.__qualname__} needs {', '.join(required)}; {how}")
    arch = {"import": spec, "kwargs": {}}
    try:
        fresh = rebuild({"arch": arch, "history": history, "example_input": example}, trust=True)
    except StructPruneError:
        raise
    except Exception as exc:
        raise StructPruneError(f"cannot save a {spec}: rebuilding it as {spec}() failed ({first_line(exc)}); "
                               f"{how}") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in fresh.state_dict().items()} != shapes:
        raise StructPruneError(f"cannot save a {spec}: {spec}() builds another structure than this model's; {how}")
    return arch


def read(path: str | os.PathLike, trust_checkpoint: bool = False) -> dict:
    """The checkpoint as a dict (``arch``, ``history``, ``example_input``, ``extra``, ``state_dict``), checked.

    Raises :class:`StructPruneError` for a missing, damaged, foreign or newer file, and for a file that
    holds pickled code unless ``trust_checkpoint``.
    """
    path = Path(path)
    if not path.exists():
        raise StructPruneError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise StructPruneError(f"checkpoint {path} is not a file")
    return unwrap(load_tensors(path, trust_checkpoint), path)


def unwrap(raw, path: str | os.PathLike) -> dict:
    """The checked checkpoint dict of what ``torch.load`` read from ``path`` (see :func:`read`)."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StructPruneError(f"checkpoint {path} was not written by structprune "
                               f"(save it with structprune.save or `structprune train`)")
    version = raw.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise StructPruneError(f"checkpoint {path} has format version {version!r}; "
                               f"this structprune reads up to {VERSION}: upgrade structprune")
    if version >= 2:
        return _checked(raw, path)
    if not isinstance(raw.get("state_dict"), dict) and not isinstance(raw.get("module"), nn.Module):
        raise StructPruneError(f"checkpoint {path} is damaged: it holds neither weights nor a model")
    return {k: raw.get(k) for k in ("arch", "history", "example_input", "extra", "state_dict", "module")}


def _checked(raw: dict, path: Path) -> dict:
    meta, state, expected = raw.get("meta"), raw.get("state_dict"), raw.get("digest")
    if not isinstance(meta, str) or not isinstance(state, dict) or not isinstance(expected, str) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise StructPruneError(f"checkpoint {path} is damaged: its parts are missing or of the wrong type")
    if digest(meta, state) != expected:
        raise StructPruneError(f"checkpoint {path} is damaged: its contents do not match the checksum written "
                               f"with it (corrupted on disk or in transfer?)")
    try:
        parsed = json.loads(meta)
    except ValueError as exc:
        raise StructPruneError(f"checkpoint {path} is damaged: its metadata is not JSON ({exc})") from None
    return {**parsed, "state_dict": state}


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
         trust_checkpoint: bool = False) -> nn.Module:
    """Rebuild the saved model, pruned structure included, in eval mode.

    >>> import structprune  # doctest: +SKIP
    >>> model = structprune.load("lenet5-ispasp.pt")  # doctest: +SKIP

    A directory is read as a Hugging Face model (:func:`structprune.models.hf.load_pretrained`).
    ``trust_checkpoint``: allow a file that holds pickled code (an old checkpoint) or names a constructor
    that is not an ``nn.Module`` class; only for files from a source you trust.
    """
    if Path(path).is_dir():
        return hf.load_pretrained(path, trust_checkpoint=trust_checkpoint).to(map_location)
    return unpack(read(path, trust_checkpoint), str(path), trust_checkpoint).to(map_location).eval()


def unpack(checkpoint: dict, source: str = "checkpoint", trust_checkpoint: bool = False) -> nn.Module:
    """The model of a checkpoint dict (see :func:`read`), on the CPU."""
    if checkpoint.get("module") is not None:  # structprune 0.1, read with trust_checkpoint
        model = checkpoint["module"]
        if not isinstance(model, nn.Module):
            raise StructPruneError(f"{source}: the stored model is a {type(model).__name__}, not an nn.Module")
    else:
        if not isinstance(checkpoint.get("arch"), dict):
            raise StructPruneError(f"{source}: the checkpoint does not say how to build its model (no arch)")
        try:
            model = rebuild(checkpoint, trust=trust_checkpoint)
        except StructPruneError as exc:
            raise StructPruneError(f"{source}: {exc}") from None
        except Exception as exc:
            raise StructPruneError(f"{source}: the model could not be rebuilt ({first_line(exc)})") from None
        mismatch = models.weights_mismatch(model, checkpoint["state_dict"])
        if mismatch:
            raise StructPruneError(f"{source}: weights do not fit the rebuilt model: {mismatch}")
        model.load_state_dict(checkpoint["state_dict"])
    model.structprune_history = list(checkpoint.get("history") or [])
    model.structprune_example_input = checkpoint.get("example_input")
    if checkpoint.get("widths") is not None:  # who chose the pruned widths (structprune.pipeline.report)
        model.structprune_widths = checkpoint["widths"]
    return model


def rebuild(checkpoint: dict, trust: bool = False) -> nn.Module:
    """The model of ``checkpoint`` with random weights: the architecture with the pruning replayed."""
    arch = checkpoint["arch"]
    kwargs = arch.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise StructPruneError(f"arch kwargs must be a dict, got {type(kwargs).__name__}")
    if "import" in arch:
        model = models.create(arch["import"], trusted=trust, **kwargs)
    elif "name" in arch:  # a zoo name or a registry's ("torchvision:resnet18"); never a callable the file picks
        model = models.create(arch["name"], trusted=trust, **kwargs)
    else:
        raise StructPruneError(f"arch names neither a zoo model nor an import: {arch!r}")
    history = checkpoint.get("history") or []
    if history:
        spec = checkpoint.get("example_input") or {}
        dtype = getattr(torch, str(spec.get("dtype", "")), None)
        if not isinstance(dtype, torch.dtype) or not isinstance(spec.get("shape"), list):
            raise StructPruneError(f"the recorded input {spec!r} is not a shape and a dtype")
        example = torch.zeros(spec["shape"], dtype=dtype)
        PruningGraph(model, example).replay(history)
    return model


def example_input(model: nn.Module) -> torch.Tensor | None:
    """A zero tensor shaped like the model's recorded input (None when unknown)."""
    spec = getattr(model, "structprune_example_input", None)
    if not spec:
        return None
    return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))

