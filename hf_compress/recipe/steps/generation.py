"""``generation``: how the final model generates — a speculative strategy and/or a compressed KV cache.

``strategy`` is any registered ``custom_generate`` strategy (``speculative_decoding``, ``fly``, ``cospec``,
``amphista`` …; ``hf_compress.speculative.strategies.STRATEGIES``) with its constructor's settings as fields;
the final folder saves it as ``custom_generate/generate.py`` (``amphista`` drafts with the heads of a ``heads``
step and is saved with them in ``heads/``). ``cache`` is ``spark`` or ``structured`` (``hf_compress.cache``),
either a name or ``{method: spark, channel_ratio: 0.5, ...}``; a cache object cannot live in a checkpoint, so
its settings go to ``recipe.yaml`` and the card's loading snippet.

Example:
    >>> step = GenerationStep.parse(3, {"strategy": "fly", "loose": False, "cache": "spark"}, seed=0)
    >>> step.fields["loose"], step.fields["cache"]
    (False, {'method': 'spark'})
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from ...utils import get_logger
from ..config import RecipeError, check_keys, refused_as
from .base import RecipeState, Step


logger = get_logger(__name__)

CACHES = {"spark": "SparKCache", "structured": "StructuredChannelCache"}
HEADS_STRATEGY = "amphista"  # the strategy that drafts with DraftHeads (Amphista or Medusa heads)
# Constructor arguments that are objects, or that the recipe supplies itself.
_NOT_FIELDS = ("self", "heads", "drafter", "acceptance")
SPARK_AFTER_ROUTE = (
    "a compressed cache after `route`: the token router leaves zero keys for skipped tokens and its mask hides "
    "exactly-zero keys, which the cache's channel pruning and recovery would not keep zero; use the default cache."
)


class GenerationStep(Step):
    """``generation: {strategy: fly, <strategy settings>, cache: spark | {method: spark, ...}}``."""

    kind = "generation"
    changes_weights = False

    @classmethod
    def parse(cls, index: int, data: dict[str, Any], seed: int) -> GenerationStep:
        strategies = _strategies()
        strategy = data.get("strategy")
        if strategy is not None and not isinstance(strategy, str):
            raise RecipeError(f"{cls.where(index)}: strategy must be one name, one of {', '.join(strategies)}; "
                              f"got {strategy!r}.")
        where = cls.where(index, strategy)
        if strategy is not None and strategy not in strategies:
            raise RecipeError(f"{where}: unknown strategy {strategy!r}; valid strategies: {', '.join(strategies)}.")
        names = _strategy_fields(strategies[strategy]) if strategy else []
        fields = check_keys(where, data, {"strategy", "cache", *names})
        cache = _parse_cache(where, fields.pop("cache", None))
        fields.pop("strategy", None)
        if strategy is None and cache is None:
            raise RecipeError(f"{where}: set `strategy` (one of {', '.join(strategies)}) and/or `cache` "
                              f"(one of {', '.join(CACHES)}).")
        if strategy:
            _build_strategy(where, strategy, fields, heads="heads of the `heads` step")  # its own checks, now
        step = cls(index, strategy or "", {**fields, **({"cache": cache} if cache else {})})
        step.strategy = strategy
        return step

    def to_dict(self) -> dict[str, Any]:
        return {**({"strategy": self.strategy} if self.strategy else {}), **self.fields}

    def produces(self) -> set[str]:
        return {"generation"}

    def requires(self) -> dict[str, str]:
        if self.strategy == HEADS_STRATEGY:
            return {"heads": f"strategy {HEADS_STRATEGY} drafts with trained heads: add a `heads` step before "
                             "`generation`."}
        return {}

    def refused_after(self) -> dict[str, str]:
        refused = super().refused_after()
        if self.strategy and self.strategy != HEADS_STRATEGY:
            refused["heads"] = (f"the `heads` step trains drafting heads that strategy {self.strategy} does not use; "
                                f"use strategy: {HEADS_STRATEGY} (it drafts with Medusa heads too) or drop `heads`.")
        if "cache" in self.fields:
            refused["routed"] = SPARK_AFTER_ROUTE
        return refused

    def strategy_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.fields.items() if k != "cache"}

    def check_model(self, state: RecipeState) -> None:
        cache = self.fields.get("cache")
        if cache:  # built on a copy: a cache installs its query capture on the config it is given
            _build_cache(self.where(self.index, self.method), cache, copy.deepcopy(state.model.config))

    def apply(self, state: RecipeState, progress: bool) -> dict[str, Any]:
        if self.strategy:
            state.strategy = _build_strategy(self.where(self.index, self.method), self.strategy, self.strategy_fields(),
                                             heads=state.heads)
        if "cache" in self.fields:
            state.cache = dict(self.fields["cache"])
        return {}


def _strategies() -> dict[str, type]:
    from ...speculative.strategies import STRATEGIES, discover_strategies

    discover_strategies()
    return dict(sorted(STRATEGIES.items()))


def _strategy_fields(strategy_class: type) -> list[str]:
    parameters = inspect.signature(strategy_class.__init__).parameters
    return [name for name, p in parameters.items() if name not in _NOT_FIELDS and p.kind is not p.VAR_KEYWORD]


def _build_strategy(where: str, strategy: str, fields: dict[str, Any], heads: Any) -> Any:
    strategy_class = _strategies()[strategy]
    arguments = {**fields, "heads": heads} if strategy == HEADS_STRATEGY else fields
    with refused_as(where):
        return strategy_class(**arguments)


def _parse_cache(where: str, cache: Any) -> dict[str, Any] | None:
    if cache is None:
        return None
    if isinstance(cache, str):
        cache = {"method": cache}
    if not isinstance(cache, dict) or not isinstance(cache.get("method"), str) or cache["method"] not in CACHES:
        raise RecipeError(f"{where}: cache must be one of {', '.join(CACHES)} or {{method: spark, ...settings}}, "
                          f"got {cache!r}.")
    names = [n for n in inspect.signature(_cache_class(cache["method"]).__init__).parameters if n not in ("self", "config")]
    return check_keys(f"{where} cache", cache, {"method", *names})


def _cache_class(method: str) -> type:
    from ... import cache

    return getattr(cache, CACHES[method])


def _build_cache(where: str, cache: dict[str, Any], config: Any) -> Any:
    settings = {k: v for k, v in cache.items() if k != "method"}
    with refused_as(f"{where}: cache {cache['method']}"):
        return _cache_class(cache["method"])(config, **settings)


def cache_snippet(cache: dict[str, Any]) -> str:
    """The lines of a card's loading snippet that build the cache and pass it to ``generate``."""
    settings = ", ".join(f"{k}={v!r}" for k, v in cache.items() if k != "method")
    name = CACHES[cache["method"]]
    return (f"from hf_compress.cache import {name}, cache_kwargs\n\n"
            f"cache = {name}(model.config{', ' + settings if settings else ''})  # a fresh cache per generate() call\n"
            "out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=64)")
