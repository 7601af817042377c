"""Layer removal by block influence (ShortGPT): the Týr issue's baseline at equal parameter count.

A block's influence is ``1 − cos(input, output)`` of its hidden states, averaged over calibration tokens
(measured with the shared block-by-block calibration pass on the dense model); the blocks that change
their input least are deleted until ``target_sparsity`` of the decoder parameters is gone (nearest
whole number of blocks).

Example:
    >>> pruner = BlockRemovalPruner.from_pretrained("tiny-llama")
    >>> model = pruner.prune(BlockRemovalConfig(target_sparsity=0.5, num_calibration_sequences=2,
    ...                      calibration_seq_len=16), ["calibration text " * 20], progress=False)
    >>> model.config.num_hidden_layers
    1
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...modeling import BlockContext, find_decoder_blocks, for_each_block
from ...modeling.structure import remove_blocks
from ...utils import get_logger
from ..structural import StructuralPruner
from .config import BlockRemovalConfig


__all__ = ["BlockRemovalPruner", "block_influence"]

logger = get_logger(__name__)


def block_influence(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int = 8,
                    progress: bool = True) -> list[float]:
    """``1 − mean cos(h_in, h_out)`` per decoder block on the calibration tokens (dense model)."""
    influence: list[float] = []

    def measure(ctx: BlockContext) -> None:
        total, count = 0.0, 0
        for hidden in ctx.inputs:  # one micro-batch's outputs at a time, not a second copy of the block's activations
            cosine = torch.nn.functional.cosine_similarity(hidden.float(), ctx.forward(hidden).float(), dim=-1)
            total += float(cosine.sum())
            count += cosine.numel()
        influence.append(1 - total / count)

    for_each_block(model, calibration_ids, measure, batch_size=batch_size, progress=progress, return_outputs=False)
    return influence


class BlockRemovalPruner(StructuralPruner):
    """Delete the least influential decoder blocks (``BlockRemovalConfig``); a standard, shorter checkpoint."""

    config_class = BlockRemovalConfig

    def plan(self, config: BlockRemovalConfig) -> int:
        """How many blocks ``target_sparsity`` removes (the nearest whole number); refuses none or all."""
        _, blocks = find_decoder_blocks(self.model)
        # Every block has the same size in the supported architectures: the target is a share of the blocks.
        count = round(config.target_sparsity * len(blocks))
        if not 1 <= count < len(blocks):
            raise ValueError(
                f"target_sparsity {config.target_sparsity} removes {count} of {len(blocks)} blocks; it must remove "
                "at least one and keep at least one."
            )
        if abs(count / len(blocks) - config.target_sparsity) >= 0.05:  # few blocks: whole ones are coarse steps
            logger.warning("target_sparsity %g of %d blocks is %d whole blocks: %.3g of the decoder removed.",
                           config.target_sparsity, len(blocks), count, count / len(blocks))
        text_config = self.model.config.get_text_config() if hasattr(self.model, "config") else None
        if getattr(text_config, "scale_attn_by_inverse_layer_idx", False):
            # remove_blocks refuses to move such blocks: refuse here, before the calibration and search, not after.
            raise ValueError(
                f"{type(self.model).__name__} scales attention by the inverse layer index "
                "(scale_attn_by_inverse_layer_idx), so a block cannot move and only the last blocks could go; this "
                f"method chooses blocks anywhere. Truncate the model instead: remove_blocks(model, "
                f"{list(range(len(blocks) - count, len(blocks)))}) from hf_compress.modeling.structure."
            )
        return count

    def calibrate(self, config: BlockRemovalConfig, plan: int, calibration_ids: torch.Tensor | None,
                  progress: bool) -> list[float]:
        return block_influence(self.model, calibration_ids, config.batch_size, progress)

    def decide(self, config: BlockRemovalConfig, plan: int, evidence: list[float], progress: bool) -> dict[str, Any]:
        drop = sorted(sorted(range(len(evidence)), key=evidence.__getitem__)[:plan])
        logger.info("block removal: removing blocks %s", drop)
        return {"influence": evidence, "removed_blocks": drop}

    def shrink(self, decision: dict[str, Any]) -> None:
        remove_blocks(self.model, decision["removed_blocks"])

    def describe(self, decision: dict[str, Any]) -> dict[str, Any]:
        return {"extra": decision}

    def recipe(self, config: BlockRemovalConfig) -> dict[str, Any]:
        return {**super().recipe(config), "removed_blocks": self.report.extra["removed_blocks"]}
