"""SDS (Sparse-Dense-Sparse, Li et al., COLING 2025): re-dense a pruned block, then prune it again.

A one-shot pruner leaves each block with a weight distribution that was never meant to be sparse.
SDS re-activates the pruned connections and re-fits the *dense* weights by layer-wise distillation
against the original block, with a regulariser that keeps the re-activated weights small, so that a
second prune with the same method removes little of what the block needs.

All three steps run inside one sequential pass (``for_each_block`` with the dense outputs kept): for
block *i* the first prune, the re-dense training and the second prune all see the same inputs, the
outputs of the already finished blocks *0..i-1*, and the teacher is the original dense block on those
inputs. Doing it in one pass rather than three whole-model passes needs a third of the calibration
forwards and trains each block on exactly the inputs it will receive in the final model.

Per block, ``pruner.report.blocks`` records the relative reconstruction error after the first prune,
after re-densing, after the second prune (and after the optional mask-fixed tuning), the fraction
of the first prune's zeros that the second prune selects again, and whether the block was reverted to
the first prune's weights because SDS did not lower its error (``revert_if_worse``).

Example:
    >>> from hf_compress.pruning import SDSConfig, SDSPruner
    >>> pruner = SDSPruner.from_pretrained("tiny-llama")
    >>> config = SDSConfig(sparsity="2:4", base="wanda", num_calibration_sequences=4, calibration_seq_len=32)
    >>> model = pruner.prune(config, calibration_dataset=["calibration text " * 40], progress=False)
    >>> pruner.report.overall_sparsity, sorted(pruner.report.blocks[0])[:3]
    (0.5, ['block', 'error_after_first_prune', 'error_after_redense'])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...modeling import (
    BlockContext,
    Collector,
    reconstruction_error,
    train_block_reconstruction,
    weight_matrix,
)
from ...utils import get_logger
from ..config import PruningConfig
from ..mask_pruner import LayerReport, MaskPruner, PruningReport
from ..registry import PRUNERS
from ..sparsegpt.sparsify import _PRUNED_BEFORE as PRUNED_BEFORE
from .config import SDSConfig


__all__ = ["SDSPruner"]

logger = get_logger(__name__)


class SDSPruner(MaskPruner):
    """Sparse → dense → sparse around a one-shot base pruner (``SDSConfig.base``).

    Example:
        >>> pruner = SDSPruner.from_pretrained("smollm2-135m")  # doctest: +SKIP
        >>> pruner.prune(SDSConfig(sparsity="2:4", base="sparsegpt"), load_text("wikipedia", "calibration"),
        ...              save_dir="smollm2-sds-2of4")  # doctest: +SKIP
    """

    config_class = SDSConfig
    keeps_dense_outputs = True
    prunes_fused_experts = False  # its dense step trains nn.Linear parameters; fused experts stay dense, with a warning
    _base_pruner: tuple[PruningConfig, MaskPruner, PruningConfig] | None = None

    def _base(self, config: PruningConfig) -> tuple[MaskPruner, PruningConfig]:
        # One base pruner per prune() call: SparseGPT's collectors share a cache owned by their pruner.
        if self._base_pruner is None or self._base_pruner[0] is not config:
            assert isinstance(config, SDSConfig)
            base_config = config.base_config()
            self._base_pruner = (config, PRUNERS[base_config.method](self.model, self.tokenizer), base_config)
        return self._base_pruner[1], self._base_pruner[2]

    def collectors_for(self, name: str, layer: nn.Module, config: PruningConfig) -> list[Collector] | None:
        base, base_config = self._base(config)
        return base.collectors_for(name, layer, base_config)

    def prune_layer(self, name: str, layer: nn.Module, stats: list[Collector], config: PruningConfig) -> None:
        base, base_config = self._base(config)
        base.prune_layer(name, layer, stats, base_config)

    def prune_calibrated_block(
        self, ctx: BlockContext, config: PruningConfig, report: PruningReport
    ) -> list[LayerReport]:
        assert isinstance(config, SDSConfig) and ctx.dense_outputs is not None
        base, base_config = self._base(config)
        layers, teacher = ctx.linear_layers, ctx.dense_outputs
        if not layers:  # every layer of the block is skipped: nothing to prune, re-dense or tune
            return []
        weights = [layer.weight for layer in layers.values()]
        scales = {name: _scales(layer.weight) for name, layer in layers.items()}  # of the dense weights
        # A layer pruned before (>= 10% exact zeros, SparseGPT's keep_zeros threshold) keeps those zeros fixed: the
        # base pruners select them first, and re-dense must not bring them back (the result is the union of masks).
        earlier = {name: layer.weight == 0 for name, layer in layers.items()
                   if int((layer.weight == 0).sum()) >= PRUNED_BEFORE * layer.weight.numel()}

        # (1) first sparse step
        base.prune_block(ctx.name, layers, ctx.stats, base_config)
        first = {name: layer.weight.detach().clone() for name, layer in layers.items()}
        diagnostics: dict[str, Any] = {
            "block": ctx.name, "error_after_first_prune": reconstruction_error(ctx, teacher),
        }

        # (2) re-dense: all weights trainable again (pruned ones restart at zero), distilled from the
        #     dense block; the zeros of an earlier prune stay zero
        if config.redense_epochs:
            fixed = [(layer.weight, ~earlier[name]) for name, layer in layers.items() if name in earlier]

            def keep_earlier_zeros() -> None:
                for weight, kept in fixed:
                    weight.mul_(kept)

            diagnostics["redense_loss_per_epoch"] = train_block_reconstruction(
                ctx, teacher, weights, epochs=config.redense_epochs,
                learning_rate=config.redense_learning_rate, relative_learning_rate=True,
                regularizer=_regularizer(layers, scales, first, config), seed=config.calibration_seed,
                after_step=keep_earlier_zeros if fixed else None,
            )
        diagnostics["error_after_redense"] = reconstruction_error(ctx, teacher)

        # (3) second sparse step, on fresh statistics of the re-densed block
        stats = {}
        if base.requires_calibration:
            stats = ctx.collect(lambda name, layer: base.collectors_for(name, layer, base_config))
        reports = base.prune_block(ctx.name, layers, stats, base_config)
        diagnostics["error_after_second_prune"] = reconstruction_error(ctx, teacher)
        # of the zeros this first prune added (an earlier prune's stay zero anyway)
        pruned_first = {name: (first[name] == 0) & ~earlier[name] if name in earlier else first[name] == 0
                        for name in layers}
        again = sum(int((pruned_first[name] & (layer.weight == 0)).sum()) for name, layer in layers.items())
        total = sum(int(mask.sum()) for mask in pruned_first.values())
        diagnostics["reselected_fraction"] = again / total if total else 1.0

        # (4) optional mask-fixed tuning of the survivors
        if config.final_tuning_epochs:
            keep = [weight != 0 for weight in weights]

            def remask() -> None:
                for weight, mask in zip(weights, keep, strict=True):
                    weight.mul_(mask)

            train_block_reconstruction(
                ctx, teacher, weights, epochs=config.final_tuning_epochs,
                learning_rate=config.final_tuning_learning_rate, relative_learning_rate=True,
                after_step=remask, seed=config.calibration_seed,
            )
            diagnostics["error_after_final_tuning"] = reconstruction_error(ctx, teacher)

        final = diagnostics.get("error_after_final_tuning", diagnostics["error_after_second_prune"])
        diagnostics["reverted"] = config.revert_if_worse and final > diagnostics["error_after_first_prune"]
        if diagnostics["reverted"]:
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.weight.copy_(first[name])
            logger.warning("%s: SDS did not lower the block's reconstruction error; kept the first prune.",
                           ctx.name)
        _log(diagnostics)
        report.blocks.append(diagnostics)
        return _refresh(reports, layers)


def _log(diagnostics: dict[str, Any]) -> None:
    tuned = diagnostics.get("error_after_final_tuning")
    logger.info(
        "%s: reconstruction error %.4g after the first prune, %.4g re-densed, %.4g after the second prune%s; "
        "%.1f%% of the first zeros selected again",
        diagnostics["block"], diagnostics["error_after_first_prune"], diagnostics["error_after_redense"],
        diagnostics["error_after_second_prune"],
        "" if tuned is None else f", {tuned:.4g} tuned", 100 * diagnostics["reselected_fraction"],
    )


def _scales(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean|W|`` and ``mean W²`` of a dense weight: the normalisers of ``R_sparse`` and ``R_anchor``."""
    weight = weight.detach().float()
    return weight.abs().mean().clamp_min(1e-12), weight.pow(2).mean().clamp_min(1e-24)


