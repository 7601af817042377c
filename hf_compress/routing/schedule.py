"""``RoutingSchedule``: how many tokens each decoder block skips (its share of the target token sparsity)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..utils.validation import InvalidArgumentTypeError, check_float


__all__ = ["RoutingSchedule", "check_schedule", "skip_count"]


@dataclass
class RoutingSchedule:
    """Per-block skip fractions ``block_sparsity[ℓ]`` (block ℓ skips ``skip_count(r_ℓ, n)`` of a prompt's n tokens).

    ``search`` records how the schedule was found (method, fitness, seconds) for the model card.

    Example:
        >>> schedule = RoutingSchedule.uniform(0.25, num_blocks=4)
        >>> schedule.block_sparsity, schedule.mean_sparsity
        ([0.25, 0.25, 0.25, 0.25], 0.25)
        >>> schedule.check_blocks(3)
        Traceback (most recent call last):
        ...
        ValueError: the routing schedule has 4 entries but the model has 3 decoder blocks; search a schedule for this model.
    """

    block_sparsity: list[float]
    search: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.block_sparsity, (str, bytes)) or not isinstance(self.block_sparsity, Sequence):
            raise ValueError(f"block_sparsity must be a list of numbers in [0, 1), got {self.block_sparsity!r}.")
        self.block_sparsity = [
            check_float(f"block_sparsity[{index}]", value, low=0.0, high=1.0, high_open=True)
            for index, value in enumerate(self.block_sparsity)
        ]
        if not self.block_sparsity:
            raise ValueError("block_sparsity must have one entry per decoder block, got an empty list.")

    @classmethod
    def uniform(cls, token_sparsity: float, num_blocks: int) -> RoutingSchedule:
        """Every block skips the same fraction (the issue's "uniform schedule" baseline)."""
        return cls([float(token_sparsity)] * num_blocks, search={"method": "uniform"})

    @property
    def mean_sparsity(self) -> float:
        return sum(self.block_sparsity) / len(self.block_sparsity)

    @property
    def is_dense(self) -> bool:
        """True when no block skips anything: the routed model is then the base model exactly."""
        return not any(self.block_sparsity)

    def check_blocks(self, num_blocks: int) -> None:
        if len(self.block_sparsity) != num_blocks:
            raise ValueError(
                f"the routing schedule has {len(self.block_sparsity)} entries but the model has {num_blocks} "
                "decoder blocks; search a schedule for this model."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"block_sparsity": list(self.block_sparsity), "search": dict(self.search)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RoutingSchedule:
        return cls(list(values["block_sparsity"]), search=dict(values.get("search") or {}))


def check_schedule(schedule: Any) -> RoutingSchedule:
    """``schedule`` if it is a :class:`RoutingSchedule`; a clear error otherwise (a list of rates included).

    Example:
        >>> check_schedule([0.3, 0.3])
        Traceback (most recent call last):
        ...
        hf_compress.utils.validation.InvalidArgumentTypeError: schedule must be a RoutingSchedule (what search_schedule returns, or RoutingSchedule([...]) / RoutingSchedule.uniform(rate, num_blocks)), got list.
    """
    if not isinstance(schedule, RoutingSchedule):
        raise InvalidArgumentTypeError(
            "schedule must be a RoutingSchedule (what search_schedule returns, or RoutingSchedule([...]) / "
            f"RoutingSchedule.uniform(rate, num_blocks)), got {type(schedule).__name__}.")
    return schedule


def skip_count(block_sparsity: float, num_tokens: int) -> int:
    """Tokens a block skips among ``num_tokens``: ``round(r·n)`` (half up), never the first token.

    Non-decreasing in ``num_tokens`` with ``n − skip`` non-decreasing too, which is what lets a left-padded
    batch keep every row's own selection (``layer.py``).

    Example:
        >>> [skip_count(0.3, n) for n in (1, 2, 5, 10)]
        [0, 1, 2, 3]
    """
    if num_tokens <= 1:
        return 0
    # The 1e-9 keeps "half up" exact for rates that are not binary fractions: 0.35 · 90 is 31.499999999999996
    # in floating point, which would skip 31 tokens where the rule says 32.
    return min(int(block_sparsity * num_tokens + 0.5 + 1e-9), num_tokens - 1)
