"""Compressed KV caches as ``transformers.Cache`` subclasses.

- ``SparKCache``: SparK's query-aware per-token key (and optionally value) channel pruning with
  recovery, stored compactly; composes with SnapKV token eviction (``token_budget``).
- ``StructuredChannelCache``: the structured baseline (one channel set per head, ThinK-like).

Example:
    >>> from hf_compress.cache import SparKCache, cache_kwargs
    >>> cache = SparKCache(model.config, channel_ratio=0.5)  # doctest: +SKIP
    >>> model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=256)  # doctest: +SKIP

``cache_kwargs`` passes the cache as ``cache=`` (transformers ≥ 5.24) or ``past_key_values=`` (5.23), whichever
the installed transformers takes, so the call warns on neither.
"""

from .cache import SparKCache, StructuredChannelCache
from .kwargs import cache_kwargs
from .layer import ChannelPrunedLayer
from .query_capture import install_query_capture


__all__ = ["ChannelPrunedLayer", "SparKCache", "StructuredChannelCache", "cache_kwargs", "install_query_capture"]
