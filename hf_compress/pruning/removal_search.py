"""Greedy removal by calibration loss: the search SLEB (whole blocks) and BlockPruner (attention / MLP sub-blocks)
share.

Each round switches off every remaining candidate in turn (``modeling.sublayers.sublayers_switched_off``; nothing
is deleted during the search), measures the model's mean next-token loss on the calibration windows, and removes
the candidate whose absence hurts least; rounds continue until the removed cost reaches the budget. A candidate is
a set of sub-blocks: ``[(i, "attention"), (i, "mlp")]`` is block ``i`` whole.

Removing a candidate changes nothing before its first block, so each round scores the candidates in the order of
their first block while walking the calibration activations through the current model's blocks once, and runs each
candidate's forward from its first block on (``modeling.forward_from_block``): on average half the blocks per
candidate, holding one block's activations. Before the search, the shortcut is
checked against the whole forward on the unchanged model; where they disagree (a model whose forward does more
between blocks than pass the hidden states on) the search warns and runs whole forwards.

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

from ..modeling.calibration import BlockInputs, calibration_loss, capture_block_inputs, forward_from_block
from ..modeling.layers import find_decoder_blocks
from ..modeling.sublayers import sublayers_switched_off
from ..utils import get_logger, progress_bar


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
    reuse_prefix: bool = True,
) -> RemovalSearchResult:
    """Remove candidates one at a time, always the one whose absence raises the calibration loss least.

    Stops at the removed cost nearest to ``budget``: a round chooses among the candidates that would not overshoot it
    by more than it still falls short (a cheaper one may fit where the least harmful would not), and the search ends
    when none does. The model is unchanged afterwards. ``reuse_prefix=False`` scores every candidate with a
    whole forward (the reference the shortcut is tested against).
    """
    if len(candidates) != len(costs):
        raise ValueError(f"{len(candidates)} candidates but {len(costs)} costs.")
    _, blocks = find_decoder_blocks(model)
    result = RemovalSearchResult(dense_loss=calibration_loss(model, calibration_ids, batch_size))
    prefix = _PrefixReuse.checked(model, calibration_ids, batch_size, result.dense_loss) if reuse_prefix else None
    removed_units: list[tuple[int, str]] = []
    spent = 0.0
    remaining = list(range(len(candidates)))
    bar = progress_bar(desc="removal search", unit="round", disable=not progress)
    while remaining and spent < budget:
        # Only candidates that bring the removed cost nearer the budget: with unequal costs (an MLP is twice an
        # attention) the least harmful one overshooting must not end the search while a cheaper one still fits.
        fitting = [index for index in remaining if spent + costs[index] - budget <= budget - spent]
        if not fitting:
            break
        if prefix is None:
            losses = {}
            for index in progress_bar(fitting, desc="candidates", leave=False, disable=not progress):
                with sublayers_switched_off(blocks, [*removed_units, *candidates[index]]):
                    losses[index] = calibration_loss(model, calibration_ids, batch_size)
        else:
            losses = prefix.losses(removed_units, {index: candidates[index] for index in fitting}, progress)
        best = min(fitting, key=losses.__getitem__)
        after = spent + costs[best]
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


class _PrefixReuse:
    """Scores candidates in the order of their first block, walking the calibration activations through the blocks
    once per round: only the hidden states entering the current block are held."""

    def __init__(self, model: nn.Module, calibration_ids: torch.Tensor, batch_size: int) -> None:
        self.model, self.ids, self.batch_size = model, calibration_ids, batch_size
        self.blocks = find_decoder_blocks(model)[1]
        with torch.no_grad():
            self.captured: BlockInputs = capture_block_inputs(model, calibration_ids, batch_size=batch_size)
            sample = self.captured.hidden_states[0][:1]
            self.tuple_outputs = not torch.is_tensor(self.captured.calls[0].output(self.blocks[0], sample))

    @classmethod
    def checked(cls, model: nn.Module, calibration_ids: torch.Tensor, batch_size: int,
                whole_loss: float) -> _PrefixReuse | None:
        """The shortcut, if it reproduces the whole forward's loss on the model as it is (else ``None``)."""
        reuse = cls(model, calibration_ids, batch_size)
        middle = len(reuse.blocks) // 2
        resumed = reuse.resumed_losses([], {0: (middle, [])}, progress=False)[0]
        if not math.isclose(resumed, whole_loss, rel_tol=1e-4, abs_tol=1e-6):
            logger.warning("removal search: resuming the forward at block %d gives loss %.6f, the whole forward "
                           "%.6f; scoring every candidate with whole forwards instead (slower, same result).",
                           middle, resumed, whole_loss)
            return None
        return reuse

    def losses(self, removed: Unit, candidates: dict[int, Unit], progress: bool) -> dict[int, float]:
        """Each candidate's calibration loss with it and ``removed`` switched off."""
        plans = {index: (min(block for block, _ in unit), [*removed, *unit]) for index, unit in candidates.items()}
        return self.resumed_losses(removed, plans, progress)

    def resumed_losses(self, removed: Unit, plans: dict[int, tuple[int, Unit]], progress: bool) -> dict[int, float]:
        """For each ``key: (first block, sub-blocks off)``, the loss of the forward resumed at the first block (which
        ``removed`` alone decides the input of) with those sub-blocks off."""
        entering, position = self.captured.hidden_states, 0
        losses = {}
        with torch.no_grad():
            for key in progress_bar(sorted(plans, key=lambda key: plans[key][0]), desc="candidates", leave=False,
                            disable=not progress):
                first, off = plans[key]
                with sublayers_switched_off(self.blocks, removed):  # advance to this first block
                    for block, call in zip(self.blocks[position:first], self.captured.calls[position:first]):
                        entering = [call(block, hidden) for hidden in entering]
                position = first
                with sublayers_switched_off(self.blocks, off), forward_from_block(
                        self.model, first, entering, tuple_outputs=self.tuple_outputs):
                    losses[key] = calibration_loss(self.model, self.ids, self.batch_size)
        return losses
