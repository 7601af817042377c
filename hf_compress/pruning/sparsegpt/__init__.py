"""SparseGPT: ``config.py``, ``sparsify.py`` (the OBS math) and ``pruner.py`` (the lifecycle)."""

from ...utils.import_hooks import lazy_exports


# Names load on first use, so the config loads without the pruner and torch (`registry.discover_configs`).
_EXPORTS = {
    "SparseGPTConfig": "config",
    "SparseGPTPruner": "pruner",
    "sparsegpt_prune": "sparsify",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
