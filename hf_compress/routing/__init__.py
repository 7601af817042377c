"""Token routing (FTP, arXiv 2412.11494): tokens skip the decoder blocks they do not need.

One tiny router shared by every block decides, per token and block, whether the token is computed or passes
through on the residual stream; a searched schedule gives each block its share of the target token sparsity; only
the router (and the schedule) learn, the model stays frozen. Skipped tokens are really not computed (gather →
block → scatter, ``layer.py``), and ``generate()`` works with the KV cache.

Example:
    >>> from hf_compress.routing import TokenRouterConfig, search_schedule, train_token_router  # doctest: +SKIP
    >>> schedule = search_schedule(model, calibration_texts, TokenRouterConfig(token_sparsity=0.3), tokenizer=tok)  # doctest: +SKIP
    >>> routed = train_token_router(model, schedule, dataset, args=TrainingSettings(max_steps=200))  # doctest: +SKIP
    >>> routed.save_pretrained("out/")  # then AutoModelForCausalLM.from_pretrained("out/") after import hf_compress  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any


_EXPORTS = {
    "TokenRouterConfig": ".config",
    "RoutingSchedule": ".schedule",
    "TokenRouter": ".router",
    "install_routing": ".layer",
    "remove_routing": ".layer",
    "routing_disabled": ".layer",
    "routing_mode": ".layer",
    "routing_state": ".layer",
    "search_schedule": ".search",
    "static_router": ".search",
    "train_token_router": ".training",
    "save_routed": ".format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
