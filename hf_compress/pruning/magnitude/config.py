"""``MagnitudeConfig``: the settings of magnitude pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import PruningConfig


__all__ = ["MagnitudeConfig"]


@dataclass
class MagnitudeConfig(PruningConfig):
    """Magnitude pruning: score ``|W|``; an unstructured ratio is applied per layer (whole matrix).

    Needs no calibration data (the calibration fields are kept for a uniform recipe but unused).

    Example:
        >>> MagnitudeConfig(sparsity=0.5, skip=["mlp.*"]).skip
        ['mlp.*']
    """

    method: ClassVar[str] = "magnitude"
