"""Magnitude pruning: ``config.py`` (``MagnitudeConfig``) + ``pruner.py`` (``MagnitudePruner``)."""

from ...utils.import_hooks import lazy_exports


# Names load on first use, so the config loads without the pruner and torch (`registry.discover_configs`).
_EXPORTS = {
    "MagnitudeConfig": "config",
    "MagnitudePruner": "pruner",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
