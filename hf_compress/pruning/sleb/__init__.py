"""SLEB: whole blocks removed by greedy calibration-loss search: ``config.py`` + ``pruner.py``."""

from .config import SLEBConfig
from .pruner import SLEBPruner


__all__ = ["SLEBConfig", "SLEBPruner"]
