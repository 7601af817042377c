"""SDS (Sparse-Dense-Sparse) around any layer-wise pruner: ``config.py`` + ``pruner.py``."""

from .config import SDSConfig, sds_bases
from .pruner import SDSPruner


__all__ = ["SDSConfig", "SDSPruner", "sds_bases"]
