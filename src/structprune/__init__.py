"""structprune: make trained PyTorch networks physically smaller with provable structured pruning.

>>> import structprune
>>> sorted(structprune.methods.available())
['bn-scale', 'fpgm', 'gfs', 'ispasp', 'magnitude', 'pfp', 'pfp-rand', 'pfp-top', 'random', 'taylor', 'thinet']
"""

from . import allocate, methods, models
from .allocate import PerLayer, Target, Uniform, keep_count
from .api import PruneResult, prune
from .checkpoint import load, save
from .errors import StructPruneError
from .exporter import export

__version__ = "0.2.0"
__all__ = ["PerLayer", "PruneResult", "StructPruneError", "Target", "Uniform", "allocate", "export", "keep_count",
           "load", "methods", "models", "prune", "save"]
