"""SparseGPT: ``config.py``, ``sparsify.py`` (the OBS math) and ``pruner.py`` (the lifecycle)."""

from .config import SparseGPTConfig
from .pruner import SparseGPTPruner
from .sparsify import sparsegpt_prune


__all__ = ["SparseGPTConfig", "SparseGPTPruner", "sparsegpt_prune"]
