"""Hugging Face transformers: save and load of pruned models (their families' layouts are data in
:mod:`structprune.attention`, which prunes every family the same way: whole heads, whole key/value groups for
grouped-query attention, whole FFN neurons; head counts rewritten).

After pruning, the per-block sizes are written to the config (``structprune_layers``), so that
:func:`load_pretrained` (and :func:`structprune.load`) rebuilds the pruned model in a fresh process; where
every layer keeps the same sizes and the family's config can say so (FFN width; head count where the config
has a head size, as Llama's and ViT's), the config's own fields are set too, so that transformers'
``from_pretrained`` loads it as well. transformers 5 dropped ``pruned_heads``, so its own loader cannot
build layers of different sizes.

transformers is an optional dependency (``pip install 'structprune[transformers]'``); it is only imported to
save and load.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import attention
from ..attention import (  # noqa: F401  (is_supported, part_names, sync_config: this module's API too)
    CONFIG_KEY,
    is_supported,
    layer_sizes,
    part_names,
    sync_config,
)
from ..errors import StructPruneError, first_line
from ..measure import is_causal_lm  # noqa: F401  (this module's API too)
from ..safe_io import as_umask_allows, load_tensors, refuse_non_model_directory

PARTS = attention.PARTS

def resize(model: nn.Module, sizes) -> None:
    """Give a freshly built model the recorded block sizes (then its weights are loaded). Also reads the
    per-layer list structprune 0.2 wrote for BERT-family models."""
    if isinstance(sizes, list):
        blocks = attention.find_blocks(model)
        if not len(sizes) == len(blocks[0]) == len(blocks[1]):
            raise StructPruneError(f"{CONFIG_KEY} lists {len(sizes)} layers but the model has {len(blocks[0])}")
        sizes = {**{b.name: {"kv_heads": int(s["num_attention_heads"]), "head_dim": b.head_dim}
                    for b, s in zip(blocks[0], sizes, strict=True)},
                 **{b.name: {"neurons": int(s["intermediate_size"])} for b, s in zip(blocks[1], sizes, strict=True)}}
    if not isinstance(sizes, dict):
        raise StructPruneError(f"{CONFIG_KEY} must map block names to sizes, got {type(sizes).__name__}")
    attention.resize(model, sizes)


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
    sync_config(model)
    _check_config_describes(model)
    path = Path(path)
    if path.exists() and not force:
        raise StructPruneError(f"output {path} already exists; pass --force (force=True) to overwrite it")
    refuse_non_model_directory(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        # the weights under the model's own names: transformers 5 would otherwise write some families (ViT) in an
        # older layout whose names it converts back only in its own loader; its loader reads these as they are
        own_names = {"save_original_format": False} if "save_original_format" in inspect.signature(
            model.save_pretrained).parameters else {}
        model.save_pretrained(tmp, **own_names)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra:
            (tmp / "structprune.json").write_text(json.dumps(extra, indent=2, default=str))
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_config_describes(model: nn.Module) -> None:
    """Refuse a model whose config (and recorded block sizes) would rebuild other shapes than its weights have:
    layers pruned outside the blocks a layout describes (T5's FFN, through the generic graph) would be saved as a
    directory that loads nowhere. The check builds the config's model on the meta device (no memory, no init)."""
    with torch.device("meta"):
        fresh = type(model)._from_config(copy.deepcopy(model.config))
    sizes = getattr(model.config, CONFIG_KEY, None)
    if sizes:
        resize(fresh, sizes)
    expected = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    for name, tensor in model.state_dict().items():
        if name in expected and expected[name] != tuple(tensor.shape):
            raise StructPruneError(
                f"{type(model).__name__} cannot be saved as a save_pretrained directory: {name} is "
                f"{tuple(tensor.shape)} but its config builds {expected[name]}, because structprune describes no "
                f"attention/FFN layout for this family (structprune.attention.register) and the config cannot "
                f"record what was pruned; export it (structprune.export, ONNX) or prune only described families")


def load_pretrained(path: str | os.PathLike, model_class=None, *, trust_checkpoint: bool = False,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Load a Hugging Face model directory, pruned by structprune or not, in eval mode (built in ``dtype``, by
    default the one its config records, as transformers does).

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
        model_class = getattr(transformers, str(names[0]), None) if names else transformers.AutoModel
        # the file names it: only a model class of transformers' own is called, never any other of its callables
        if not (isinstance(model_class, type) and (issubclass(model_class, transformers.PreTrainedModel)
                                                   or model_class is transformers.AutoModel)):
            raise StructPruneError(f"{path}: transformers has no model class {names[0]!r}; pass model_class")
    # read here, never by transformers' own (pickle) loader; safetensors one tensor at a time, each copied into the
    # model as it is read: the weights are held once (a 7B model in bfloat16 needs 14 GB, not 28)
    state = _weight_sources(path, trust_checkpoint)
    with _no_init(transformers):  # every weight is overwritten: no random initialisation (minutes at 1B)
        if hasattr(model_class, "_from_config"):
            model = model_class._from_config(config, **({} if dtype is None else {"dtype": dtype}))
        else:
            model = model_class(config)
            if dtype is not None:
                model.to(dtype)
        if sizes:
            resize(model, sizes)
    _load_weights(model, state, path)
    return model.eval()


def _no_init(transformers):
    """transformers' own context that skips weight initialisation (as its ``from_pretrained`` does)."""
    for where in ("initialization", "modeling_utils"):  # transformers 5, 4
        skip = getattr(getattr(transformers, where, None), "no_init_weights", None)
        if skip is not None:
            return skip()
    return contextlib.nullcontext()


def _model_names(model: nn.Module, state: dict[str, object]) -> dict[str, object]:
    """The checkpoint's weights under the model's own names: transformers 5 renames the older layouts of some
    families (ViT's ``encoder.layer.N.attention.attention.query`` is now ``layers.N.attention.q_proj``) and a
    base-model prefix as it loads them; the same renamings (its own tables) are applied here. Conversions that
    merge or split tensors are not applied (those weights are then reported as not in the model)."""
    expected = model.state_dict()
    if all(key in expected for key in state):
        return state
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: no renamings
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", None) or None
    return {rename_source_key(key, renamings, [], prefix, expected)[0]: tensor for key, tensor in state.items()}


def _load_weights(model: nn.Module, state: dict[str, Callable[[], Tensor]], path: Path) -> None:
    """Copy each checkpoint tensor (``state``: name → its reader) into the model's own, one at a time."""
    state = _model_names(model, state)
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    with torch.no_grad():
        for key in [k for k in state if k in expected]:
            tensor, target = state[key](), expected[key]
            if tensor.shape != target.shape:
                raise StructPruneError(f"{path}: weights do not fit the model: {key} is {list(tensor.shape)} in "
                                       f"the checkpoint, {list(target.shape)} in the model")
            target.copy_(tensor)
    missing = [k for k in expected if k not in state]
    buffers = {name for name, _ in model.named_buffers()}  # e.g. position_ids: persistent in older checkpoints
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = [k for k in unexpected if k not in buffers and not any(p.search(k) for p in ignored)]
    if unexpected:
        raise StructPruneError(f"{path}: weights not in the model: {', '.join(unexpected[:5])}")
    if missing:  # save_pretrained leaves out tied weights (e.g. an MLM decoder); tying restores them
        model.tie_weights()
        params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight has a name per use
        loaded = {p.data_ptr() for name, p in params.items() if name not in missing}
        untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
        if untied:
            raise StructPruneError(f"{path}: weights missing from the checkpoint: {', '.join(untied[:5])}")


def _weight_sources(path: Path, trust_checkpoint: bool) -> dict[str, Callable[[], Tensor]]:
    """Every weight of the checkpoint by name, each as a function that reads it: from the safetensors files or, for
    a ``pytorch_model.bin``, from the tensors read at once."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        names = ["model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        state = _read_pickled_weights(path / "pytorch_model.bin", trust_checkpoint)
        return {key: (lambda tensor=tensor: tensor) for key, tensor in state.items()}
    else:
        raise StructPruneError(f"{path}: no model.safetensors (save with save_pretrained's safetensors format)")
    sources = {}
    for name in names:
        with _opened(path / name) as handle:
            sources.update({key: _reader(path / name, key) for key in handle.keys()})
    return sources


@contextlib.contextmanager
def _opened(file: Path):
    """A safetensors file opened (memory-mapped) for as long as the block runs."""
    from safetensors import safe_open

    try:
        handle = safe_open(file, framework="pt")
    except Exception as exc:
        raise StructPruneError(f"{file} is not readable (truncated or corrupted?): {exc}") from None
    with handle:
        yield handle


def _reader(file: Path, key: str) -> Callable[[], Tensor]:
    """Reads tensor ``key`` of ``file``, the file mapped only while it does: the pages read stay no longer in the
    process's memory than the copy made of them."""
    def read() -> Tensor:
        with _opened(file) as handle:
            try:
                return handle.get_tensor(key)
            except Exception as exc:
                raise StructPruneError(f"{file} is not readable (truncated or corrupted?): {exc}") from None
    return read


def _read_pickled_weights(file: Path, trust_checkpoint: bool) -> dict[str, Tensor]:
    """A ``pytorch_model.bin``: tensors only, unless the caller trusts the file."""
    state = load_tensors(file, trust_checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise StructPruneError(f"{file} does not hold a dict of tensors (a state dict)")
    return state
