"""Greedy removal by calibration loss: the search SLEB (whole blocks) and BlockPruner (attention / MLP sub-blocks)
share.

Each round switches off every remaining candidate in turn (``modeling.sublayers.sublayers_switched_off``; nothing
is deleted during the search), measures the model's mean next-token loss on the calibration windows, and removes
the candidate whose absence hurts least; rounds continue until the removed cost reaches the budget. A candidate is
a set of sub-blocks: ``[(i, "attention"), (i, "mlp")]`` is block ``i`` whole.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, _ = tiny_model("llama")
    >>> ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    >>> units = [[(0, "mlp")], [(1, "mlp")]]
    >>> result = greedy_removal(model, ids, units, costs=[1.0, 1.0], budget=1.0, progress=False)
    >>> len(result.removed)
    1
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modeling.calibration import calibration_loss
from ..modeling.layers import find_decoder_blocks
from ..modeling.sublayers import sublayers_switched_off
from ..utils import get_logger


__all__ = ["RemovalSearchResult", "greedy_removal"]

logger = get_logger(__name__)

Unit = Sequence[tuple[int, str]]


@dataclass
class RemovalSearchResult:
    """The candidates removed (in the order chosen) and each round's best loss."""

    removed: list[int] = field(default_factory=list)
    """Indices into the candidate list."""
    history: list[dict[str, Any]] = field(default_factory=list)
    dense_loss: float = math.nan


def greedy_removal(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    candidates: Sequence[Unit],
    costs: Sequence[float],
    budget: float,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> RemovalSearchResult:
    """Remove candidates one at a time, always the one whose absence raises the calibration loss least.

    Stops at the removed cost nearest to ``budget`` (a round that would overshoot by more than it would still fall
    short is not taken). The model is unchanged afterwards.
    """
    if len(candidates) != len(costs):
        raise ValueError(f"{len(candidates)} candidates but {len(costs)} costs.")
    _, blocks = find_decoder_blocks(model)
    result = RemovalSearchResult(dense_loss=calibration_loss(model, calibration_ids, batch_size))
    removed_units: list[tuple[int, str]] = []
    spent = 0.0
    remaining = list(range(len(candidates)))
    bar = tqdm(desc="removal search", unit="round", disable=not progress)
    while remaining and spent < budget:
        losses = {}
        for index in tqdm(remaining, desc="candidates", leave=False, disable=not progress):
            with sublayers_switched_off(blocks, [*removed_units, *candidates[index]]):
                losses[index] = calibration_loss(model, calibration_ids, batch_size)
        best = min(remaining, key=losses.__getitem__)
        after = spent + costs[best]
        if after > budget and after - budget > budget - spent:
            break
        remaining.remove(best)
        removed_units.extend(candidates[best])
        spent = after
        result.removed.append(best)
        result.history.append({"removed": best, "loss": losses[best], "cost": spent})
        logger.info("removal search: removed candidate %d (loss %.4f, cost %.4f of budget %.4f)",
                    best, losses[best], spent, budget)
        bar.update(1)
    bar.close()
    return result
