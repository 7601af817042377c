"""``TyrConfig``: every knob of Týr-the-Pruner, with the paper's values scaled for small models.

| knob | Týr code (Llama-2-7B) | default here | why |
|---|---|---|---|
| calibration | 4,194,304 tokens, len 4096 | 64 × 256 | CPU-sized; the Hessians of a 135M model settle sooner |
| ``num_iterations`` / ``initial_step`` | 4 / 12.5 % | 4 / 12.5 % | as the paper |
| ``num_levels`` | 9 | 9 | as the paper |
| ``min_ffn_step`` | 32 channels | 32 channels | as the paper |
| ``ffn_update_rounds`` / ``attention_update_rounds`` | 16 / 1 | 16 / 1 | as the paper |
| ``generations`` / ``offspring`` | 50 / 128 | 20 / 32 | one CPU forward costs what 128 do on a GPU |
| ``selection_tokens`` | 2,048 / 16,384 / 131,072 | 1,024 / 4,096 / 16,384 | pool of 64 × 256 tokens |
| ``selection_survivors`` | 16 / 4 (then the best of 2) | 8 / 2 (then the best) | same halving ratio |
| ``kl_topk`` | 8,192 | 1,024 | top-k teacher logits held for the whole pool |
| ``max_flips`` | 4 | 4 | as the paper |

Example:
    >>> from hf_compress.pruning import PruningConfig
    >>> config = TyrConfig(target_sparsity=0.3, generations=5)
    >>> PruningConfig.from_dict(config.to_dict()) == config
    True
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

from ..config import StructuralPruningConfig


__all__ = ["TyrConfig"]

ALLOCATIONS = ("search", "uniform")
PROPAGATIONS = ("centre", "expectation", "dense")


@dataclass
class TyrConfig(StructuralPruningConfig):
    """Týr-the-Pruner: global structural pruning of attention head groups and FFN channels.

    Args:
        target_sparsity: fraction of the decoder blocks' parameters to remove (``sparsity`` mirrors it).
        allocation: ``"search"`` (Týr) or ``"uniform"`` (every layer pruned by the same fraction with the
            same local pruner: the baseline, no search).
        num_iterations: coarse-to-fine rounds of supernet + search; the level step halves each round.
        initial_step: first level step, as a fraction of a layer's units.
        min_ffn_step: smallest FFN level step in channels (attention steps never go below one group).
        num_levels: sparsity levels per layer in a supernet (centre ± ``num_levels // 2``).
        ffn_update_rounds, attention_update_rounds: OBS update rounds of the local pruner.
        damping: Hessian damping relative to its mean diagonal.
        propagation: which variant of an already pruned block feeds the next block while building the
            supernet: ``"centre"`` (the centre level: the intent of Týr's expectation error
            accumulation, "median" variant), ``"expectation"`` (the ``(1 - s)``-weighted mean of all
            levels) or ``"dense"`` (the dense block: what the released code does in effect).
        generations, offspring, selection_tokens, selection_survivors, max_flips, kl_topk: the
            evolutionary search (see the module docstring of ``hf_compress.pruning.tyr.search``).
        num_search_sequences: windows of ``calibration_seq_len`` tokens in the search pool (drawn with
            ``search_seed`` from the calibration text, disjoint seed from the Hessian windows).
        search_seed: seeds mutations, stage sampling and the pool.
    """

    method: ClassVar[str] = "tyr"

    allocation: str = "search"
    num_iterations: int = 4
    initial_step: float = 0.125
    min_ffn_step: int = 32
    num_levels: int = 9
    ffn_update_rounds: int = 16
    attention_update_rounds: int = 1
    damping: float = 0.01
    propagation: str = "centre"
    generations: int = 20
    offspring: int = 32
    selection_tokens: tuple[int, ...] = (1024, 4096, 16384)
    selection_survivors: tuple[int, ...] = (8, 2)
    max_flips: int = 4
    kl_topk: int = 1024
    num_search_sequences: int = 64
    search_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}.")
        if self.propagation not in PROPAGATIONS:
            raise ValueError(f"propagation must be one of {PROPAGATIONS}, got {self.propagation!r}.")
        for name in ("num_iterations", "min_ffn_step", "ffn_update_rounds", "attention_update_rounds",
                     "generations", "offspring", "max_flips", "kl_topk", "num_search_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(self.num_levels, bool) or not isinstance(self.num_levels, int) or self.num_levels < 3 \
                or self.num_levels % 2 == 0:
            raise ValueError(f"num_levels must be an odd integer ≥ 3 (centre ± k), got {self.num_levels!r}.")
        if not 0 < self.initial_step <= 0.5:
            raise ValueError(f"initial_step must be in (0, 0.5], got {self.initial_step!r}.")
        if not 0 <= self.damping < 1:
            raise ValueError(f"damping must be in [0, 1), got {self.damping!r}.")
        self.selection_tokens = tuple(int(t) for t in self.selection_tokens)
        self.selection_survivors = tuple(int(s) for s in self.selection_survivors)
        tokens, survivors = self.selection_tokens, self.selection_survivors
        if not tokens or any(t < 1 for t in tokens) or list(tokens) != sorted(tokens):
            raise ValueError(f"selection_tokens must be positive and non-decreasing, got {tokens}.")
        if len(survivors) != len(tokens) - 1:
            raise ValueError(
                f"selection_survivors needs one count per stage but the last ({len(tokens) - 1}), got {survivors}."
            )
        bounds = (self.offspring, *survivors)
        if any(later < 1 or later > earlier for earlier, later in itertools.pairwise(bounds)):
            raise ValueError(
                f"selection_survivors must shrink from offspring={self.offspring}: got {survivors}."
            )
        pool = self.num_search_sequences * self.calibration_seq_len
        if tokens[-1] > pool:
            raise ValueError(
                f"the last selection stage needs {tokens[-1]} tokens but the search pool holds {pool} "
                f"(num_search_sequences × calibration_seq_len); raise num_search_sequences."
            )
