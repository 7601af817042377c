"""Pruning of Hugging Face causal LMs: magnitude, Wanda, SparseGPT and SDS behind one interface, plus
structural pruning that makes models physically smaller: Týr-the-Pruner (``TyrPruner``: heads and FFN
channels, per-layer widths found by supernet + search) and block removal (``BlockRemovalPruner``).

Every pruner loads like an Optimum class and prunes every linear layer of every decoder block
(discovered from the model: Llama-style, GPT-2's ``Conv1D``, OPT, ...) to an unstructured ratio or an
N:M pattern ("N:M" = at most N non-zeros in every M consecutive input weights of a row). Embeddings
and ``lm_head`` are never pruned; more layers can be left dense with ``skip`` patterns.

Example:
    >>> from hf_compress.assets import load_text
    >>> from hf_compress.pruning import SparseGPTConfig, SparseGPTPruner
    >>> pruner = SparseGPTPruner.from_pretrained("smollm2-135m")  # doctest: +SKIP
    >>> calibration = load_text("wikipedia", "calibration")  # doctest: +SKIP
    >>> config = SparseGPTConfig(sparsity="2:4")
    >>> model = pruner.prune(config, calibration, save_dir="smollm2-2of4/")  # doctest: +SKIP
"""

from .base import BasePruner, LayerReport, PruningReport
from .config import (
    MagnitudeConfig,
    PruningConfig,
    SDSConfig,
    SparseGPTConfig,
    SparsityPattern,
    WandaConfig,
    parse_sparsity,
)
from .magnitude import MagnitudePruner
from .masks import (
    check_pattern,
    expected_pruned_count,
    n_m_mask,
    pattern_mask,
    sparsity_of,
    unstructured_mask,
)
from .sds import SDSPruner
from .sparsegpt import SparseGPTPruner, sparsegpt_prune
from .tyr import BlockRemovalConfig, BlockRemovalPruner, TyrConfig, TyrPruner
from .wanda import WandaPruner, wanda_scores


PRUNERS: dict[str, type[BasePruner]] = {
    pruner.config_class.method: pruner
    for pruner in (MagnitudePruner, WandaPruner, SparseGPTPruner, SDSPruner, TyrPruner, BlockRemovalPruner)
}
"""Pruner class by method name (the ``method`` of its config)."""


__all__ = [
    "PRUNERS",
    "BasePruner",
    "BlockRemovalConfig",
    "BlockRemovalPruner",
    "LayerReport",
    "MagnitudeConfig",
    "MagnitudePruner",
    "PruningConfig",
    "PruningReport",
    "SDSConfig",
    "SDSPruner",
    "SparseGPTConfig",
    "SparseGPTPruner",
    "SparsityPattern",
    "TyrConfig",
    "TyrPruner",
    "WandaConfig",
    "WandaPruner",
    "check_pattern",
    "expected_pruned_count",
    "n_m_mask",
    "parse_sparsity",
    "pattern_mask",
    "sparsegpt_prune",
    "sparsity_of",
    "unstructured_mask",
    "wanda_scores",
]
