"""Wanda: ``config.py`` (``WandaConfig``) + ``pruner.py`` (``WandaPruner``, ``wanda_scores``)."""

from ...utils.import_hooks import lazy_exports


# Names load on first use, so the config loads without the pruner and torch (`registry.discover_configs`).
_EXPORTS = {
    "WandaConfig": "config",
    "WandaPruner": "pruner",
    "wanda_scores": "pruner",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
