"""Wanda: ``config.py`` (``WandaConfig``) + ``pruner.py`` (``WandaPruner``, ``wanda_scores``)."""

from .config import WandaConfig
from .pruner import WandaPruner, wanda_scores


__all__ = ["WandaConfig", "WandaPruner", "wanda_scores"]
