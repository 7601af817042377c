"""Compressed KV caches as ``transformers.Cache`` subclasses.

- ``SparKCache``: SparK's query-aware per-token key (and optionally value) channel pruning with
  recovery, stored compactly; composes with SnapKV token eviction (``token_budget``).
- ``StructuredChannelCache``: the structured baseline (one channel set per head, ThinK-like).

Example:
    >>> from hf_compress.cache import SparKCache
    >>> cache = SparKCache(model.config, channel_ratio=0.5)  # doctest: +SKIP
    >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=256)  # doctest: +SKIP
"""

from .cache import SparKCache, StructuredChannelCache
from .layer import ChannelPrunedLayer
from .query_capture import install_query_capture


__all__ = ["ChannelPrunedLayer", "SparKCache", "StructuredChannelCache", "install_query_capture"]
