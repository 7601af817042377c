"""``MaskPruner``: the family of pruners that zero weights inside every linear layer, block by block.

A method implements one or two hooks:

- ``collectors_for(name, layer, config)``: the statistic collectors a linear layer needs from its
  calibration inputs (``InputNormCollector`` for Wanda, ``HessianCollector`` for SparseGPT);
  nothing for methods without calibration (``requires_calibration = False``);
- ``prune_layer(name, layer, stats, config)``: zero (and possibly update) the layer's weights in
  place, reading and writing them as ``[out_features, in_features]`` (``weight_matrix`` /
  ``set_weight_matrix``, so GPT-2's ``Conv1D`` needs no special case).

Everything else (discovering the decoder blocks and their linear layers, the sequential block-by-block
pass of ``hf_compress.modeling.for_each_block``, the N:M width check, the per-layer report and the sparse
checkpoint) lives here once. ``prune_calibrated_block`` lets a wrapper (SDS) also train each block.

Example:
    >>> from hf_compress.pruning import MagnitudeConfig, MagnitudePruner
    >>> pruner = MagnitudePruner.from_pretrained("tiny-llama")
    >>> model = pruner.prune(MagnitudeConfig(sparsity="2:4"), progress=False)
    >>> pruner.report.overall_sparsity
    0.5
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..modeling import (
    BlockContext,
    Collector,
    find_decoder_blocks,
    find_linear_layers,
    for_each_block,
    in_features,
    onloaded,
    set_weight_matrix,
    weight_matrix,
)
from ..modeling.fused_experts import ExpertProjection, check_fused_experts_readable, warn_fused_experts_untouched
from ..modeling.layers import check_not_disk_offloaded, check_skip_patterns, missing_weights
from ..utils import get_logger, progress_bar
from .base import BasePruner
from .config import PruningConfig, SparsityPattern
from .masks import pattern_mask


__all__ = ["LayerReport", "MaskPruner", "PruningReport"]

logger = get_logger(__name__)


@dataclass
class LayerReport:
    """What pruning did to one linear layer.

    Attributes:
        name: qualified module name (``"model.layers.0.self_attn.q_proj"``).
        shape: ``[out_features, in_features]``.
        zeros: exactly-zero weights after pruning.
        sparsity: ``zeros / (out_features · in_features)``.
        seconds: wall time of the method's ``prune_layer`` call.
    """

    name: str
    shape: tuple[int, int]
    zeros: int
    sparsity: float
    seconds: float


@dataclass
class PruningReport:
    """Per-layer results of one ``prune`` call (``pruner.report``).

    Example:
        >>> report = PruningReport("magnitude", "2:4", [LayerReport("fc", (2, 4), 4, 0.5, 0.0)], 0.1)
        >>> report.overall_sparsity, report.to_dict()["layers"][0]["name"]
        (0.5, 'fc')
    """

    method: str
    sparsity: float | str
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    blocks: list[dict[str, Any]] = field(default_factory=list)
    """Per-block diagnostics of methods that keep some (SDS: reconstruction errors, mask overlap)."""

    @property
    def overall_sparsity(self) -> float:
        """Zeros over weights, across every pruned layer."""
        total = sum(layer.shape[0] * layer.shape[1] for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    def summary(self) -> str:
        """One line for logs and the command line."""
        return f"{self.method} {self.sparsity}: overall sparsity {self.overall_sparsity:.4f}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (layer shapes as lists)."""
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "seconds": self.seconds,
            "overall_sparsity": self.overall_sparsity,
            "layers": [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers],
            **({"blocks": self.blocks} if self.blocks else {}),
        }


