"""Channel permutation for N:M sparsity, as a step every N:M pruner composes with (``permutation=``).

N:M keeps N of every M consecutive input channels, so which channels share a group is an accident of
their order. A pruning config's ``permutation`` field reorders the channels first — ``"ria"``: RIA's
heuristic reallocation; ``"swap"`` / ``SwapPermutationConfig``: RIA refined by greedy channel swaps between N:M
groups (Pool & Yu); ``LearnedPermutationConfig``: cost matrices trained through the frozen pruned
network (Sinkhorn while training, Hungarian at export; arXiv 2601.22980, PermLLM as a preset) — then
absorbs the permutation into neighbouring weights, so the pruner prunes an equivalent dense model and
saves an ordinary N:M checkpoint: no runtime gather.

One concept per file: ``config.py`` (what ``permutation=`` accepts), ``matching.py`` (Sinkhorn,
Hungarian), ``sites.py`` (which permutations are free), ``absorb.py`` (moving the weights, checked on a
probe), ``ria.py`` (the heuristic and the kept-score objective), ``swap.py`` (the swap search), ``learned.py`` (the learner module),
``blockwise.py`` (the block-by-block learner, the default objective), ``selection.py`` (keep-best: how a
candidate is scored and when it beats the start), ``train.py`` (its ``Trainer`` run), ``step.py`` (the step
``BasePruner.prune`` calls).

Example:
    >>> from hf_compress.pruning import LearnedPermutationConfig, WandaConfig
    >>> WandaConfig(sparsity="2:4", permutation=LearnedPermutationConfig(groups=16, epochs=1)).permutation.groups
    16
"""

from .config import (
    PERMUTATION_CHOICES,
    LearnedPermutationConfig,
    SwapPermutationConfig,
    parse_permutation,
    permutation_to_json,
)

__all__ = [
    "PERMUTATION_CHOICES",
    "LearnedPermutationConfig",
    "PermutationReport",
    "SwapPermutationConfig",
    "absorb_permutations",
    "check_permutation",
    "find_sites",
    "hungarian",
    "parse_permutation",
    "permutation_to_json",
    "permute_for_pruning",
    "ria_permutation",
    "sinkhorn",
    "swap_refine",
]


def __getattr__(name: str):  # the rest loads on first use (pruning/config.py imports this package)
    import importlib

    modules = {"PermutationReport": "step", "check_permutation": "step", "permute_for_pruning": "step",
               "absorb_permutations": "absorb", "find_sites": "sites", "hungarian": "matching",
               "sinkhorn": "matching", "ria_permutation": "ria", "swap_refine": "swap"}
    if name not in modules:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{modules[name]}"), name)
    globals()[name] = value
    return value
