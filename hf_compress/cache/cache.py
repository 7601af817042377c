"""``SparKCache`` and the structured baseline ``StructuredChannelCache``: drop-in ``transformers`` caches.

Example:
    >>> import torch
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.cache import SparKCache, cache_kwargs
    >>> model, _ = tiny_model("llama")
    >>> cache = SparKCache(model.config, channel_ratio=0.5)
    >>> out = model.generate(torch.tensor([[1, 2, 3]]), **cache_kwargs(model, cache), max_new_tokens=4, do_sample=False)
    >>> cache.memory_footprint()["held"] > 0
    True
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from .. import _compat
from ..utils import InvalidArgumentTypeError, check_bool, check_float, check_int, get_logger
from .layer import ChannelPrunedLayer
from .query_capture import install_query_capture
from .read import ReadScratch


logger = get_logger(__name__)

__all__ = ["SparKCache", "StructuredChannelCache", "check_decoder_config"]

_DENSE_WINDOW_TYPES = ("sliding_attention", "chunked_attention")


def check_decoder_config(config: Any, owner: str = "SparKCache") -> None:
    """Refuse, before anything is changed on it, a ``config`` that is not a decoder-only causal LM's config.

    A model instead of its config, an encoder-decoder (T5, BART, Whisper, ...) or an encoder (BERT-like without
    ``is_decoder``, ViT, ...) gets one line saying what to pass.

    Example:
        >>> from transformers import AutoConfig
        >>> check_decoder_config(AutoConfig.for_model("t5"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: config: SparKCache serves decoder-only causal LMs, but this 't5' config is an encoder-decoder model...
    """
    if isinstance(config, torch.nn.Module):
        raise InvalidArgumentTypeError(
            f"config must be the model's config: pass model.config to {owner}, not the model "
            f"({type(config).__name__})."
        )
    if not isinstance(config, PretrainedConfig):
        raise InvalidArgumentTypeError(
            f"config must be a transformers model config (pass model.config), got {type(config).__name__}."
        )
    auto_types = _compat.auto_model_types()
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"config: {owner} serves decoder-only causal LMs, but this {model_type!r} config is an encoder-decoder "
            "model; use the model's default cache."
        )
    decoders = auto_types["causal_lm"] | auto_types["image_text_to_text"]
    encoder = model_type in auto_types["base"] and model_type not in decoders
    bidirectional = model_type in auto_types["masked_lm"] and not getattr(config, "is_decoder", False)
    if encoder or bidirectional:
        raise ValueError(
            f"config: {owner} serves decoder-only causal LMs, but this {model_type!r} config is an encoder "
            "(bidirectional attention, no KV cache to compress); use a causal LM's config."
        )


class SparKCache(Cache):
    """KV cache with SparK's query-aware, per-token key channel pruning and recovery (arXiv 2508.15212).

    Full-attention layers store each token's most salient key channels (``K**2 * ||Q_window||``) compactly
    and rebuild the pruned ones when attention reads them; sliding-window layers (Gemma3's local layers)
    stay dense, as their window already bounds them. Query statistics come from the prompt's last
    ``observation_window`` queries through ``query_capture``, which this constructor installs on
    ``config``: pass the model's own config object, ``model.config``. Precisely, from the last queries of the
    *first forward* that fills the cache (left padding left out): that is the prompt under ``generate()``, but
    the prompt and the first round's drafts under speculative decoding (transformers' assisted generation and
    ours), and only the first chunk under chunked prefill. Tokens leaving the recent window are compressed when a
    forward appends tokens (``compression_interval`` at a time), before that forward's queries read them: a forward
    of k tokens (a verification round, a prefill chunk) reads some tokens compressed that one-token decoding still
    read whole. So speculative decoding with this cache, even strict, can pick other tokens than plain greedy
    decoding with the same cache settings (seen on a tiny random model with values pruned; pruned keys alone move
    the logits much less): it reproduces greedy decoding exactly only with the default dynamic cache.

    Args:
        config: the model's config (``model.config``, not a copy).
        channel_ratio: fraction of key channels pruned per token, in ``[0, 1)``. 0 stores everything.
        value_channel_ratio: fraction of value channels pruned per token (SparK's optional value pruning;
            the paper's default, 0, keeps values dense).
        observation_window: prompt queries whose channel norms define saliency (the paper's 32).
        recent_window: newest tokens kept dense (prompt tail and decoding); older ones are compressed.
        compression_interval: while decoding, tokens leaving the recent window are compressed this many at a
            time (1: each as it leaves). Batching spares each step the fixed cost of compressing (a few
            dozen small operations per layer); a token's compressed form is the same either way.
        token_budget: SnapKV eviction of the prompt to this many tokens before channel pruning (the
            paper's composition). Needs unpadded prompts.
        recovery: rebuild pruned key entries (SparK's "avg" rule); ``False`` fills zeros.

    Example:
        >>> cache = SparKCache(model.config, channel_ratio=0.5)  # doctest: +SKIP
        >>> model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=256)  # doctest: +SKIP
    """

    _per_token = True

    def __init__(
        self,
        config: PretrainedConfig,
        channel_ratio: float = 0.5,
        value_channel_ratio: float = 0.0,
        observation_window: int = 32,
        recent_window: int = 32,
        token_budget: int | None = None,
        recovery: bool = True,
        compression_interval: int = 16,
    ):
        check_decoder_config(config, type(self).__name__)
        for name, ratio in (("channel_ratio", channel_ratio), ("value_channel_ratio", value_channel_ratio)):
            check_float(name, ratio, low=0.0, high=1.0, high_open=True,
                        hint="It is the fraction of channels pruned per token (0 keeps them all).")
        check_int("observation_window", observation_window, minimum=1)
        check_int("recent_window", recent_window, minimum=0)
        check_int("compression_interval", compression_interval, minimum=1)
        check_int("token_budget", token_budget, minimum=1, allow_none=True)
        if token_budget is not None and token_budget <= observation_window:
            raise ValueError(f"token_budget must exceed observation_window ({observation_window}), got {token_budget}.")
        check_bool("recovery", recovery)
        text_config = config.get_text_config(decoder=True)
        # Heterogeneous models (Gemma 4) give each layer its own head size: read it per layer where transformers
        # offers per-layer configs (5.25 on), from the model's config otherwise.
        per_layer = getattr(text_config, "per_layer_config", None)
        # A slim (Týr) model's blocks keep their own number of key/value heads, recorded in its config.
        from ..formats.slim import recorded_slim_record

        slim = recorded_slim_record(config)
        slim_heads = [int(layer["key_value_heads"]) for layer in slim["layers"]] if slim else None
        self.settings: dict[str, Any] = {
            "channel_ratio": channel_ratio,
            "value_channel_ratio": value_channel_ratio,
            "observation_window": observation_window,
            "recent_window": recent_window,
            "token_budget": token_budget,
            "recovery": recovery,
            "compression_interval": compression_interval,
        }
        self.read_scratch = ReadScratch()  # the layers read one at a time: one set of buffers serves them all
        layer_types, layer_kwargs = _compat.cache_layer_types(text_config)
        layers = []
        for index, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if layer_type == "full_attention":
                num_kv_heads, head_dim = _attention_shape(text_config if per_layer is None else per_layer[index])
                if slim_heads is not None and index < len(slim_heads) and slim_heads[index] > 0:
                    num_kv_heads = slim_heads[index]  # 0: the attention sub-block is removed, never filled
                layers.append(
                    ChannelPrunedLayer(
                        key_ratio=channel_ratio,
                        value_ratio=value_channel_ratio,
                        num_kv_heads=num_kv_heads,
                        head_dim=head_dim,
                        observation_window=observation_window,
                        recent_window=recent_window,
                        token_budget=token_budget,
                        per_token=self._per_token,
                        recovery=recovery,
                        compression_interval=compression_interval,
                        scratch=self.read_scratch,
                    )
                )
            elif layer_type in _DENSE_WINDOW_TYPES:
                layers.append(_compat.sliding_window_cache_layer(**kwargs))
            else:
                raise ValueError(
                    f"layer {index} of this model is a {layer_type!r} layer; {type(self).__name__} serves attention "
                    "layers only (full, sliding or chunked). Use the model's default cache."
                )
        if not any(isinstance(layer, ChannelPrunedLayer) for layer in layers):
            logger.warning("every layer of this model is sliding-window: %s keeps them all dense", type(self).__name__)
        install_query_capture(config)
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # A filled cache handed to a new batch (reused across generate() calls) would otherwise fail deep in a cat.
        layer = self.layers[layer_idx]
        if layer.get_seq_length() > 0 and layer.keys.shape[0] != key_states.shape[0]:
            raise ValueError(
                f"this {type(self).__name__} already holds {layer.keys.shape[0]} sequence(s) of "
                f"{layer.get_seq_length()} tokens, but this forward brings a batch of {key_states.shape[0]}. A cache "
                "serves one batch from its prompt on: pass a new cache to each generate() call (or call cache.reset())."
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def memory_footprint(self) -> dict[str, int | float]:
        """Bytes held by every layer now, and what ``DynamicCache`` would hold for the same tokens.

        A compressed layer counts every storage it keeps alive (append headroom included); a dense sliding-window layer
        counts the window it keeps, as :func:`hf_compress.evaluation.measure_kv_cache_bytes` counts it in a
        ``DynamicCache``, so ``held`` compares with that measure of the default cache.

        ``read_scratch`` is apart from ``held``: the buffers one layer's read works in (positions, source rows,
        divisors), shared by all layers, which a read would otherwise allocate and free each time.

        Example:
            >>> cache.memory_footprint()  # doctest: +SKIP
            {'held': 1482752, 'dense_equivalent': 2359296, 'ratio': 0.628, 'read_scratch': 65536}
        """
        from ..evaluation.memory import cache_layer_bytes  # lazily: the evaluation package is not needed to decode

        held = dense = 0
        for layer in self.layers:
            if isinstance(layer, ChannelPrunedLayer):
                footprint = layer.memory_footprint()
                held, dense = held + footprint["held"], dense + footprint["dense_equivalent"]
            elif layer.is_initialized:
                # A dense sliding-window layer, the same as in a DynamicCache: counted as measure_kv_cache_bytes counts
                # it there (the window it keeps, not the prefill's states its view still pins until the next update),
                # so the two measures compare.
                size = cache_layer_bytes(layer)
                held, dense = held + size, dense + size
        return {"held": held, "dense_equivalent": dense, "ratio": held / dense if dense else 1.0,
                "read_scratch": self.read_scratch.nbytes}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{type(self).__name__}({settings}, layers={len(self.layers)})"


class StructuredChannelCache(SparKCache):
    """Baseline: the same channels pruned for every token of a head (ThinK-like), no recovery.

    Channels are scored once from the prompt, ``||Q_window[:, i]|| * ||K[:, i]||``, and the lowest
    ``channel_ratio`` of each head are dropped for all tokens; only kept values are stored. Arguments are
    ``SparKCache``'s, without ``recovery``.

    Example:
        >>> cache = StructuredChannelCache(model.config, channel_ratio=0.5)  # doctest: +SKIP
    """

    _per_token = False

    # Explicit arguments, not **kwargs: callers read them from the signature (the recipe's cache settings), and
    # SparKCache's `recovery` is left out, as shared channels are read back as zeros.
    def __init__(
        self,
        config: PretrainedConfig,
        channel_ratio: float = 0.5,
        value_channel_ratio: float = 0.0,
        observation_window: int = 32,
        recent_window: int = 32,
        token_budget: int | None = None,
        compression_interval: int = 16,
    ):
        super().__init__(
            config, channel_ratio=channel_ratio, value_channel_ratio=value_channel_ratio,
            observation_window=observation_window, recent_window=recent_window, token_budget=token_budget,
            recovery=False, compression_interval=compression_interval,
        )


def _attention_shape(config: PretrainedConfig) -> tuple[int, int]:
    """``(key/value heads, head size)`` of an attention layer described by ``config``."""
    heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return num_kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads
