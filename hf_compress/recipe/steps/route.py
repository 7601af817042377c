"""``route``: the token router (FTP): a searched per-block schedule, then the router trained with ``Trainer``.

The same calls as ``hf-compress route``: ``search_schedule`` → ``train_token_router`` (or ``static_router`` with
``static: true``); the model keeps its weights and gains a router (fact ``routed``). It does not stack with
pruning or quantization today (``base.ROUTE_STACKING`` says why), which the order check refuses.

Example:
    >>> step = RouteStep.parse(0, {"method": "token_router", "token_sparsity": 0.3}, seed=5)
    >>> step.fields["seed"], step.fields["training"]["max_steps"]
    (5, 200)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...utils import get_logger
from ..config import RecipeError, check_keys, refused_as
from .base import ROUTE_STACKING, RecipeState, Step
from .training import check_device, check_lengths, parse_training, training_data, training_settings


logger = get_logger(__name__)

# As `hf-compress route`: one window per step, 200 steps, AdamW 1e-3.
ROUTER_TRAINING = {"max_steps": 200, "learning_rate": 1e-3, "batch_size": 1, "seq_len": 256}


class RouteStep(Step):
    """``route: {method: token_router, <TokenRouterConfig fields>, static: false, training: {...}}``."""

    kind = "route"

    @classmethod
    def parse(cls, index: int, data: dict[str, Any], seed: int) -> RouteStep:
        from ...routing.config import TokenRouterConfig

        method = cls.method_of(index, data, ["token_router"])
        where = cls.where(index, method)
        names = [f.name for f in dataclasses.fields(TokenRouterConfig)]
        fields = check_keys(where, data, {"method", "static", "training", *names})
        fields.pop("method")
        static = fields.pop("static", False)
        if not isinstance(static, bool):
            raise RecipeError(f"{where}: static must be true or false, got {static!r}.")
        training = parse_training(where, fields.pop("training", None), ROUTER_TRAINING)
        fields.setdefault("seed", seed)
        with refused_as(where):
            config = TokenRouterConfig(**fields)
        return cls(index, method, {**config.to_dict(), "static": static, "training": training})

    def produces(self) -> set[str]:
        return {"routed"}

    def refused_after(self) -> dict[str, str]:
        return {**super().refused_after(), **ROUTE_STACKING, "routed": "two route steps: keep one."}

    def check_model(self, state: RecipeState) -> None:
        lengths = {"search_seq_len": self.fields["search_seq_len"], "training.seq_len": self.fields["training"]["seq_len"]}
        check_lengths(self.where(self.index, self.method), state.model, lengths)
        if not self.fields["static"]:
            check_device(self.where(self.index, self.method), state.device)

    def apply(self, state: RecipeState, progress: bool) -> dict[str, Any]:
        from ...assets import load_calibration_text
        from ...routing import TokenRouterConfig, search_schedule, static_router, train_token_router

        config = TokenRouterConfig(**{k: v for k, v in self.fields.items() if k not in ("static", "training")})
        training = self.fields["training"]
        static_on_gpu = self.fields["static"] and state.device.type != "cpu"  # trains nothing: any GPU will do
        settings = None if static_on_gpu else training_settings(training, config.seed, state.device, progress)
        schedule = search_schedule(state.model, load_calibration_text(training["text"]), config,
                                   tokenizer=state.tokenizer, progress=progress, args=settings)
        logger.info("routing schedule: %s", " ".join(f"{r:.2f}" for r in schedule.block_sparsity))
        if self.fields["static"]:
            static_router(state.model, schedule)
        else:
            data = training_data(training, state.tokenizer, config.seed + 1)  # as hf-compress route: not the search's windows
            train_token_router(state.model, schedule, data, config=config, args=settings)
        state.format_recipes["routing"] = {"token_sparsity": config.token_sparsity, "config": config.to_dict(),
                                           "static": self.fields["static"], "training": training}
        return {"block_sparsity": [round(r, 4) for r in schedule.block_sparsity]}
