"""``BlockPrunerConfig``: the settings of BlockPruner, attention and MLP sub-blocks removed by a greedy search."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import StructuralPruningConfig


__all__ = ["BlockPrunerConfig"]


@dataclass
class BlockPrunerConfig(StructuralPruningConfig):
    """BlockPruner (Zhong et al., 2024): remove whole attention or MLP sub-blocks, one at a time, always the one
    whose absence raises the calibration loss (perplexity) least.

    ``target_sparsity`` is the fraction of decoder-block parameters to remove; the search stops at the nearest
    achievable share (an MLP is a much larger share of a block than its attention). The paper scores 256 windows
    of 2,048 tokens; the CPU default here is 16 × 256 (every round scores every remaining sub-block).

    Example:
        >>> BlockPrunerConfig(target_sparsity=0.25).sparsity
        0.25
    """

    method: ClassVar[str] = "block_pruner"
    num_calibration_sequences: int = field(default=16, metadata={"cli": ["--calibration-sequences"]})
