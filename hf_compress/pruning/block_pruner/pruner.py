"""BlockPruner: attention and MLP sub-blocks removed by a greedy search on the calibration loss.

Finer than removing whole blocks (ShortGPT, SLEB): a block may lose its attention and keep its MLP or the other
way round. The candidates are every block's attention and MLP; each round of the shared search
(``removal_search``) removes the one whose absence raises the calibration loss least, until the removed share of
decoder parameters is nearest ``target_sparsity``. Removed sub-blocks become parameter-free stand-ins
(``modeling.sublayers``) and are saved as widths of 0 in a slim checkpoint, which loads back with
``AutoModelForCausalLM.from_pretrained`` after ``import hf_compress``.

Example:
    >>> pruner = BlockPrunerPruner.from_pretrained("tiny-llama")
    >>> model = pruner.prune(BlockPrunerConfig(target_sparsity=0.4, num_calibration_sequences=2,
    ...                      calibration_seq_len=16), ["calibration text " * 20], progress=False)
    >>> sum(width["intermediate_size"] == 0 for width in pruner.report.layers)
    1
"""

from __future__ import annotations

from typing import Any

import torch

from ...modeling import find_decoder_blocks
from ...modeling.structure import decoder_parameter_count, layer_widths
from ...modeling.sublayers import remove_sublayers, removed_sublayers, sublayer_name
from ...utils import get_logger
from ..removal_search import greedy_removal
from ..structural import StructuralPruner
from .config import BlockPrunerConfig


__all__ = ["BlockPrunerPruner"]

logger = get_logger(__name__)


class BlockPrunerPruner(StructuralPruner):
    """Delete the attention / MLP sub-blocks chosen by BlockPruner's greedy search (``BlockPrunerConfig``)."""

    config_class = BlockPrunerConfig

    def plan(self, config: BlockPrunerConfig) -> list[tuple[int, str, float]]:
        """Every sub-block with its share of the decoder parameters; refuses models without separate modules, or
        whose widths a slim checkpoint cannot record (where a removed sub-block would reload with random weights)."""
        _, blocks = find_decoder_blocks(self.model)
        try:
            layer_widths(self.model)
        except ValueError as err:
            raise ValueError(
                f"BlockPruner cannot prune {type(self.model).__name__}: a checkpoint without one of its sub-blocks "
                f"could not record it ({err}). Remove whole blocks instead (ShortGPT or SLEB)."
            ) from None
        try:  # the search switches sub-blocks off by their modules: check before calibrating
            names = [{kind: sublayer_name(block, kind) for kind in ("attention", "mlp")} for block in blocks]
        except ValueError as error:
            raise ValueError(f"BlockPruner removes attention and MLP sub-blocks, and {error} Remove whole blocks "
                             "instead (ShortGPT: BlockRemovalPruner).") from None
        total = decoder_parameter_count(self.model)
        units = []
        for index, block in enumerate(blocks):
            gone = removed_sublayers(block)
            for kind in ("attention", "mlp"):
                module = getattr(block, names[index][kind])
                if not gone[kind]:  # a second prune: one already removed costs nothing and must not be counted again
                    units.append((index, kind, sum(p.numel() for p in module.parameters()) / total))
        if not units:
            raise ValueError("every attention and MLP sub-block of this model is already removed; nothing is left to prune.")
        smallest = min(share for _, _, share in units)
        if smallest > 2 * config.target_sparsity:  # removing even the smallest lands farther from the target than none
            raise ValueError(
                f"target_sparsity {config.target_sparsity} is nearer to removing nothing than to removing the smallest "
                f"sub-block ({smallest:.4f} of the decoder parameters); use at least {smallest / 2:.4f}."
            )
        # At or above this the search may take the last sub-block too (whichever is left last, if it is the largest).
        ceiling = sum(share for _, _, share in units) - max(share for _, _, share in units) / 2
        if config.target_sparsity >= ceiling:
            raise ValueError(
                f"target_sparsity {config.target_sparsity} could remove every attention and MLP sub-block, leaving no "
                f"decoder computation; use less than {ceiling:.4f}."
            )
        return units

    def calibrate(self, config: BlockPrunerConfig, plan: list, calibration_ids: torch.Tensor | None,
                  progress: bool) -> torch.Tensor:
        return calibration_ids  # the search measures the live model itself

    def decide(self, config: BlockPrunerConfig, plan: list, evidence: torch.Tensor, progress: bool) -> dict[str, Any]:
        result = greedy_removal(self.model, evidence, [[(index, kind)] for index, kind, _ in plan],
                                [share for _, _, share in plan], config.target_sparsity,
                                batch_size=config.batch_size, progress=progress)
        order = [[plan[choice][0], plan[choice][1]] for choice in result.removed]
        logger.info("BlockPruner: removing %s (in the order chosen)", order)
        history = [{**step, "removed": order[position]} for position, step in enumerate(result.history)]
        return {"removed_sublayers": order, "dense_loss": result.dense_loss, "history": history}

    def shrink(self, decision: dict[str, Any]) -> None:
        _, blocks = find_decoder_blocks(self.model)
        for index, kind in decision["removed_sublayers"]:
            remove_sublayers(blocks[index], attention=kind == "attention", mlp=kind == "mlp")

    def describe(self, decision: dict[str, Any]) -> dict[str, Any]:
        return {"history": decision["history"],
                "extra": {"removed_sublayers": decision["removed_sublayers"], "dense_loss": decision["dense_loss"]}}

    def recipe(self, config: BlockPrunerConfig) -> dict[str, Any]:
        return {**super().recipe(config), "removed_sublayers": self.report.extra["removed_sublayers"]}
