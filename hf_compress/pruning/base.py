"""The Optimum-style base class every pruner shares: load, validate, prune block by block, record, save.

A method subclasses ``BasePruner`` and implements one or two hooks:

- ``collectors_for(name, layer, config)``: the statistic collectors a linear layer needs from its
  calibration inputs (``InputNormCollector`` for Wanda, ``HessianCollector`` for SparseGPT);
  nothing for methods without calibration (``requires_calibration = False``);
- ``prune_layer(name, layer, stats, config)``: zero (and possibly update) the layer's weights in
  place, reading and writing them as ``[out_features, in_features]`` (``weight_matrix`` /
  ``set_weight_matrix``, so GPT-2's ``Conv1D`` needs no special case).

Everything else (discovering the decoder blocks and their linear layers, calibration windows, the
sequential block-by-block pass of ``hf_compress.modeling.for_each_block``, validation, the report,
the recipe stored in ``model.config`` and saving) lives here once.

Example:
    >>> from hf_compress.pruning import WandaConfig, WandaPruner
    >>> pruner = WandaPruner.from_pretrained("tiny-llama")
    >>> model = pruner.prune(WandaConfig(sparsity="2:4", num_calibration_sequences=4, calibration_seq_len=32),
    ...                      calibration_dataset=["some calibration text " * 20], progress=False)
    >>> round(pruner.report.overall_sparsity, 2)
    0.5
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..modeling import (
    BlockContext,
    Collector,
    calibration_batches,
    find_decoder_blocks,
    find_linear_layers,
    for_each_block,
    in_features,
    onloaded,
    weight_matrix,
)
from ..utils import get_logger
from .config import PruningConfig, SparsityPattern, parse_sparsity


if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


__all__ = ["BasePruner", "LayerReport", "PruningReport", "RECIPE_KEY"]

logger = get_logger(__name__)

RECIPE_KEY = "hf_compress"
"""Attribute of ``model.config`` holding ``{"pruning": config.to_dict(), "version": ...}`` after pruning."""

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


class BasePruner(ABC):
    """Base class of one-shot pruners: ``from_pretrained`` → ``prune(config, ...)`` → pruned model.

    Subclasses set ``config_class`` (the ``PruningConfig`` subclass they accept) and implement
    ``prune_layer`` (and ``collectors_for`` if ``requires_calibration``).

    Attributes:
        model: the model being pruned (pruned in place).
        tokenizer: used to tokenize calibration text and saved with the model.
        report: the ``PruningReport`` of the last ``prune`` call (``None`` before).

    Example:
        >>> pruner = MagnitudePruner.from_pretrained("tiny-gpt2")  # doctest: +SKIP
        >>> model = pruner.prune(MagnitudeConfig(sparsity=0.5), save_dir="out/")  # doctest: +SKIP
    """

    config_class: ClassVar[type[PruningConfig]] = PruningConfig
    requires_calibration: ClassVar[bool] = True
    keeps_dense_outputs: ClassVar[bool] = False
    """Whether ``prune_calibrated_block`` needs ``ctx.dense_outputs`` (the block's outputs before pruning)."""

    def __init__(
        self, model: PreTrainedModel | nn.Module, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs a torch model, got {type(model).__name__}.")
        self.model = model
        self.tokenizer = tokenizer
        self.report: PruningReport | None = None

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: PreTrainedModel | nn.Module | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **load_kwargs: Any,
    ) -> Self:
        """A pruner for a loaded model (used as is) or for a model to load.

        A name or path goes through ``hf_compress.assets.load_model`` (reference names such as
        ``"smollm2-135m"``, ``"tiny-<arch>"``, a local folder, a Hub id) when ``load_kwargs`` holds at
        most ``dtype``; with other keyword arguments (``device_map``, ``revision``, ...) it is loaded
        with ``AutoModelForCausalLM.from_pretrained(path, **load_kwargs)``. The tokenizer is loaded
        alongside unless one is given.

        Example:
            >>> pruner = SparseGPTPruner.from_pretrained("tiny-opt")  # doctest: +SKIP
            >>> pruner = SparseGPTPruner.from_pretrained(model, tokenizer)  # doctest: +SKIP
        """
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, tokenizer)
        name = os.fspath(model_or_path)
        if not set(load_kwargs) - {"dtype"}:
            from ..assets import load_model

            model, loaded_tokenizer = load_model(name, **load_kwargs)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(name, **load_kwargs).eval()
            loaded_tokenizer = AutoTokenizer.from_pretrained(name) if tokenizer is None else None
        return cls(model, tokenizer if tokenizer is not None else loaded_tokenizer)

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

    # ------------------------------------------------------------------------------------------ pruning

    def prune(
        self,
        config: PruningConfig | float | str | None = None,
        calibration_dataset: str | Sequence[str] | Dataset | torch.Tensor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        save_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        progress: bool = True,
    ) -> PreTrainedModel:
        """Prune every linear layer of every decoder block to ``config.sparsity``; returns the model.

        All inputs are checked before any weight changes: the config type, the ``save_dir`` (a folder
        that already holds a model raises ``FileExistsError`` unless ``overwrite``; saving needs a
        ``PreTrainedModel``), that some layer is left to prune and that every N:M layer's input width
        is a multiple of M (``ValueError``), and, for calibrated methods, that calibration text and a
        tokenizer are given and hold at least ``calibration_seq_len`` tokens (``ValueError``).

        The model is pruned in place, block by block (each block calibrated on the outputs of the
        already pruned ones); should a block fail midway, the in-memory model is left partly pruned
        and nothing is written. The recipe is recorded in ``model.config.hf_compress`` and per-layer
        results in ``self.report``. With ``save_dir`` the model is saved there with sparse weights
        through ``hf_compress.pruning.storage.save_pruned`` (an all-or-nothing write: a failure leaves
        no partial folder); ``AutoModelForCausalLM.from_pretrained(save_dir)`` loads it back.

        Args:
            config: a config of this pruner's ``config_class``, or just a sparsity (``"2:4"``, ``0.5``)
                for its defaults.
            calibration_dataset: text (a string, a list of strings, a ``datasets.Dataset`` with a
                ``text`` column) sampled into ``num_calibration_sequences`` windows of
                ``calibration_seq_len`` tokens, or a ``[num_sequences, seq_len]`` tensor of token ids
                used as is. Ignored (with a warning) by methods without calibration.
            tokenizer: overrides the pruner's tokenizer.
            save_dir: where to save the pruned model and tokenizer.
            overwrite: replace a model already in ``save_dir``.
            progress: show a progress bar over decoder blocks.

        Example:
            >>> pruner = SparseGPTPruner.from_pretrained("smollm2-135m")  # doctest: +SKIP
            >>> pruner.prune(SparseGPTConfig(sparsity="2:4"), load_text("wikipedia", "calibration"),
            ...              save_dir="smollm2-2of4")  # doctest: +SKIP
        """
        config = self._check_config(config)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if save_dir is not None:
            _check_save_dir(Path(save_dir), overwrite, self.model)
        layer_count = self._check_layers(config)
        calibration_ids = self._calibration_ids(config, calibration_dataset)

        pattern = config.pattern
        logger.info(
            "%s: pruning %d linear layers to %s%s", type(self).__name__, layer_count, _describe(pattern),
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
            )
        report.seconds = time.perf_counter() - start
        self.report = report
        logger.info(
            "%s: %d layers pruned to %.2f%% overall sparsity in %.1fs", type(self).__name__,
            len(report.layers), 100 * report.overall_sparsity, report.seconds,
        )
        self._record_recipe(config)
        if save_dir is not None:
            self._save(Path(save_dir), overwrite)
        return self.model  # type: ignore[return-value]

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
        reports = []
        for name, layer in layers.items():
            begin = time.perf_counter()
            self.prune_layer(name, layer, stats.get(name, []), config)
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
        return reports

    # ---------------------------------------------------------------------------------------- internals

    def _check_config(self, config: PruningConfig | float | str | None) -> PruningConfig:
        if config is None:
            raise ValueError(
                f"{type(self).__name__}.prune needs a {self.config_class.__name__} "
                "(or a sparsity such as '2:4')."
            )
        if isinstance(config, (str, float, int, SparsityPattern)) and not isinstance(config, bool):
            return self.config_class(sparsity=parse_sparsity(config).to_json())
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}."
            )
        return config

    def _block_layers(self, block_name: str, block: nn.Module, skip: Sequence[str]) -> dict[str, nn.Module]:
        return find_linear_layers(block, skip, qualified_prefix=block_name)  # as for_each_block selects

    def _check_layers(self, config: PruningConfig) -> int:
        block_name, blocks = find_decoder_blocks(self.model)  # ValueError for a model without blocks
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

    def _calibration_ids(
        self, config: PruningConfig, dataset: str | Sequence[str] | Dataset | torch.Tensor | None
    ) -> torch.Tensor | None:
        if not self.requires_calibration:
            if dataset is not None:
                logger.warning("%s needs no calibration data; calibration_dataset is ignored.",
                               type(self).__name__)
            return None
        if dataset is None:
            raise ValueError(
                f"{type(self).__name__} needs calibration_dataset: text (a string, a list of strings or a "
                "Dataset with a 'text' column) or a [num_sequences, seq_len] tensor of token ids."
            )
        if torch.is_tensor(dataset):
            if dataset.ndim != 2 or dataset.numel() == 0 or dataset.is_floating_point():
                raise ValueError(
                    f"calibration token ids must be a non-empty [num_sequences, seq_len] integer tensor, got "
                    f"shape {list(dataset.shape)} ({dataset.dtype})."
                )
            return dataset
        if isinstance(dataset, (list, tuple)) and not dataset:
            raise ValueError("calibration_dataset is empty; pass calibration text.")
        if self.tokenizer is None:
            raise ValueError(
                "calibration text needs a tokenizer: pass tokenizer= to prune() or from_pretrained(), or "
                "pass token ids."
            )
        try:
            return calibration_batches(
                dataset, self.tokenizer, num_sequences=config.num_calibration_sequences,
                seq_len=config.calibration_seq_len, seed=config.calibration_seed,
            )
        except ValueError as error:
            raise ValueError(f"calibration_dataset is unusable: {error}") from error

    def _prune_without_calibration(
        self, config: PruningConfig, report: PruningReport, progress: bool
    ) -> None:
        block_name, blocks = find_decoder_blocks(self.model)
        bar = tqdm(blocks, desc="pruning", unit="block", disable=not progress, leave=False)
        with torch.no_grad():
            for index, block in enumerate(bar):
                name = f"{block_name}.{index}"
                layers = self._block_layers(name, block, config.skip)
                with onloaded(block):  # accelerate-offloaded weights are edited in place and written back
                    report.layers.extend(self.prune_block(name, layers, {}, config))

    def _record_recipe(self, config: PruningConfig) -> None:
        model_config = getattr(self.model, "config", None)
        if model_config is None:
            return
        # A plain dict attribute is serialised into config.json and restored by from_pretrained (checked on
        # transformers 5.23); other hf_compress entries (e.g. a later quantization) are kept.
        recipe = dict(getattr(model_config, RECIPE_KEY, None) or {})
        recipe.update({"pruning": config.to_dict(), "version": __version__})
        setattr(model_config, RECIPE_KEY, recipe)

    def _save(self, save_dir: Path, overwrite: bool) -> None:
        from .storage import save_pruned  # sparse on-disk format; records model.config.hf_compress["pruning"]

        save_pruned(self.model, self.tokenizer, save_dir, overwrite=overwrite)


def _check_save_dir(save_dir: Path, overwrite: bool, model: nn.Module) -> None:
    # Import the storage now, not after minutes of pruning: a broken install fails before any work.
    from ..utils import holds_model

    if save_dir.exists() and not save_dir.is_dir():
        raise FileExistsError(f"save_dir {save_dir} is a file; pass a folder path.")
    if holds_model(save_dir) and not overwrite:
        raise FileExistsError(
            f"save_dir {save_dir} already holds a model; choose another folder or pass overwrite=True "
            "(--overwrite on the command line)."
        )
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"save_dir needs a transformers PreTrainedModel, got {type(model).__name__} (merge PEFT adapters "
            "first with merge_and_unload(), or prune without save_dir)."
        )


def _describe(pattern: SparsityPattern) -> str:
    if pattern.is_n_m:
        return f"{pattern} (at most {pattern.kept_per_group} non-zeros per {pattern.group_size} inputs)"
    return f"{100 * pattern.ratio:g}% unstructured"
