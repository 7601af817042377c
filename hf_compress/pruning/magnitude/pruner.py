"""Magnitude pruning: drop the weights of smallest absolute value; no calibration data.

Per the Wanda code's magnitude baseline: an unstructured ratio is applied to each weight matrix as a
whole (one threshold per layer); N:M keeps the N largest ``|W|`` of every M consecutive input weights
of each row.

Example:
    >>> from hf_compress.pruning import MagnitudeConfig, MagnitudePruner
    >>> pruner = MagnitudePruner.from_pretrained("tiny-gpt2")
    >>> model = pruner.prune(MagnitudeConfig(sparsity=0.5), progress=False)
    >>> pruner.report.overall_sparsity
    0.5
"""

from __future__ import annotations

from torch import nn

from ...modeling import Collector, set_weight_matrix, weight_matrix
from ..config import PruningConfig
from ..mask_pruner import MaskPruner
from ..masks import pattern_mask
from .config import MagnitudeConfig


__all__ = ["MagnitudePruner"]


class MagnitudePruner(MaskPruner):
    """Score ``|W_ij|``; unstructured ratios per whole layer, N:M per row group. Needs no calibration.

    Example:
        >>> pruner = MagnitudePruner.from_pretrained("tiny-llama")  # doctest: +SKIP
        >>> pruner.prune("2:4", save_dir="tiny-llama-2of4")  # doctest: +SKIP
    """

    config_class = MagnitudeConfig
    requires_calibration = False

    def prune_layer(self, name: str, layer: nn.Module, stats: list[Collector], config: PruningConfig) -> None:
        weight = weight_matrix(layer)
        mask = pattern_mask(weight.abs().float(), config.pattern, per_row=False)
        set_weight_matrix(layer, weight.masked_fill(mask, 0))
