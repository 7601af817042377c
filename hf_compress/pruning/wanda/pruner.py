"""Wanda (Sun et al., 2023): prune by ``|W_ij| · ‖X_j‖₂`` within each output row; no weight update.

``‖X_j‖₂`` is the L2 norm of input feature ``j`` over every calibration token the layer sees
(``InputNormCollector``); the blocks are visited in order, each calibrated on the outputs of the
already pruned ones. Unstructured: each row loses its ``floor(s · in_features)`` lowest scores. N:M:
each group of M consecutive input weights of a row keeps its N highest scores.

Example:
    >>> from hf_compress.pruning import WandaConfig, WandaPruner
    >>> pruner = WandaPruner.from_pretrained("tiny-qwen3")
    >>> config = WandaConfig(sparsity="2:4", num_calibration_sequences=4, calibration_seq_len=32)
    >>> model = pruner.prune(config, calibration_dataset=["calibration text " * 20], progress=False)
    >>> pruner.report.overall_sparsity
    0.5
"""

from __future__ import annotations

import torch
from torch import nn

from ...modeling import Collector, InputNormCollector, set_weight_matrix, weight_matrix
from ..config import PruningConfig
from ..mask_pruner import MaskPruner
from ..masks import pattern_mask
from .config import WandaConfig


__all__ = ["WandaPruner", "wanda_scores"]


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` for an ``[out, in]`` weight and the ``[in]`` input-feature norms (fp32).

    Example:
        >>> wanda_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 1.0]))
        tensor([[3., 2.]])
    """
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(f"expected {weight.shape[1]} input norms, got shape {list(input_norms.shape)}.")
    return weight.abs().float() * input_norms.float().to(weight.device).unsqueeze(0)


class WandaPruner(MaskPruner):
    """Wanda: weights times input activation norms, compared per output row.

    Example:
        >>> pruner = WandaPruner.from_pretrained("smollm2-135m")  # doctest: +SKIP
        >>> pruner.prune(WandaConfig(sparsity="2:4"), load_text("wikipedia", "calibration"))  # doctest: +SKIP
    """

    config_class = WandaConfig

    def collectors_for(self, name: str, layer: nn.Module, config: PruningConfig) -> list[Collector]:
        return [InputNormCollector()]

    def prune_layer(self, name: str, layer: nn.Module, stats: list[Collector], config: PruningConfig) -> None:
        norms = next((s for s in stats if isinstance(s, InputNormCollector)), None)
        if norms is None or norms.sum_squares is None:
            raise RuntimeError(f"{name} received no calibration inputs; Wanda cannot score it. Leave it dense with "
                               f"skip={[name]!r}.")
        weight = weight_matrix(layer)
        mask = pattern_mask(wanda_scores(weight, norms.norms), config.pattern, per_row=True)
        set_weight_matrix(layer, weight.masked_fill(mask, 0))
