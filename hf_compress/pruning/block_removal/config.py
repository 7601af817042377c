"""``BlockRemovalConfig``: the settings of block removal by influence (ShortGPT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import StructuralPruningConfig


__all__ = ["BlockRemovalConfig"]


@dataclass
class BlockRemovalConfig(StructuralPruningConfig):
    """Layer removal by block influence (ShortGPT): drop the blocks that change their input least.

    ``target_sparsity`` is the fraction of decoder-block parameters to remove; the count of blocks is
    the nearest achievable (every block has the same size in the supported architectures).

    Example:
        >>> BlockRemovalConfig(target_sparsity=0.25).sparsity
        0.25
    """

    method: ClassVar[str] = "block_removal"
