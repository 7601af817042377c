"""``TyrConfig``: every knob of Týr-the-Pruner, with the paper's values scaled for small models.

| knob | Týr code (Llama-2-7B) | default here | why |
|---|---|---|---|
| calibration | 4,194,304 tokens, len 4096 | 64 × 256 | CPU-sized; the Hessians of a 135M model settle sooner |
| ``num_iterations`` / ``initial_step`` | 4 / 12.5 % | 4 / 12.5 % | as the paper |
| ``num_levels`` | 9 | 9 | as the paper |
| ``min_ffn_step`` | 32 channels | 32 channels | as the paper |
| ``channel_multiple`` | — | 1 channel | 4 (or 8) before N:M pruning: every kept FFN width a multiple of M |
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

from ...utils import check_choice, check_float, check_int, check_int_sequence, check_seed
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
        channel_multiple: every layer keeps a multiple of this many FFN channels (the budget is met to within
            one multiple per layer). Set it to ``M`` (or a multiple of it) when N:M pruning follows: the FFN
            output projection's input width must split into groups of ``M``; 8, 16 or 64 also suit GPU kernels.
        num_levels: sparsity levels per layer in a supernet (centre ± ``num_levels // 2``).
        ffn_update_rounds: rounds in which the local pruner removes a layer's FFN channels, re-scoring the
            rest after each (more rounds: better choices, more time).
        attention_update_rounds: the same for a layer's key/value-head groups.
        damping: Hessian damping relative to its mean diagonal.
        propagation: which variant of an already pruned block feeds the next block while building the
            supernet: ``"centre"`` (the centre level: the intent of Týr's expectation error
            accumulation, "median" variant), ``"expectation"`` (the ``(1 - s)``-weighted mean of all
            levels) or ``"dense"`` (the dense block: what the released code does in effect).
        generations: evolutionary-search generations per iteration (each makes offspring of the best candidate
            so far; see ``hf_compress.pruning.tyr.search``).
        offspring: candidates a generation makes, each moving level steps between layers of one type (the
            budget stays exact).
        selection_tokens: tokens each successive-halving stage scores the remaining candidates on (one value per
            stage, growing).
        selection_survivors: candidates kept after each stage but the last (one value fewer than
            ``selection_tokens``).
        max_flips: most level moves a mutation makes.
        kl_topk: the dense model's top logits per token the fitness (sparse KL) compares a candidate on.
        num_search_sequences: windows of ``calibration_seq_len`` tokens in the search pool (drawn with
            ``search_seed`` from the calibration text, disjoint seed from the Hessian windows).
        search_seed: seeds mutations, stage sampling and the pool.
    """

    method: ClassVar[str] = "tyr"

    allocation: str = "search"
    num_iterations: int = 4
    initial_step: float = 0.125
    min_ffn_step: int = 32
    channel_multiple: int = 1
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
        check_choice("allocation", self.allocation, ALLOCATIONS)
        check_choice("propagation", self.propagation, PROPAGATIONS)
        for name in ("num_iterations", "min_ffn_step", "channel_multiple", "ffn_update_rounds", "attention_update_rounds",
                     "generations", "offspring", "max_flips", "kl_topk", "num_search_sequences"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        self.search_seed = check_seed("search_seed", self.search_seed)
        odd = "num_levels must be an odd integer ≥ 3 (centre ± k)"
        self.num_levels = check_int("num_levels", self.num_levels, minimum=3, hint="It must be odd (centre ± k).")
        if self.num_levels % 2 == 0:
            raise ValueError(f"{odd}, got {self.num_levels!r}.")
        self.initial_step = check_float("initial_step", self.initial_step, low=0.0, high=0.5, low_open=True)
        self.damping = check_float("damping", self.damping, low=0.0, high=1.0, high_open=True)
        self.selection_tokens = tuple(check_int_sequence("selection_tokens", self.selection_tokens, minimum=1))
        self.selection_survivors = tuple(check_int_sequence("selection_survivors", self.selection_survivors, minimum=1))
        tokens, survivors = self.selection_tokens, self.selection_survivors
        if not tokens or list(tokens) != sorted(tokens):
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
        if self.allocation == "search" and tokens[-1] > pool:  # the uniform baseline runs no search
            raise ValueError(
                f"the last selection stage needs {tokens[-1]} tokens but the search pool holds {pool} "
                f"(num_search_sequences × calibration_seq_len); raise num_search_sequences."
            )
