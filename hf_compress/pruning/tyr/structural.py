"""What the structural pruners (Týr, block removal) share: their report and their base class.

Example:
    >>> report = StructuredPruningReport("tyr", 0.3, dense_parameters=1000, pruned_parameters=700)
    >>> round(report.achieved_sparsity, 3)
    0.3
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ...hub import hub_model_id
from ..base import BasePruner, _check_save_dir
from ..config import PruningConfig
from ...formats.slim import save_slim
from .config import StructuralPruningConfig


__all__ = ["StructuralPruner", "StructuredPruningReport"]


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

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "achieved_sparsity": self.achieved_sparsity}


class StructuralPruner(BasePruner):
    """Base of pruners that remove whole structures under a global budget; they implement ``prune`` itself.

    There is no per-layer hook (a structure spans several layers); a bare number is a ``target_sparsity``;
    ``_prepare`` checks the call before any work and ``_save`` writes the slim checkpoint with its card.
    """

    config_class = StructuralPruningConfig

    def prune_layer(self, name: str, layer: nn.Module, stats: list, config: PruningConfig) -> None:
        raise TypeError(f"{type(self).__name__} removes whole structures across a block; call prune().")

    def _check_config(self, config: PruningConfig | float | str | None) -> PruningConfig:
        if isinstance(config, (float, int)) and not isinstance(config, bool):
            return self.config_class(target_sparsity=float(config))
        return super()._check_config(config)

    def _prepare(self, config: Any, tokenizer: Any, save_dir: str | os.PathLike | None, overwrite: bool) -> Any:
        config = self._check_config(config)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if save_dir is not None:
            _check_save_dir(Path(save_dir), overwrite, self.model)
        return config

    def _save(self, save_dir: Path, overwrite: bool, recipe: dict[str, Any] | None = None) -> None:  # type: ignore[override]
        save_slim(self.model, self.tokenizer, save_dir, overwrite=overwrite, recipe=recipe,
                  base_model=hub_model_id(getattr(self.model.config, "name_or_path", None)))
