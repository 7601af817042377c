"""Magnitude pruning: ``config.py`` (``MagnitudeConfig``) + ``pruner.py`` (``MagnitudePruner``)."""

from .config import MagnitudeConfig
from .pruner import MagnitudePruner


__all__ = ["MagnitudeConfig", "MagnitudePruner"]