def _regularizer(
    layers: dict[str, nn.Module],
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]],
    first: dict[str, torch.Tensor],
    config: SDSConfig,
) -> Callable[[], torch.Tensor] | None:
    """``λ_sp · R_sparse + λ_anchor · R_anchor`` averaged over the block's layers (see ``SDSConfig``)."""
    if not config.sparse_regularization and not config.anchor_regularization:
        return None
    terms = []
    for name, layer in layers.items():
        pruned = (first[name] == 0).float()
        everywhere = config.sparse_regularization_target == "all"
        penalised = torch.ones_like(pruned) if everywhere else pruned
        terms.append((layer.weight, penalised, 1.0 - pruned, first[name].float(), *scales[name]))
    count = len(terms)

    def regularizer() -> torch.Tensor:
        total = torch.zeros((), device=terms[0][0].device)
        for weight, penalised, kept, start, l1_scale, l2_scale in terms:
            if config.sparse_regularization:
                total = total + config.sparse_regularization * (weight * penalised).abs().mean() / l1_scale
            if config.anchor_regularization:
                drift = ((weight - start) * kept).pow(2).mean() / l2_scale
                total = total + config.anchor_regularization * drift
        return total / count

    return regularizer


def _refresh(reports: list[LayerReport], layers: dict[str, nn.Module]) -> list[LayerReport]:
    # Mask-fixed tuning cannot add non-zeros but may leave more exact zeros: count them again.
    # prune_block reports the layers in the order it was given them.
    for report, layer in zip(reports, layers.values(), strict=True):
        weight = weight_matrix(layer)
        report.zeros = int((weight == 0).sum())
        report.sparsity = report.zeros / weight.numel()
    return reports
