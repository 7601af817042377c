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

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...modeling import BlockContext, find_decoder_blocks, for_each_block
from ...utils import get_logger
from ...modeling.structure import decoder_parameter_count, layer_widths, remove_blocks
from .config import BlockRemovalConfig
from .structural import StructuralPruner, StructuredPruningReport


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = ["BlockRemovalPruner", "block_influence"]

logger = get_logger(__name__)


def block_influence(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int = 8,
                    progress: bool = True) -> list[float]:
    """``1 − mean cos(h_in, h_out)`` per decoder block on the calibration tokens (dense model)."""
    influence: list[float] = []

    def measure(ctx: BlockContext) -> None:
        total, count = 0.0, 0
        for hidden, out in zip(ctx.inputs, ctx.dense_outputs, strict=True):  # type: ignore[arg-type]
            cosine = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)
            total += float(cosine.sum())
            count += cosine.numel()
        influence.append(1 - total / count)

    for_each_block(model, calibration_ids, measure, batch_size=batch_size, keep_dense_outputs=True,
                   progress=progress)
    return influence


class BlockRemovalPruner(StructuralPruner):
    """Delete the least influential decoder blocks (``BlockRemovalConfig``); a standard, shorter checkpoint."""

    config_class = BlockRemovalConfig

    def prune(  # type: ignore[override]
        self,
        config: BlockRemovalConfig | float | None = None,
        calibration_dataset: str | Sequence[str] | Dataset | torch.Tensor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        save_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        progress: bool = True,
    ) -> PreTrainedModel:
        """Remove ``round(target · blocks)`` blocks of lowest influence; returns the shorter model."""
        config = self._prepare(config, tokenizer, save_dir, overwrite)
        _, blocks = find_decoder_blocks(self.model)
        dense_parameters = decoder_parameter_count(self.model)
        per_block = dense_parameters / len(blocks)
        count = round(config.target_sparsity * dense_parameters / per_block)
        if not 1 <= count < len(blocks):
            raise ValueError(
                f"target_sparsity {config.target_sparsity} removes {count} of {len(blocks)} blocks; it must remove "
                "at least one and keep at least one."
            )
        calibration_ids = self._calibration_ids(config, calibration_dataset)
        begin = time.perf_counter()
        influence = block_influence(self.model, calibration_ids, config.batch_size, progress)
        drop = sorted(sorted(range(len(blocks)), key=influence.__getitem__)[:count])
        remove_blocks(self.model, drop)
        report = StructuredPruningReport(
            config.method, config.target_sparsity, dense_parameters, decoder_parameter_count(self.model),
            layers=layer_widths(self.model), seconds={"total": time.perf_counter() - begin},
            extra={"influence": influence, "removed_blocks": drop},
        )
        self.report = report  # type: ignore[assignment]
        logger.info("block removal: removed blocks %s (%.2f%% of decoder parameters)", drop,
                    100 * report.achieved_sparsity)
        self._record_recipe(config)
        if save_dir is not None:
            self._save(Path(save_dir), overwrite, {**config.to_dict(), "removed_blocks": drop})
        return self.model  # type: ignore[return-value]
