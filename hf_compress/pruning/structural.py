"""``StructuralPruner``: the family of pruners that remove whole structures under a global budget.

The lifecycle (``BasePruner.prune``) is the same as for every pruner; a structural method fills four
stages, each a hook:

- ``plan(config)``: what the target means for this model (checked before any calibration);
- ``calibrate(config, plan, calibration_ids, progress)``: measure on calibration data;
- ``decide(config, plan, evidence, progress)``: choose what to remove;
- ``shrink(decision)``: remove it (the model becomes physically smaller);

then the base records the report (parameters before and after, the per-layer widths, stage times) and
saves a slim checkpoint with its card (``formats.slim``). Block removal and Týr are the two methods.

Example:
    >>> report = StructuredPruningReport("tyr", 0.3, dense_parameters=1000, pruned_parameters=700)
    >>> round(report.achieved_sparsity, 3)
    0.3
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..formats.slim import measurable_widths, save_slim, sync_slim_format
from ..hub import base_model_of
from ..modeling.structure import decoder_parameter_count
from ..utils import get_logger
from .base import BasePruner
from .config import CALIBRATION_DATA_KEY, PruningConfig, SparsityPattern, StructuralPruningConfig, parse_sparsity


__all__ = ["StructuralPruner", "StructuredPruningReport"]

logger = get_logger(__name__)


@dataclass
class StructuredPruningReport:
    """What a structural pruner removed (``pruner.report``)."""

    method: str
    target_sparsity: float
    dense_parameters: int
    pruned_parameters: int
    layers: list[dict[str, int]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of the decoder blocks' parameters removed."""
        return 1 - self.pruned_parameters / self.dense_parameters

    def summary(self) -> str:
        """One line for logs and the command line."""
        return (f"{self.method} {self.target_sparsity:g}: removed {self.achieved_sparsity:.4f} of decoder parameters "
                f"({self.dense_parameters} -> {self.pruned_parameters})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "achieved_sparsity": self.achieved_sparsity}


class StructuralPruner(BasePruner):
    """Base of pruners that remove whole heads, channels or blocks; a bare number given to ``prune`` is a
    ``target_sparsity``. Subclasses set ``config_class`` and implement ``calibrate``, ``decide`` and
    ``shrink`` (``plan`` and ``describe`` optionally)."""

    config_class = StructuralPruningConfig

    def config_for_target(self, target: float | str | SparsityPattern) -> PruningConfig:
        # The config parses the target and refuses N:M patterns itself.
        return self.config_class(target_sparsity=parse_sparsity(target).to_json())

    # ---------------------------------------------------------------------------------------- the stages

    @abstractmethod
    def calibrate(self, config: Any, plan: Any, calibration_ids: torch.Tensor | None, progress: bool) -> Any:
        """Measure what ``decide`` needs on the calibration windows (the model is still dense)."""

    @abstractmethod
    def decide(self, config: Any, plan: Any, evidence: Any, progress: bool) -> Any:
        """Choose the structures to remove."""

    @abstractmethod
    def shrink(self, decision: Any) -> None:
        """Remove the chosen structures from ``self.model``."""

    def describe(self, decision: Any) -> dict[str, Any]:
        """Report fields beyond the counts (``history``, ``extra``, more ``seconds``)."""
        return {}

    def recipe(self, config: Any) -> dict[str, Any]:
        """What the saved checkpoint's card and ``quantization_config`` record about this run."""
        report = self.report
        recorded = {
            **config.to_dict(),
            "achieved_sparsity": round(report.achieved_sparsity, 6),
            "decoder_parameters": {"dense": report.dense_parameters, "pruned": report.pruned_parameters},
        }
        if self.calibration_data:  # every structural method calibrates: say on what, as the mask pruners do
            recorded[CALIBRATION_DATA_KEY] = self.calibration_data
        return recorded

    # ------------------------------------------------------------------------------------------ lifecycle

    def run(self, config: Any, plan: Any, calibration_ids: torch.Tensor | None, progress: bool) -> StructuredPruningReport:
        dense_parameters = decoder_parameter_count(self.model)
        seconds = {}
        begin = time.perf_counter()
        evidence = self.calibrate(config, plan, calibration_ids, progress)
        seconds["calibrate"] = time.perf_counter() - begin
        decision = self.decide(config, plan, evidence, progress)
        seconds["decide"] = time.perf_counter() - begin - seconds["calibrate"]
        self.shrink(decision)
        seconds["total"] = time.perf_counter() - begin
        details = self.describe(decision)
        report = StructuredPruningReport(
            config.method, config.target_sparsity, dense_parameters, decoder_parameter_count(self.model),
            layers=measurable_widths(self.model) or [], history=details.get("history", []),
            seconds={**seconds, **details.get("seconds", {})}, extra=details.get("extra", {}),
        )
        logger.info("%s: %d -> %d decoder parameters (%.2f%% removed, target %.2f%%)", type(self).__name__,
                    report.dense_parameters, report.pruned_parameters, 100 * report.achieved_sparsity,
                    100 * config.target_sparsity)
        # The widths go on the config now, not only in save(): the user's own save_pretrained / push_to_hub of the
        # returned model must write a checkpoint that loads back (else removed or narrowed layers reload random).
        self.report = report
        if getattr(self.model, "config", None) is not None:  # a bare nn.Module has no config to write
            sync_slim_format(self.model, self.recipe(config))
        return report

    def save(self, save_dir: Path, overwrite: bool, config: PruningConfig, progress: bool = True) -> None:
        save_slim(self.model, self.tokenizer, save_dir, overwrite=overwrite, recipe=self.recipe(config),
                  base_model=base_model_of(self.model.config))  # a pruned folder's config names the original
