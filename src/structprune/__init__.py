"""structprune: make trained PyTorch networks physically smaller with provable structured pruning.

>>> import structprune
>>> sorted(structprune.methods.available())
['bn-scale', 'fpgm', 'gfs', 'ispasp', 'magnitude', 'pfp', 'pfp-rand', 'pfp-top', 'random', 'taylor', 'thinet']

The names below are imported when first used, so that importing a part of the package (the command line's
``--help``, :mod:`structprune.errors`) does not load all of it.
"""

from __future__ import annotations

import importlib

from .errors import StructPruneError
from .version import __version__

#: public name -> the module that defines it (None: the name is a submodule; any other submodule is found too)
_PUBLIC = {
    "PerLayer": "allocate", "Target": "allocate", "Uniform": "allocate", "keep_count": "allocate",
    "PruneResult": "result", "prune": "api", "prune_depth": "depth", "load": "checkpoint", "save": "checkpoint",
    "export": "exporter",
    "allocate": None, "methods": None, "models": None,
}


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    try:  # a public name, or any submodule (``structprune.measure.count(...)`` after ``import structprune``)
        value = importlib.import_module(f"{__name__}.{name if module is None else module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = value if module is None else getattr(value, name)
    globals()[name] = value  # once: later uses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = ["PerLayer", "PruneResult", "StructPruneError", "Target", "Uniform", "__version__", "allocate", "export",
           "keep_count", "load", "methods", "models", "prune", "prune_depth", "save"]
