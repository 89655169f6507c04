"""structprune: make trained PyTorch networks physically smaller with provable structured pruning.

>>> import structprune
>>> sorted(structprune.methods.available())
['ispasp', 'magnitude', 'pfp', 'pfp-rand', 'random']
"""

from . import methods, models
from .api import PruneResult, keep_count, prune
from .checkpoint import load, save
from .errors import StructPruneError

__version__ = "0.1.0"
__all__ = ["PruneResult", "StructPruneError", "keep_count", "load", "methods", "models", "prune", "save"]
