"""BlockPruner: attention / MLP sub-blocks removed by greedy calibration-loss search: ``config.py`` + ``pruner.py``."""

from .config import BlockPrunerConfig
from .pruner import BlockPrunerPruner


__all__ = ["BlockPrunerConfig", "BlockPrunerPruner"]