class MaskPruner(BasePruner):
    """Base of pruners that zero weights inside each linear layer; saved as a sparse checkpoint.

    Subclasses set ``config_class`` and implement ``prune_layer`` (and ``collectors_for`` if
    ``requires_calibration``).
    """

    cli_defaults: ClassVar[dict[str, Any]] = {"sparsity": "2:4"}  # the pattern sparse hardware runs
    keeps_dense_outputs: ClassVar[bool] = False
    """Whether ``prune_calibrated_block`` needs ``ctx.dense_outputs`` (the block's outputs before pruning)."""
    prunes_fused_experts: ClassVar[bool] = True
    """Whether the experts of a mixture-of-experts model stored as 3-D parameters are pruned too, each expert's
    projection as a linear layer (``modeling.fused_experts``); a method that needs real ``nn.Linear`` parameters
    (SDS trains them) sets it false, and those weights are left dense with a warning."""

    # ---------------------------------------------------------------------------------------- the hooks

    def collectors_for(self, name: str, layer: nn.Module, config: PruningConfig) -> list[Collector] | None:
        """Collectors to feed with ``layer``'s calibration inputs (``name`` is relative to its block)."""
        return None

    @abstractmethod
    def prune_layer(self, name: str, layer: nn.Module, stats: list[Collector], config: PruningConfig) -> None:
        """Prune one linear layer in place to ``config.pattern``.

        Args:
            name: the layer's name relative to its decoder block (``"self_attn.q_proj"``).
            layer: an ``nn.Linear`` or ``Conv1D``; use ``weight_matrix`` / ``set_weight_matrix``.
            stats: the collectors ``collectors_for`` returned, filled with this block's calibration
                inputs (empty for methods without calibration).
            config: the validated config of this ``prune`` call.
        """

    # ------------------------------------------------------------------------------------------ lifecycle

    def plan(self, config: PruningConfig) -> int:
        """Check that the weights are loaded, that some layer is left to prune and that N:M groups fit every
        layer; returns the layer count."""
        _check_weights_loaded(self.model)
        return self._check_layers(config)

    def run(self, config: PruningConfig, plan: Any, calibration_ids: torch.Tensor | None, progress: bool) -> PruningReport:
        logger.info(
            "%s: pruning %d linear layers to %s%s", type(self).__name__, plan, _describe(config.pattern),
            f" (skip {config.skip})" if config.skip else "",
        )
        report = PruningReport(method=config.method, sparsity=config.sparsity)
        start = time.perf_counter()
        if calibration_ids is None:
            self._prune_without_calibration(config, report, progress)
        else:
            def callback(ctx: BlockContext) -> None:  # one decoder block, its statistics collected
                report.layers.extend(self.prune_calibrated_block(ctx, config, report))

            for_each_block(
                self.model, calibration_ids, callback,
                collectors_for=lambda name, layer: self.collectors_for(name, layer, config),
                skip=config.skip, batch_size=config.batch_size, progress=progress,
                keep_dense_outputs=self.keeps_dense_outputs,
                return_outputs=False,  # the last block's outputs feed nothing: skip its re-run
                fused_experts=self.prunes_fused_experts,
            )
        report.seconds = time.perf_counter() - start
        logger.info(
            "%s: %d layers pruned to %.2f%% overall sparsity in %.1fs", type(self).__name__,
            len(report.layers), 100 * report.overall_sparsity, report.seconds,
        )
        return report

    def save(self, save_dir: Path, overwrite: bool, config: PruningConfig, progress: bool = True) -> None:
        from .storage import save_pruned  # sparse on-disk format; records model.config.hf_compress["pruning"]

        save_pruned(self.model, self.tokenizer, save_dir, overwrite=overwrite, progress=progress)

    def prune_calibrated_block(
        self, ctx: BlockContext, config: PruningConfig, report: PruningReport
    ) -> list[LayerReport]:
        """Prune one decoder block whose calibration statistics are in ``ctx.stats``; return its layer reports.

        The default prunes each layer once (``prune_block``); wrappers that also train the block (SDS)
        override it and may add per-block diagnostics to ``report.blocks``.
        """
        return self.prune_block(ctx.name, ctx.linear_layers, ctx.stats, config)

    def prune_block(
        self,
        block_name: str,
        layers: dict[str, nn.Module],
        stats: dict[str, list[Collector]],
        config: PruningConfig,
    ) -> list[LayerReport]:
        """Prune the given linear layers of one decoder block (weights already on their device).

        Reusable by wrappers (SDS) that drive ``for_each_block`` themselves.
        """
        _check_every_layer_reached(type(self).__name__, block_name, layers, stats)
        reports = []
        unrouted = 0
        for name, layer in layers.items():
            begin = time.perf_counter()
            layer_stats = stats.get(name, [])
            if layer_stats and isinstance(layer, ExpertProjection) and all(getattr(s, "num_tokens", None) == 0 for s in layer_stats):
                # The router sent this expert no calibration token: there is nothing to weigh its inputs by, so it
                # is pruned by weight magnitude (Wanda with equal input norms).
                _prune_by_magnitude(layer, config.pattern)
                unrouted += 1
            else:
                self.prune_layer(name, layer, layer_stats, config)
            seconds = time.perf_counter() - begin
            weight = weight_matrix(layer)
            zeros = int((weight == 0).sum())
            entry = LayerReport(
                name=f"{block_name}.{name}", shape=(weight.shape[0], weight.shape[1]), zeros=zeros,
                sparsity=zeros / weight.numel(), seconds=seconds,
            )
            logger.debug("%s %s: sparsity %.4f (%.2fs)", entry.name, list(entry.shape), entry.sparsity,
                         seconds)
            reports.append(entry)
        if reports:
            zeros = sum(r.zeros for r in reports)
            total = sum(r.shape[0] * r.shape[1] for r in reports)
            logger.info("%s: %d layers, sparsity %.2f%%, %.2fs", block_name, len(reports),
                        100 * zeros / total, sum(r.seconds for r in reports))
        if unrouted:
            logger.warning("%s: %d expert projections received no calibration token and were pruned by weight "
                           "magnitude; more calibration sequences route tokens to more experts", block_name, unrouted)
        return reports

    # ---------------------------------------------------------------------------------------- internals

    def _block_layers(self, block_name: str, block: nn.Module, skip: Sequence[str]) -> dict[str, nn.Module]:
        # as for_each_block selects
        return find_linear_layers(block, skip, qualified_prefix=block_name, fused_experts=self.prunes_fused_experts)

    def _check_layers(self, config: PruningConfig) -> int:
        block_name, blocks = find_decoder_blocks(self.model)  # ValueError for a model without blocks
        check_skip_patterns(self.model, config.skip)
        layers = {
            f"{block_name}.{index}.{name}": layer
            for index, block in enumerate(blocks)
            for name, layer in self._block_layers(f"{block_name}.{index}", block, config.skip).items()
        }
        if not layers:
            raise ValueError(
                f"no prunable layers: the {len(blocks)} decoder blocks of {type(self.model).__name__} "
                f"hold no nn.Linear/Conv1D left after skip={config.skip}."
            )
        if not any(isinstance(layer, ExpertProjection) for layer in layers.values()):  # no expert read as linear layers (SDS, or a layout not recognised): say what stays dense
            warn_fused_experts_untouched(self.model, type(self).__name__)
        else:  # before any block changes: an experts layout read wrongly is refused now, not halfway through
            check_fused_experts_readable(self.model)
        pattern = config.pattern
        if pattern.is_n_m:
            group = pattern.group_size or 1
            bad = [name for name, layer in layers.items() if in_features(layer) % group]
            if bad:
                shown = ", ".join(f"{name} ({in_features(layers[name])} inputs)" for name in bad[:5])
                raise ValueError(
                    f"{len(bad)} layers cannot hold {pattern} groups: their input width is not a multiple "
                    f"of {group}: {shown}{', ...' if len(bad) > 5 else ''}. Leave them dense with skip "
                    f"patterns (e.g. skip=['*{bad[0].rsplit('.', 1)[-1]}'])."
                )
        return len(layers)

    def _prune_without_calibration(
        self, config: PruningConfig, report: PruningReport, progress: bool
    ) -> None:
        block_name, blocks = find_decoder_blocks(self.model)
        bar = progress_bar(blocks, desc="pruning", unit="block", disable=not progress, leave=False)
        with torch.no_grad():
            for index, block in enumerate(bar):
                name = f"{block_name}.{index}"
                layers = self._block_layers(name, block, config.skip)
                with onloaded(block):  # accelerate-offloaded weights are edited in place and written back
                    report.layers.extend(self.prune_block(name, layers, {}, config))


