"""The pruning steps of ``hf-compress demo``: each one-shot pruner at 2:4 on a small calibration set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..demo import DemoMethod
from . import MagnitudeConfig, SparseGPTConfig, WandaConfig  # each from its method's package
from .config import PruningConfig
from .storage import save_pruned


# The demo prunes with 32 calibration windows of 512 tokens (the benchmark uses 128) to stay within
# minutes on a 2-core CPU.
DEMO_CONFIGS: tuple[PruningConfig, ...] = (
    MagnitudeConfig(sparsity="2:4"),
    WandaConfig(sparsity="2:4", num_calibration_sequences=32),
    SparseGPTConfig(sparsity="2:4", num_calibration_sequences=32),
)


def demo_methods() -> list[DemoMethod]:
    """One :class:`~hf_compress.demo.DemoMethod` per config in :data:`DEMO_CONFIGS`.

    Example:
        >>> [m.name for m in demo_methods()]
        ['magnitude-2of4', 'wanda-2of4', 'sparsegpt-2of4']
    """
    return [_method(config) for config in DEMO_CONFIGS]


def _method(config: PruningConfig) -> DemoMethod:
    from . import PRUNERS

    def apply(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, calibration,
              progress: bool = True) -> tuple[PreTrainedModel, dict[str, Any]]:
        pruner = PRUNERS[config.method].from_pretrained(model, tokenizer=tokenizer)
        data = calibration if pruner.requires_calibration else None
        pruned = pruner.prune(config, data, tokenizer=tokenizer, progress=progress)
        return pruned, {**config.to_dict(), "overall_sparsity": pruner.report.overall_sparsity}

    def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, progress: bool = True) -> None:
        save_pruned(model, tokenizer, folder, recipe=config, progress=progress)

    sparsity = str(config.sparsity).replace(":", "of")
    return DemoMethod(f"{config.method}-{sparsity}", f"{config.method} pruning to {config.sparsity}", apply, save)
