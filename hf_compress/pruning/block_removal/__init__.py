"""Block removal by influence (ShortGPT), the structural baseline: ``config.py`` + ``pruner.py``."""

from .config import BlockRemovalConfig
from .pruner import BlockRemovalPruner, block_influence


__all__ = ["BlockRemovalConfig", "BlockRemovalPruner", "block_influence"]
