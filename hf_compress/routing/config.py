"""``TokenRouterConfig``: every knob of the token router (FTP), with the paper's values where they are known.

Confirmed by reviews of the paper (see ``shared/methods/token_router.md``): one router shared by all blocks, a
2-layer MLP with hidden size 64, four input factors, equal loss weights. The rest is ours to choose and is
marked *(ours)* below; the benchmark (``scripts/bench_token_router.py``) states which values it ran with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..utils.validation import check_bool, check_float, check_fraction, check_int, check_seed, closest_name


__all__ = ["TokenRouterConfig"]


@dataclass
class TokenRouterConfig:
    """Settings of the token router: target sparsity, router size, schedule search and training losses.

    Args:
        token_sparsity: target mean fraction of tokens each block skips, in [0, 1) (0 = the base model exactly):
            ``0.3`` or ``"30%"``.
        router_hidden_size: hidden width of the shared 2-layer router MLP (paper: 64).
        schedule_step: granularity of a block's sparsity in the schedule search (ours: 0.05, as the spec proposes;
            adjusted so that the steps add up to exactly ``token_sparsity`` × number of blocks).
        max_block_sparsity: the most a single block may skip (ours: 0.9).
        population: schedule-search population (ours: 12, sized for a CPU).
        generations: schedule-search generations (ours: 8).
        search_windows: calibration windows the search scores a schedule on (ours: 4).
        search_seq_len: tokens per search window (ours: 256).
        guide_weight: weight of the guide loss (imitate the static router), decayed linearly to 0 (paper: equal weights).
        sparsity_weight: weight of the one-sided sparsity constraint (Eq. 5).
        distill_weight: weight of the final-output distillation loss (KL to the dense model's logits).
        loss_tail: fraction of each window's most recent tokens whose next-token loss the schedule search scores and
            the distillation matches (ours: 0.25). The static rule never computes a prompt's earliest tokens at the
            blocks that skip them, so their own next-token predictions are not what routing preserves (a token
            skipped at every block is predicted from its embedding alone); what it preserves is the context those
            tokens give to the most recent ones — the continuation a prefill serves. Scoring every token (1.0) makes
            the search and the router chase the never-computed tokens instead.
        validation_windows: held-out windows on which router training measures the routed model's tail KL to the
            dense model, to keep the best router (the static starting point included); 0 turns selection off (ours: 8).
        validation_every: steps between two such measurements (ours: 25).
        route_decode: route tokens fed after the prompt too (paper's decode variant, threshold 0.5 on the router's
            probability); off by default: decoded tokens are computed at every block.
        seed: seed of the search and of training.

    Example:
        >>> TokenRouterConfig(token_sparsity=0.3).router_hidden_size
        64
        >>> TokenRouterConfig(token_sparsity=1.0)
        Traceback (most recent call last):
        ...
        ValueError: token_sparsity must be a number in [0, 1), got 1.0. It is the mean fraction ...
    """

    token_sparsity: float | str = 0.3
    router_hidden_size: int = 64
    schedule_step: float = 0.05
    max_block_sparsity: float = 0.9
    population: int = 12
    generations: int = 8
    search_windows: int = 4
    search_seq_len: int = 256
    guide_weight: float = 1.0
    sparsity_weight: float = 1.0
    distill_weight: float = 1.0
    loss_tail: float = 0.25
    validation_windows: int = 8
    validation_every: int = 25
    route_decode: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.token_sparsity = check_fraction("token_sparsity", self.token_sparsity,
                                             hint="It is the mean fraction of tokens a block skips, e.g. 0.3 or '30%'.")
        check_int("router_hidden_size", self.router_hidden_size, minimum=1)
        check_float("schedule_step", self.schedule_step, low=0.0, high=1.0, low_open=True)
        check_float("max_block_sparsity", self.max_block_sparsity, low=0.0, high=1.0, high_open=True)
        check_int("population", self.population, minimum=2)
        check_int("generations", self.generations, minimum=0)
        check_int("search_windows", self.search_windows, minimum=1)
        check_int("search_seq_len", self.search_seq_len, minimum=2)
        for name in ("guide_weight", "sparsity_weight", "distill_weight"):
            check_float(name, getattr(self, name), low=0.0)
        check_float("loss_tail", self.loss_tail, low=0.0, high=1.0, low_open=True)
        check_int("validation_windows", self.validation_windows, minimum=0)
        check_int("validation_every", self.validation_every, minimum=1)
        check_bool("route_decode", self.route_decode)
        check_seed("seed", self.seed)
        if self.token_sparsity > self.max_block_sparsity:
            raise ValueError(
                f"token_sparsity {self.token_sparsity} exceeds max_block_sparsity {self.max_block_sparsity}; "
                "raise max_block_sparsity or lower the target."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TokenRouterConfig:
        """The config ``to_dict`` wrote; an unknown key is refused (a typo would otherwise fall back to a default).

        Example:
            >>> TokenRouterConfig.from_dict({"token_sparsty": 0.2})
            Traceback (most recent call last):
            ...
            ValueError: TokenRouterConfig has no field 'token_sparsty'; did you mean 'token_sparsity'?
        """
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = closest_name(str(key), known)
                hint = f"did you mean {close!r}?" if close else f"valid fields: {', '.join(known)}."
                raise ValueError(f"TokenRouterConfig has no field {key!r}; {hint}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
