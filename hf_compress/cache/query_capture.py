"""Hand the attention queries of a forward pass to the cache layer that just stored its keys.

A ``transformers`` cache only ever sees keys and values (``Cache.update``); query-aware compression also
needs the queries. Every attention module calls its cache's ``update(...)`` and then, right after,
its attention function with the (normed, rotated) queries. So a cache layer that wants the queries
announces itself in ``update`` (``await_queries``), and a thin wrapper registered through transformers'
public ``AttentionInterface``/``AttentionMaskInterface`` passes the queries to it after computing the
attention it wraps, unchanged. Nothing in the model's code is touched and every architecture whose
attention goes through ``ALL_ATTENTION_FUNCTIONS`` is served (Llama, Qwen2/3, Mistral, Gemma3, ...).

``install_query_capture(config)`` switches a model config (the very object the attention modules
read, ``model.config``) to the wrapping implementation: ``"sdpa"`` becomes ``"hf_compress_queries|sdpa"``.
With no cache layer awaiting queries the wrapper is a pass-through, so other caches are unaffected.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, _ = tiny_model("llama")
    >>> install_query_capture(model.config)
    'hf_compress_queries|sdpa'
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Protocol

import torch
from transformers import PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .. import _compat
from ..utils import InvalidArgumentTypeError, get_logger


logger = get_logger(__name__)

__all__ = ["CAPTURE_PREFIX", "QueryObserver", "await_queries", "install_query_capture"]

CAPTURE_PREFIX = "hf_compress_queries|"


class QueryObserver(Protocol):
    """A cache layer that wants the queries of the forward pass that just updated it."""

    def observe_queries(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None
    ) -> None: ...


# The layer whose `update` ran last and which has not yet seen its queries. A context variable, not a
# global, so two threads decoding with two models do not hand queries to each other's caches.
_awaiting: contextvars.ContextVar[QueryObserver | None] = contextvars.ContextVar("hf_compress_awaiting", default=None)


def await_queries(layer: QueryObserver) -> None:
    """Called by a cache layer in ``update``: the next attention call delivers its queries to ``layer``."""
    _awaiting.set(layer)


def _capturing(base_name: str) -> Callable:
    def attention_with_query_capture(module, query, key, value, attention_mask, **kwargs):
        # "eager" is no registered function: each modeling file has its own (GQA or not, softcap, ...).
        base = (_compat.eager_attention_forward(module) if base_name == "eager"
                else ALL_ATTENTION_FUNCTIONS.get_interface(base_name, _compat.eager_attention_forward(module)))
        output = base(module, query, key, value, attention_mask, **kwargs)
        layer = _awaiting.get()
        if layer is not None:
            _awaiting.set(None)
            layer.observe_queries(query, attention_mask, kwargs.get("scaling"))
        return output

    return attention_with_query_capture


def _register(base_name: str) -> str:
    name = CAPTURE_PREFIX + base_name
    if not _compat.is_attention_registered(name):
        AttentionInterface.register(name, _capturing(base_name))
        mask = _compat.mask_function_of(base_name)
        if mask is not None:  # masks are built in the wrapped implementation's format
            AttentionMaskInterface.register(name, mask)
    return name


def install_query_capture(config: PretrainedConfig) -> str:
    """Route the attention of every module reading ``config`` through the query-capturing wrapper.

    Idempotent. Returns the new attention implementation name. Raises for implementations that cannot
    be wrapped (flash/flex attention keep their own mask formats and kernels; use ``sdpa`` or ``eager``).
    """
    if not isinstance(config, PretrainedConfig):
        hint = " pass model.config, not the model" if isinstance(config, torch.nn.Module) else ""
        raise InvalidArgumentTypeError(
            f"config must be a transformers model config (model.config), got {type(config).__name__};{hint}."
            if hint else f"config must be a transformers model config (model.config), got {type(config).__name__}."
        )
    current = _compat.attention_implementation(config) or "eager"
    if isinstance(current, dict):
        raise ValueError("per-sub-config attention implementations are not supported; pass the text model config.")
    if current.startswith(CAPTURE_PREFIX):
        return current
    if current not in ("sdpa", "eager"):
        raise ValueError(
            f"query capture wraps the 'sdpa' and 'eager' attention implementations, the model uses {current!r}. "
            "Load the model with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa'))."
        )
    name = _register(current)
    _compat.set_attention_implementation(config, name)
    logger.info("attention of this model now reports its queries to query-aware caches (%s)", name)
    return name

