"""Model zoo: one file per family, a registry decorator and a single factory; and models from elsewhere by name:
``"torchvision:resnet18"``, ``"timm:convnext_tiny"`` (their registries; optional extras), ``"hf:DIR"`` (a Hugging
Face model directory, or a hub id) and ``"package.module:Name"`` (your own class or factory).

>>> from structprune import models
>>> net = models.create("lenet5", num_classes=10, in_channels=1)
>>> sorted(models.available())[:3]
['lenet300', 'lenet5', 'mobilenetv2']
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import StructPruneError, first_line
from ..registry import Registry
from ..safe_io import load_tensors, resolve_constructor
from . import hf, lenet, mobilenetv2, resnet_cifar, vgg  # hf registers the transformers' layouts and graph

MODELS: Registry[nn.Module] = Registry("model")
for _name, _factory in {
    "lenet300": lenet.lenet300,
    "lenet5": lenet.lenet5,
    "mobilenetv2": mobilenetv2.mobilenetv2,
    "resnet20": resnet_cifar.resnet20,
    "resnet56": resnet_cifar.resnet56,
    "resnet164": resnet_cifar.resnet164,
    "resnet_cifar": resnet_cifar.resnet_cifar,
    "vgg16": vgg.vgg16,
}.items():
    MODELS.add(_name, _factory)


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """``@register("mynet")`` on a factory (taking ``num_classes`` and ``in_channels``) adds it to the zoo."""
    return MODELS.register(name)


def available() -> list[str]:
    return MODELS.available()


def accepts(name: str, option: str) -> bool:
    """Whether zoo model ``name`` takes the keyword ``option`` (e.g. "width_mult", "input_size")."""
    return MODELS.accepts(name, option)


def create(name: str, num_classes: int | None = None, in_channels: int | None = None, *, trusted: bool = True,
           **kwargs) -> nn.Module:
    """Build a zoo model by name, or any ``nn.Module`` by its import path.

    The returned module remembers how it was built (``model.structprune_arch``), which is what
    lets :func:`structprune.load` rebuild a pruned copy in a fresh process.

    Parameters
    ----------
    name: one of :func:`available`; ``"torchvision:NAME"`` or ``"timm:NAME"``, a model of that library's registry
        (randomly initialised: load trained weights with :func:`load_weights`); ``"hf:DIR"``, a Hugging Face
        model directory (or a hub id, downloaded by transformers as safetensors); or
        ``"package.module:qualname"`` of an ``nn.Module`` class or of a function returning one (called with the
        given keyword options, which must be JSON data).
    num_classes: outputs of the classifier (zoo default 10).
    in_channels: channels of the input images (zoo default 1: Fashion-MNIST; 3 for CIFAR).
    trusted: whether ``name`` comes from the caller (True) or from a file (see :mod:`structprune.checkpoint`).
    kwargs: family-specific options (``width_mult``, ``input_size``, ...).
    """
    library, _, model_name = name.partition(":")
    if library in REGISTRIES:
        return _from_registry(library, model_name, num_classes, in_channels, kwargs)
    if library == "hf":
        return _from_hf(model_name, trusted, num_classes, in_channels, kwargs)
    if ":" in name:
        return _from_import(name, trusted, num_classes=num_classes, in_channels=in_channels, **kwargs)
    if name not in MODELS:
        raise StructPruneError(_unknown(name))
    factory = MODELS.factory(name)
    num_classes = 10 if num_classes is None else num_classes
    in_channels = 1 if in_channels is None else in_channels
    if num_classes < 1:
        raise StructPruneError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise StructPruneError(f"in_channels must be >= 1, got {in_channels}")
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise StructPruneError(f"model {name!r} does not accept these options: {exc}") from None
    except ValueError as exc:  # the zoo's own checks of its options (an input too small for LeNet-5's layers)
        raise StructPruneError(f"model {name!r}: {exc}") from None
    model.structprune_arch = {
        "name": name,
        "kwargs": {"num_classes": num_classes, "in_channels": in_channels, **kwargs},
    }
    return model


def _unknown(name: str) -> str:
    """What an unknown model name is refused with: the forms a model is named in, and the closest guess."""
    guesses = []
    module, dot, qualname = str(name).rpartition(".")
    if dot and module and qualname:  # mynets.TinyResNet: the import form is module:Name
        guesses.append(f"{module}:{qualname}")
    for library in REGISTRIES:  # a model of an installed library's registry
        if _in_registry(library, name):
            guesses.append(f"{library}:{name}")
    if not guesses and _TORCHVISION_NAMES.fullmatch(str(name)):  # torchvision not installed: its well-known names
        guesses.append(f"torchvision:{name}")
    if not guesses:
        guesses += [f"{m} (the zoo)" for m in difflib.get_close_matches(str(name), available(), n=1)]
    hint = f" (did you mean {' or '.join(guesses)}?)" if guesses else ""
    return (f"model must be one of {', '.join(available())} (the zoo), or module:Name (your class or factory, e.g. "
            f"mynets:TinyResNet), torchvision:NAME, timm:NAME or hf:DIR; got {name!r}{hint}")


_TORCHVISION_NAMES = re.compile(r"(resnet(18|34|50|101|152)|resnext\w+|wide_resnet\w+|vgg(11|13|16|19)(_bn)?|alexnet|"
                                r"mobilenet_v[23]\w*|efficientnet_\w+|densenet\d+|convnext_\w+|vit_\w+|swin_\w+|"
                                r"regnet_\w+|squeezenet\w+|shufflenet\w+|googlenet|inception_v3|mnasnet\w+)")


def _in_registry(library: str, name: str) -> bool:
    try:
        module = importlib.import_module(library)
        return name in module.models.list_models() if library == "torchvision" else bool(module.is_model(name))
    except Exception:  # not installed, or a registry of another shape: no guess from it
        return False


#: model libraries whose registries build a model by name (never a function a user or a file could pick):
#: library -> (the extra that installs it, its keyword for the input channels)
REGISTRIES = {"torchvision": ("structprune[torchvision]", None), "timm": ("structprune[timm]", "in_chans")}


def _from_registry(library: str, model_name: str, num_classes, in_channels, kwargs: dict) -> nn.Module:
    extra, channels_keyword = REGISTRIES[library]
    for key in ("weights", "pretrained"):
        if key in kwargs:
            raise StructPruneError(f"{library}:{model_name}: {key} is not an option here; the model is built with "
                                   f"random weights, load yours with --weights FILE (models.load_weights)")
    try:
        module = importlib.import_module(library)
    except ImportError:
        raise StructPruneError(f"{library}:{model_name} needs {library}: pip install '{extra}'") from None
    options = dict(kwargs)
    if num_classes is not None:
        options["num_classes"] = num_classes
    if in_channels is not None and in_channels != 3:
        if channels_keyword is None:
            raise StructPruneError(f"{library} models take 3 input channels; got in_channels={in_channels}")
        options[channels_keyword] = in_channels
    try:
        if library == "torchvision":
            if model_name not in module.models.list_models():
                raise StructPruneError(f"torchvision has no model {model_name!r} (torchvision.models.list_models())")
            model = module.models.get_model(model_name, weights=None, **options)
        else:
            if not module.is_model(model_name):
                raise StructPruneError(f"timm has no model {model_name!r} (timm.list_models())")
            model = module.create_model(model_name, pretrained=False, **options)
    except TypeError as exc:
        raise StructPruneError(f"{library}:{model_name} does not accept these options: {exc}") from None
    model.structprune_arch = {"name": f"{library}:{model_name}", "kwargs": options}
    return model


def _from_hf(location: str, trusted: bool, num_classes, in_channels, kwargs: dict) -> nn.Module:
    if not trusted:  # saved transformers models are directories; a checkpoint file never names one
        raise StructPruneError(f"hf:{location} cannot be rebuilt from a checkpoint file; load the saved directory")
    if num_classes is not None or in_channels is not None or kwargs:
        raise StructPruneError(f"hf:{location}: the model's config decides its shape; options are not accepted")
    if Path(location).is_dir():
        return hf.load_pretrained(location)
    transformers = hf.transformers_module()
    try:  # a hub id: transformers downloads it (safetensors only: no pickle from the network)
        return transformers.AutoModel.from_pretrained(location, use_safetensors=True).eval()
    except Exception as exc:
        raise StructPruneError(f"hf:{location}: not a local model directory, and transformers could not load it "
                               f"as a hub id ({first_line(exc)})") from None


def load_weights(model: nn.Module, path: str | os.PathLike, trust_checkpoint: bool = False) -> nn.Module:
    """Load a state dict from ``path`` into ``model`` (in place; returned): ``.safetensors``, or a torch file read
    tensors-only (a training checkpoint holding it under ``state_dict``/``model`` is unwrapped, and DDP's
    ``module.`` prefixes dropped). Every weight of the model must be there, with its shape."""
    path = Path(path)
    if not path.is_file():
        raise StructPruneError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as exc:
            raise StructPruneError(f"--weights {path}: not a readable safetensors file ({first_line(exc)})") from None
    else:
        state = load_tensors(path, trust_checkpoint, what="--weights",
                             advice="Save the weights as a plain state dict (tensors only), or pass --trust-checkpoint "
                                    "for a file you trust.")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StructPruneError(f"--weights {path}: not a state dict (names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    mismatch = weights_mismatch(model, state)
    if mismatch:
        raise StructPruneError(f"--weights {path}: the weights do not fit the model: {mismatch}; give the "
                               f"architecture they were trained with (--model, --model-kwargs)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StructPruneError(f"--weights {path}: the weights do not fit the model ({first_line(exc)})") from None
    return model


def weights_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into ``model``: how many weights are missing, unexpected or of another
    shape, and the first few of each; "" when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{len(found)} {what} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
             for what, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
             if found]
    return "; ".join(parts)


def _from_import(spec: str, trusted: bool, **kwargs) -> nn.Module:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError):
        raise StructPruneError(f"the options of {spec} must be JSON data (numbers, strings, lists, dicts), "
                               f"so that a checkpoint can record them; got {kwargs!r}") from None
    constructor = resolve_constructor(spec, trusted)
    try:
        model = constructor(**kwargs)
    except TypeError as exc:
        raise StructPruneError(f"{spec} does not accept these options: {exc}") from None
    if not isinstance(model, nn.Module):
        raise StructPruneError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    model.structprune_arch = {"import": spec, "kwargs": kwargs}
    return model
