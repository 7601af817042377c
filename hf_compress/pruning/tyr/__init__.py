"""Týr-the-Pruner: global structural pruning by supernet and evolutionary search (arXiv 2503.09657).

- ``config.py``: ``TyrConfig`` (and ``BlockRemovalConfig`` for the ShortGPT baseline)
- ``local_pruner.py``: structural OBS pruning of one output projection, with least-squares re-fit
- ``supernet.py``: per-layer variants at several sparsity levels, built block by block
- ``search.py``: budget-preserving evolutionary search with staged sparse-KL selection
- ``pruner.py``: ``TyrPruner``: plan, iterate, export the smaller model
- ``structural.py``: ``StructuralPruner`` (shared base) and ``StructuredPruningReport``
- ``block_removal.py``: ``BlockRemovalPruner``: drop the least influential blocks
"""

from .block_removal import BlockRemovalPruner, block_influence
from .config import BlockRemovalConfig, TyrConfig
from .local_pruner import LocalPruner, LocalPruneResult
from .pruner import BudgetPlan, TyrPruner
from .structural import StructuralPruner, StructuredPruningReport


__all__ = [
    "BlockRemovalConfig",
    "BlockRemovalPruner",
    "BudgetPlan",
    "LocalPruneResult",
    "LocalPruner",
    "StructuralPruner",
    "StructuredPruningReport",
    "TyrConfig",
    "TyrPruner",
    "block_influence",
]
