"""SLEB: whole decoder blocks removed by a greedy search on the calibration loss (``removal_search``).

Where ShortGPT (``block_removal``) ranks blocks once by how little they change their input, SLEB re-scores after
every removal: each round switches off every remaining block in turn and removes the one whose absence raises the
calibration loss least, so redundant neighbours are not all removed together. The result is the same kind of
checkpoint as ShortGPT's: a standard model with fewer blocks.

Example:
    >>> pruner = SLEBPruner.from_pretrained("tiny-llama")
    >>> model = pruner.prune(SLEBConfig(target_sparsity=0.5, protected_blocks=0, num_calibration_sequences=2,
    ...                      calibration_seq_len=16), ["calibration text " * 20], progress=False)
    >>> model.config.num_hidden_layers
    1
"""

from __future__ import annotations

from typing import Any

import torch

from ...modeling import find_decoder_blocks
from ...modeling.sublayers import sublayer_name
from ...utils import get_logger
from ..block_removal.pruner import BlockRemovalPruner
from ..removal_search import greedy_removal
from .config import SLEBConfig


__all__ = ["SLEBPruner"]

logger = get_logger(__name__)


class SLEBPruner(BlockRemovalPruner):
    """Delete decoder blocks chosen by SLEB's greedy calibration-loss search (``SLEBConfig``)."""

    config_class = SLEBConfig

    def plan(self, config: SLEBConfig) -> int:
        count = super().plan(config)
        _, blocks = find_decoder_blocks(self.model)
        try:  # the search switches a block off through its attention and MLP sub-blocks: check before calibrating
            for kind in ("attention", "mlp"):
                sublayer_name(blocks[0], kind)
        except ValueError as error:
            raise ValueError(f"SLEB scores a block by switching off its sub-blocks, and {error} Use ShortGPT "
                             "(BlockRemovalPruner), which ranks whole blocks without doing so.") from None
        removable = len(blocks) - 2 * config.protected_blocks
        if count > removable:
            raise ValueError(
                f"target_sparsity {config.target_sparsity} removes {count} blocks but only {max(removable, 0)} of "
                f"{len(blocks)} may go with protected_blocks={config.protected_blocks} at each end; lower one of them."
            )
        return count

    def calibrate(self, config: SLEBConfig, plan: int, calibration_ids: torch.Tensor | None,
                  progress: bool) -> torch.Tensor:
        return calibration_ids  # the search measures the live model itself

    def decide(self, config: SLEBConfig, plan: int, evidence: torch.Tensor, progress: bool) -> dict[str, Any]:
        _, blocks = find_decoder_blocks(self.model)
        indices = list(range(config.protected_blocks, len(blocks) - config.protected_blocks))
        candidates = [[(index, "attention"), (index, "mlp")] for index in indices]
        result = greedy_removal(self.model, evidence, candidates, [1.0] * len(candidates), float(plan),
                                batch_size=config.batch_size, progress=progress)
        order = [indices[choice] for choice in result.removed]
        logger.info("SLEB: removing blocks %s (in the order chosen)", order)
        history = [{**step, "removed": indices[step["removed"]]} for step in result.history]
        return {"removed_blocks": sorted(order), "removal_order": order, "dense_loss": result.dense_loss,
                "history": history}

    def describe(self, decision: dict[str, Any]) -> dict[str, Any]:
        return {"history": decision["history"], "extra": {key: decision[key] for key in
                                                          ("removed_blocks", "removal_order", "dense_loss")}}
