"""Pruning of Hugging Face causal LMs: magnitude, Wanda, SparseGPT and SDS behind one interface, plus
structural pruning that makes models physically smaller: Týr-the-Pruner (``TyrPruner``: heads and FFN
channels, per-layer widths found by supernet + search) and whole blocks or sub-blocks removed
(``BlockRemovalPruner`` = ShortGPT, ``SLEBPruner``, ``BlockPrunerPruner``).

Every pruner loads like an Optimum class and prunes every linear layer of every decoder block
(discovered from the model: Llama-style, GPT-2's ``Conv1D``, OPT, ...) to an unstructured ratio or an
N:M pattern ("N:M" = at most N non-zeros in every M consecutive input weights of a row). Embeddings
and ``lm_head`` are never pruned; more layers can be left dense with ``skip`` patterns.

One folder per method (``magnitude/``, ``wanda/``, ``sparsegpt/``, ``sds/``, ``tyr/``, ``block_removal/``,
``sleb/``, ``block_pruner/``),
each with its ``config.py`` and ``pruner.py``; the shared mechanisms (``base.py``, ``mask_pruner.py``,
``structural.py``, ``config.py``, ``masks.py``, ``storage.py``, ``registry.py``) live here once. Names load
on first use: ``from hf_compress.pruning import WandaPruner`` imports Wanda's folder only, and any name a
method folder exports (its ``__all__``) is found without being listed here.

Example:
    >>> from hf_compress.assets import load_text
    >>> from hf_compress.pruning import SparseGPTConfig, SparseGPTPruner
    >>> pruner = SparseGPTPruner.from_pretrained("smollm2-135m")  # doctest: +SKIP
    >>> calibration = load_text("wikipedia", "calibration")  # doctest: +SKIP
    >>> config = SparseGPTConfig(sparsity="2:4")
    >>> model = pruner.prune(config, calibration, save_dir="smollm2-2of4/")  # doctest: +SKIP
"""

import importlib
import sys

from .registry import CONFIGS, PRUNERS, discover_configs, discover_methods


_SHARED = {
    "BasePruner": "base",
    "RECIPE_KEY": "base",
    "MaskPruner": "mask_pruner",
    "LayerReport": "mask_pruner",
    "PruningReport": "mask_pruner",
    "StructuralPruner": "structural",
    "StructuredPruningReport": "structural",
    "PruningConfig": "config",
    "SparsityPattern": "config",
    "StructuralPruningConfig": "config",
    "parse_sparsity": "config",
    "check_pattern": "masks",
    "expected_pruned_count": "masks",
    "n_m_mask": "masks",
    "pattern_mask": "masks",
    "sparsity_of": "masks",
    "unstructured_mask": "masks",
    "save_pruned": "storage",
}
# The methods' own names, so the common ones load without scanning every folder.
_METHODS = {
    "MagnitudeConfig": "magnitude", "MagnitudePruner": "magnitude",
    "WandaConfig": "wanda", "WandaPruner": "wanda", "wanda_scores": "wanda",
    "SparseGPTConfig": "sparsegpt", "SparseGPTPruner": "sparsegpt", "sparsegpt_prune": "sparsegpt",
    "SDSConfig": "sds", "SDSPruner": "sds",
    "TyrConfig": "tyr", "TyrPruner": "tyr",
    "BlockRemovalConfig": "block_removal", "BlockRemovalPruner": "block_removal",
    "SLEBConfig": "sleb", "SLEBPruner": "sleb",
    "BlockPrunerConfig": "block_pruner", "BlockPrunerPruner": "block_pruner",
}


def __getattr__(name: str):
    module = _SHARED.get(name) or _METHODS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    else:  # a name exported by a method folder this file does not list
        discover_methods()
        packages = [m for key, m in sys.modules.items() if key.startswith(f"{__name__}.") and key.count(".") == 2]
        found = [getattr(p, name) for p in packages if name in getattr(p, "__all__", ())]
        if not found:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = found[0]
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SHARED) | set(_METHODS))


__all__ = ["CONFIGS", "PRUNERS", "discover_configs", "discover_methods", *sorted(_SHARED), *sorted(_METHODS)]
