"""BlockPruner: attention / MLP sub-blocks removed by greedy calibration-loss search: ``config.py`` + ``pruner.py``."""

from ...utils.import_hooks import lazy_exports


# Names load on first use, so the config loads without the pruner and torch (`registry.discover_configs`).
_EXPORTS = {
    "BlockPrunerConfig": "config",
    "BlockPrunerPruner": "pruner",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
