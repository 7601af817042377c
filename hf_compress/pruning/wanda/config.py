"""``WandaConfig``: the settings of Wanda."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import PruningConfig


__all__ = ["WandaConfig"]


@dataclass
class WandaConfig(PruningConfig):
    """Wanda: score ``|W_ij| · ‖X_j‖₂``, compared within each output row (N:M groups within rows).

    Example:
        >>> WandaConfig(sparsity="4:8").pattern.kept_per_group
        4
    """

    method: ClassVar[str] = "wanda"
