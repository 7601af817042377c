"""Týr-the-Pruner: global structural pruning by supernet and evolutionary search (arXiv 2503.09657).

- ``config.py``: ``TyrConfig``
- ``local_pruner.py``: structural OBS pruning of one output projection, with least-squares re-fit
- ``supernet.py``: per-layer variants at several sparsity levels, built block by block
- ``search.py``: budget-preserving evolutionary search with staged sparse-KL selection
- ``pruner.py``: ``TyrPruner``: the ``StructuralPruner`` stages (plan, calibrate, decide by iterated supernet +
  search, shrink)

Block removal, the baseline, is its own method (``hf_compress.pruning.block_removal``).
"""

from ...utils.import_hooks import lazy_exports


# Names load on first use, so the config loads without the pruner and torch (`registry.discover_configs`).
_EXPORTS = {
    "TyrConfig": "config",
    "LocalPruner": "local_pruner",
    "LocalPruneResult": "local_pruner",
    "BudgetPlan": "pruner",
    "TyrPruner": "pruner",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