def _check_weights_loaded(model: nn.Module) -> None:
    """Refuse a model with weights on the ``meta`` device that accelerate does not hold offloaded elsewhere
    (built under ``init_empty_weights``/``torch.device("meta")``, never loaded): nothing to prune or calibrate.
    CPU-offloaded models (``cpu_offload``, ``device_map`` with ``"cpu"``) are pruned block by block; disk-offloaded
    ones are refused (``check_not_disk_offloaded``: accelerate would drop the pruned weights)."""
    check_not_disk_offloaded(model, "the pruned weights")
    empty = missing_weights(model)
    if empty:
        raise ValueError(
            f"{len(empty)} weights of {type(model).__name__} are on the 'meta' device with no offloaded copy "
            f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}): the model was built without its weights. "
            "Load it with from_pretrained (device_map offloading is supported) before pruning."
        )


def _check_every_layer_reached(method: str, block_name: str, layers: dict[str, nn.Module],
                               stats: dict[str, list[Collector]]) -> None:
    """Refuse, before any layer of the block is pruned, layers whose collectors saw no token (an expert the router
    sent none is handled apart): TrOCR's cross-attention does not run in a forward of token ids alone."""
    unreached = [name for name, layer in layers.items()
                 if not isinstance(layer, ExpertProjection) and stats.get(name)
                 and all(getattr(collector, "num_tokens", None) == 0 for collector in stats[name])]
    if unreached:
        # A module none of whose layers ran is skipped whole (TrOCR's encoder_attn.*); otherwise the layers by name,
        # so that the pattern keeps no layer dense that did run (Mamba's mixer.* would cover in_proj and out_proj).
        patterns = set()
        for name in unreached:
            parent = name.rpartition(".")[0]
            siblings = [other for other in layers if other.rpartition(".")[0] == parent]
            patterns.add(f"{parent}.*" if parent and set(siblings) <= set(unreached) else name)
        raise RuntimeError(
            f"{', '.join(unreached)} in {block_name} received no calibration inputs: they do not run in a forward of "
            "token ids alone (cross-attention needs encoder states; a block may read a layer's weight itself, as "
            f"Mamba's mixer does dt_proj's), so {method} has nothing to weigh them by. Nothing in {block_name} was "
            f"pruned. Leave them dense with skip={sorted(patterns)!r}, or prune them without calibration "
            "(MagnitudePruner)."
        )


def _prune_by_magnitude(layer: nn.Module, pattern: SparsityPattern) -> None:
    weight = weight_matrix(layer)
    set_weight_matrix(layer, weight.masked_fill(pattern_mask(weight.abs().float(), pattern, per_row=True), 0))


def _describe(pattern: SparsityPattern) -> str:
    if pattern.is_n_m:
        return f"{pattern} (at most {pattern.kept_per_group} non-zeros per {pattern.group_size} inputs)"
    return f"{100 * pattern.ratio:g}% unstructured"
