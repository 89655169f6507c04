"""Save and load models, pruned or not, so that they load in a fresh process as they were.

A checkpoint is a dict saved with ``torch.save``:

* ``arch``: how to build the original model (a zoo name and its options);
* ``history``: Torch-Pruning's record of every channel removal, replayed on the rebuilt model;
* ``example_input``: shape and dtype of one input, to trace the rebuilt model for the replay;
* ``state_dict``: the weights of the pruned model.

Such a checkpoint holds only tensors and plain data and loads with ``weights_only=True``. A model
that is not from the zoo has no ``arch``; it is then stored whole (pickled), and loading it needs
its class importable under the same name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import StructPruneError

FORMAT = "structprune"
VERSION = 1


def write_atomic(path: str | os.PathLike, write, force: bool = False) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; never leaves a half-written ``path``.

    An existing ``path`` is an error unless ``force``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise StructPruneError(f"output {path} already exists; pass --force (force=True) to overwrite it")
    if path.is_dir():
        raise StructPruneError(f"output {path} is a directory, expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(model_or_result, path: str | os.PathLike, *, force: bool = False, extra: dict | None = None) -> Path:
    """Save a model (or a :class:`~structprune.PruneResult`'s model) to ``path``.

    ``extra`` is stored alongside (the CLI keeps its report there). Existing files are kept unless ``force``.
    A Hugging Face model is saved as a ``save_pretrained`` directory at ``path`` instead
    (:func:`structprune.models.hf_bert.save_pretrained`).
    """
    model = getattr(model_or_result, "model", model_or_result)
    if not isinstance(model, nn.Module):
        raise StructPruneError(f"save expects a model or a PruneResult, got {type(model_or_result).__name__}")
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        from .models import hf_bert

        return hf_bert.save_pretrained(model, path, force=force, extra=extra)
    checkpoint = pack(model, extra)
    return write_atomic(path, lambda tmp: torch.save(checkpoint, tmp), force=force)


def pack(model: nn.Module, extra: dict | None = None) -> dict:
    """The checkpoint dict of ``model`` (what :func:`save` writes; :func:`unpack` rebuilds it)."""
    arch = getattr(model, "structprune_arch", None)
    history = list(getattr(model, "structprune_history", []))
    example = getattr(model, "structprune_example_input", None)
    checkpoint = {"format": FORMAT, "version": VERSION, "arch": arch, "history": history,
                  "example_input": example, "extra": extra or {}}
    if arch is not None and (example is not None or not history):
        checkpoint["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        checkpoint["module"] = model  # not rebuildable from the zoo: store the module itself
    return checkpoint


def read(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict, with clear errors for missing, corrupted or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise StructPruneError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            raise StructPruneError(f"checkpoint {path} is not readable (truncated or corrupted?): "
                                   f"{str(safe_error).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise StructPruneError(f"checkpoint {path} was not written by structprune "
                               f"(save it with structprune.save or `structprune train`)")
    if checkpoint.get("version", 0) > VERSION:
        raise StructPruneError(f"checkpoint {path} has format version {checkpoint['version']}; "
                               f"this structprune reads up to {VERSION}: upgrade structprune")
    return checkpoint


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the saved model, pruned structure included, in eval mode.

    >>> import structprune  # doctest: +SKIP
    >>> model = structprune.load("lenet5-ispasp.pt")  # doctest: +SKIP

    A directory is read as a Hugging Face model (:func:`structprune.models.hf_bert.load_pretrained`).
    """
    if Path(path).is_dir():
        from .models import hf_bert

        return hf_bert.load_pretrained(path).to(map_location)
    return unpack(read(path), str(path)).to(map_location).eval()


def unpack(checkpoint: dict, source: str = "checkpoint") -> nn.Module:
    """The model of a checkpoint dict (see :func:`pack`), on the CPU."""
    if "module" in checkpoint:
        model = checkpoint["module"]
    else:
        model = rebuild(checkpoint)
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as exc:
            raise StructPruneError(f"{source}: weights do not fit the rebuilt model: "
                                   f"{str(exc).splitlines()[0]}") from None
    model.structprune_history = list(checkpoint.get("history", []))
    model.structprune_example_input = checkpoint.get("example_input")
    return model


def rebuild(checkpoint: dict) -> nn.Module:
    """The model of ``checkpoint`` with random weights: the zoo architecture with the pruning replayed."""
    from . import models
    from .graph import PruningGraph

    arch = checkpoint["arch"]
    model = models.create(arch["name"], **arch["kwargs"])
    history = checkpoint.get("history") or []
    if history:
        spec = checkpoint["example_input"]
        example = torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
        PruningGraph(model, example).replay(history)
    return model


def example_input(model: nn.Module) -> torch.Tensor | None:
    """A zero tensor shaped like the model's recorded input (None when unknown)."""
    spec = getattr(model, "structprune_example_input", None)
    if not spec:
        return None
    return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
