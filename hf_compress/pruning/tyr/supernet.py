"""Týr stage 1: a supernet of locally pruned variants of every attention and FFN output projection.

For each decoder block (visited with the shared ``for_each_block`` calibration pass), the Hessians of
the two output projections (``o_proj`` and ``down_proj``, or their OPT names) are collected, and the
``LocalPruner`` builds one variant per sparsity level around the layer's centre allocation. Each variant
is written to ``<directory>/block_<i>/<unit type>.<level>.safetensors`` (the kept unit indices and the
re-fitted weight) as soon as it is made, so one variant is in memory at a time (at 7B, the nine levels of
a down projection are 1.6 GB in float32); a block's folder appears whole once all its variants are written,
and an interrupted build resumes at the first missing block. Before the pass moves on, the block is given
the weight that stands for "this block will be pruned later" (``propagation``: the centre variant, the
expectation over levels, or the dense weight), so the next block calibrates on what it will really see
(expectation error accumulation).

Example:
    >>> levels = LevelGrid(centre=[1, 2], step=1, max_removable=[3, 3], half_width=4)
    >>> levels.bounds(0), levels.bounds(1)
    ((-1, 2), (-2, 1))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...modeling import BlockContext, HessianCollector, for_each_block
from ...utils import atomic_directory, get_logger
from ...modeling.structure import BlockStructure, unit_channels
from .local_pruner import LocalPruner


__all__ = ["UNIT_TYPES", "LevelGrid", "Supernet", "build_supernet", "zero_filled"]

logger = get_logger(__name__)

UNIT_TYPES = ("attention", "ffn")


@dataclass
class LevelGrid:
    """Units removed per layer at each level of one unit type: ``centre[i] + level * step``.

    Levels run from ``-min(centre // step, half)`` to ``+min((max_removable - centre) // step, half)``, so
    every level removes between 0 and ``max_removable`` units (at least one unit always stays).
    """

    centre: list[int]
    step: int
    max_removable: list[int]
    half_width: int

    def bounds(self, layer: int) -> tuple[int, int]:
        centre = self.centre[layer]
        low = -min(centre // self.step, self.half_width)
        high = min((self.max_removable[layer] - centre) // self.step, self.half_width)
        return low, high

    def removed(self, layer: int, level: int) -> int:
        low, high = self.bounds(layer)
        if not low <= level <= high:
            raise ValueError(f"level {level} outside [{low}, {high}] for layer {layer}.")
        return self.centre[layer] + level * self.step


class Supernet:
    """The stored variants of one iteration: ``variant(block, unit_type, level) -> (kept, weight)``."""

    def __init__(self, directory: str | os.PathLike, grids: dict[str, LevelGrid]) -> None:
        self.directory = Path(directory)
        self.grids = grids

    def block_folder(self, block: int) -> Path:
        return self.directory / f"block_{block}"

    def variant_file(self, block: int, unit_type: str, level: int) -> Path:
        return self.block_folder(block) / f"{unit_type}.{level}.safetensors"

    def has_block(self, block: int) -> bool:
        return self.block_folder(block).is_dir()

    def variant(self, block: int, unit_type: str, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(self.variant_file(block, unit_type, level), framework="pt") as handle:
            return handle.get_tensor("kept"), handle.get_tensor("weight")


def build_supernet(
    model: torch.nn.Module,
    calibration_ids: torch.Tensor,
    structures: Sequence[BlockStructure],
    supernet: Supernet,
    *,
    update_rounds: dict[str, int],
    damping: float,
    propagation: str,
    batch_size: int,
    progress: bool = True,
) -> None:
    """Build (or finish building) ``supernet`` from the model's current, dense, output projections.

    Leaves each output projection holding its propagation weight (zero-filled, full shape); the caller
    restores the dense weights or applies a candidate afterwards.
    """
    supernet.directory.mkdir(parents=True, exist_ok=True)
    targets = {name for structure in structures for name in structure.output_layer_names.values()}

    def collectors_for(name: str, layer: torch.nn.Module) -> list[HessianCollector]:
        return [HessianCollector()] if name in targets else []

    def callback(ctx: BlockContext) -> None:
        structure = structures[ctx.index]
        if not supernet.has_block(ctx.index):
            _build_block(ctx, structure, supernet, update_rounds, damping)
        for unit_type in UNIT_TYPES:
            layer = _output_layer(structure, unit_type)
            weight = _propagation_weight(supernet, ctx.index, unit_type, layer.weight, structure, propagation)
            if weight is not None:
                layer.weight.copy_(weight)

    for_each_block(model, calibration_ids, callback, collectors_for=collectors_for, batch_size=batch_size,
                   progress=progress)


def _build_block(
    ctx: BlockContext, structure: BlockStructure, supernet: Supernet, update_rounds: dict[str, int], damping: float
) -> None:
    layer_names = structure.output_layer_names
    # The folder is complete or absent: resuming trusts a block folder that exists.
    with atomic_directory(supernet.block_folder(ctx.index)) as staging:
        for unit_type in UNIT_TYPES:
            layer = _output_layer(structure, unit_type)
            hessian = ctx.stats[layer_names[unit_type]][0].hessian
            unit_size = structure.attention.unit_size if unit_type == "attention" else 1
            pruner = LocalPruner(layer.weight, hessian, unit_size, damping)
            grid = supernet.grids[unit_type]
            low, high = grid.bounds(ctx.index)
            errors = {}
            for level in range(low, high + 1):
                result = pruner.prune(grid.removed(ctx.index, level), update_rounds[unit_type])
                tensors = {"kept": result.kept.to(torch.int64).contiguous(),
                           "weight": result.weight.detach().cpu().contiguous()}
                variant = staging / supernet.variant_file(ctx.index, unit_type, level).name
                save_file(tensors, variant, metadata={"relative_error": repr(result.relative_error)})
                errors[level] = result.relative_error
                del result, tensors  # before the next level's variant is made
            logger.debug("block %d %s: %d levels, errors %s", ctx.index, unit_type, high - low + 1, errors)


def _output_layer(structure: BlockStructure, unit_type: str) -> torch.nn.Linear:
    return structure.attention.output if unit_type == "attention" else structure.ffn.output


def zero_filled(kept: torch.Tensor, weight: torch.Tensor, like: torch.Tensor, unit_size: int) -> torch.Tensor:
    """The full-shape weight whose pruned input columns are zero (what the sliced layer computes)."""
    full = torch.zeros_like(like)
    columns = unit_channels(kept, unit_size).to(like.device)
    full[:, columns] = weight.to(device=like.device, dtype=like.dtype)
    return full


def _propagation_weight(
    supernet: Supernet, block: int, unit_type: str, dense: torch.Tensor, structure: BlockStructure, propagation: str
) -> torch.Tensor | None:
    if propagation == "dense":
        return None
    unit_size = structure.attention.unit_size if unit_type == "attention" else 1
    if propagation == "centre":
        return zero_filled(*supernet.variant(block, unit_type, 0), dense, unit_size)
    grid = supernet.grids[unit_type]
    low, high = grid.bounds(block)
    total = torch.zeros_like(dense, dtype=torch.float32)
    weights = 0.0
    units = structure.attention.num_units if unit_type == "attention" else structure.ffn.num_units
    for level in range(low, high + 1):
        keep_fraction = 1 - grid.removed(block, level) / units
        variant = zero_filled(*supernet.variant(block, unit_type, level), dense, unit_size)
        total += keep_fraction * variant.float()
        weights += keep_fraction
    return (total / weights).to(dense.dtype)
