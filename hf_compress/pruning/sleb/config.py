"""``SLEBConfig``: the settings of SLEB, whole decoder blocks removed by a greedy calibration-loss search."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...utils import check_int
from ..block_removal.config import BlockRemovalConfig


__all__ = ["SLEBConfig"]


@dataclass
class SLEBConfig(BlockRemovalConfig):
    """SLEB (Song et al., 2024): remove, one at a time, the block whose absence raises the calibration loss least.

    ``target_sparsity`` is the fraction of decoder-block parameters to remove (the nearest whole number of blocks,
    as for ShortGPT's ``BlockRemovalConfig``). The first and last ``protected_blocks`` blocks are never removed
    (SLEB's code: one at each end). The paper scores 128 windows of 2,048 tokens; the CPU default here is
    16 × 256 (every round scores every remaining block with a full forward over them).

    Args:
        protected_blocks: blocks at each end of the model that are never removed.

    Example:
        >>> SLEBConfig(target_sparsity=0.2).num_calibration_sequences
        16
    """

    method: ClassVar[str] = "sleb"
    num_calibration_sequences: int = field(default=16, metadata={"cli": ["--calibration-sequences"]})
    protected_blocks: int = field(default=1, metadata={"cli": ["--protected-blocks"]})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.protected_blocks = check_int("protected_blocks", self.protected_blocks, minimum=0)
