"""``ChannelPrunedLayer``: one attention layer's KV cache with per-token (SparK) or shared channel pruning.

Tokens live in two parts, oldest first: a compressed part and a dense recent window of at most
``recent_window`` tokens. Compression needs the query statistics (``qbar``), which the layer gets from the
first forward that fills it (the prompt): it awaits the queries (``query_capture``), takes the last
``observation_window`` of them, optionally evicts tokens to a budget (SnapKV), then compresses everything
older than the recent window. ``qbar`` is then held fixed for the sequence, so every stored token is
rebuilt with the statistics it was compressed with, and later tokens (decoding) are compressed at
``update`` as they leave the recent window, ``compression_interval`` of them at a time (compressing one
token costs about as much as compressing sixteen: a few dozen small tensor operations). Attention reads keys
rebuilt on the fly, one layer at a time, through ``read.py`` (the store's ``densify_*`` methods are the
reference it is tested against), with intermediate buffers the layers of a cache share. Values that
are not pruned are held in one buffer with headroom (old and recent tokens together), so attention reads
them without a copy; compressed stores grow the same way (``channels.append_tokens``).

Example:
    >>> layer = ChannelPrunedLayer(key_ratio=0.5, num_kv_heads=2, head_dim=16)
    >>> layer.get_seq_length()
    0
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..utils import check_bool, check_float, check_int
from .channels import (
    DenseTokens,
    PerTokenChannels,
    SharedChannels,
    append_tokens,
    held_bytes,
    kept_channel_count,
    query_channel_norms,
)
from .eviction import snapkv_keep_indices
from .query_capture import await_queries
from .read import ReadScratch, read_keys, read_values


__all__ = ["ChannelPrunedLayer"]


class ChannelPrunedLayer(CacheLayerMixin):
    """A dynamic cache layer storing keys (and optionally values) with channels pruned per token.

    Args:
        key_ratio: fraction of key channels pruned per token, in ``[0, 1)``.
        value_ratio: fraction of value channels pruned per token (0 keeps values dense).
        num_kv_heads, head_dim: what the model's attention will store, checked at the first update.
        observation_window: prompt queries whose channel norms define saliency (SparK: 32).
        recent_window: newest tokens kept dense.
        compression_interval: decoded tokens wait beyond the recent window until this many are ready, then are
            compressed together (the window holds ``recent_window`` to ``recent_window + interval - 1``
            tokens while decoding); 1 compresses each token as it leaves the window. A token's compressed
            form does not depend on when it is compressed.
        token_budget: if set, SnapKV eviction of the prompt down to this many tokens before pruning.
        per_token: SparK's per-token selection; ``False`` is the structured baseline (one channel set per
            head, ThinK-like scoring ``qbar * ||K[:, i]||``).
        recovery: rebuild pruned key entries by SparK's average-saliency rule; ``False`` leaves zeros.
        scratch: read buffers shared with the cache's other layers (a new one when omitted).
    """

    is_sliding = False
    is_croppable = True
    # Read pruned stores with the reference ``densify_*`` methods instead of ``read.py`` (tests, debugging).
    reference_read = False

    def __init__(
        self,
        key_ratio: float,
        num_kv_heads: int,
        head_dim: int,
        value_ratio: float = 0.0,
        observation_window: int = 32,
        recent_window: int = 32,
        token_budget: int | None = None,
        per_token: bool = True,
        recovery: bool = True,
        compression_interval: int = 16,
        scratch: ReadScratch | None = None,
    ):
        super().__init__()
        for name, ratio in (("key_ratio", key_ratio), ("value_ratio", value_ratio)):
            check_float(name, ratio, low=0.0, high=1.0, high_open=True)
        check_int("num_kv_heads", num_kv_heads, minimum=1)
        check_int("head_dim", head_dim, minimum=1)
        check_int("observation_window", observation_window, minimum=1)
        check_int("recent_window", recent_window, minimum=0)
        check_int("compression_interval", compression_interval, minimum=1)
        check_int("token_budget", token_budget, minimum=observation_window + 1, allow_none=True)
        check_bool("per_token", per_token)
        check_bool("recovery", recovery)
        self.key_ratio, self.value_ratio = key_ratio, value_ratio
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.observation_window, self.recent_window = observation_window, recent_window
        self.compression_interval = compression_interval
        self.scratch = scratch if scratch is not None else ReadScratch()
        self.token_budget = token_budget
        self.per_token, self.recovery = per_token, recovery
        self.keep_keys = kept_channel_count(head_dim, key_ratio)
        self.keep_values = kept_channel_count(head_dim, value_ratio)
        self._clear()

    @property
    def values_pruned(self) -> bool:
        return self.keep_values < self.head_dim

    def _clear(self) -> None:
        # transformers' field names: `keys` is the dense recent window; `values` too when values are pruned,
        # else every held value (one buffer with headroom, `_value_buffer`, read without a copy).
        self.keys = self.values = None
        self._value_buffer: torch.Tensor | None = None
        self.old_keys: PerTokenChannels | SharedChannels | DenseTokens | None = None
        self.old_values: PerTokenChannels | SharedChannels | DenseTokens | None = None
        self.qbar: torch.Tensor | None = None  # (B, H, D) float32, fixed once observed
        self.key_channels: torch.Tensor | None = None  # structured: (B, H, keep) per head
        self.value_channels: torch.Tensor | None = None
        self.seen_tokens = 0  # positions seen, evicted ones included
        # After SnapKV eviction each head holds other earlier tokens: only this many last held tokens (the observation
        # window, then everything appended) are known to be the last positions, which is as far as crop() can go.
        self.croppable_tail: int | None = None
        self.awaiting_queries = False
        self.is_initialized = False

    # ------------------------------------------------------------------ transformers layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[1] != self.num_kv_heads or key_states.shape[-1] != self.head_dim:
            raise ValueError(
                f"the model stores keys of {key_states.shape[1]} heads x {key_states.shape[-1]} channels, but the cache "
                f"was built for {self.num_kv_heads} x {self.head_dim}: build the cache from this model's own config "
                "(SparKCache(model.config, ...)); a model whose blocks were narrowed in memory must record its widths "
                "there first (hf_compress.formats.slim.attach_slim_format(model), as the structured pruners do)."
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_queries_arrived()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        if self.values_pruned:
            self.values = torch.cat([self.values, value_states], dim=-2)
        else:
            self.values, self._value_buffer = append_tokens(self.values, value_states, self._value_buffer)
        self.seen_tokens += key_states.shape[-2]
        if self.croppable_tail is not None:
            self.croppable_tail += key_states.shape[-2]
        if self.qbar is None:
            self.awaiting_queries = True
            await_queries(self)
        else:
            self._compress_overflow(minimum=self.compression_interval)
        return self._full_keys(), self._full_values()

    def _check_queries_arrived(self) -> None:
        if self.awaiting_queries:
            raise RuntimeError(
                "the attention of the previous forward never handed its queries to the cache. SparK needs them: build "
                "the cache from the model's own config object, SparKCache(model.config, ...) (not a copy), which routes "
                "attention through hf_compress's query capture; flash/flex attention are not supported, nor models "
                "whose attention computes its scores itself instead of through transformers' attention functions "
                "(BLOOM, GPT-Neo, XGLM)."
            )

    def observe_queries(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None = None):
        """Called by the query-capturing attention right after the forward that filled this layer."""
        self.awaiting_queries = False
        if self.qbar is not None:
            return
        # This first forward's tokens are all the cache holds; left padding's must not weigh in the statistics, or a
        # padded row would be compressed differently from the same prompt alone.
        real = _real_positions(attention_mask, query.shape[2])  # (B, T) bool, or None without padding
        if real is not None:
            query = query * real[:, None, :, None].to(query.dtype)
        self.qbar = query_channel_norms(query, self.num_kv_heads, self.observation_window)
        if not self.per_token and self.keep_keys < self.head_dim:
            self.key_channels = self._structured_channels(self.keys, self.keep_keys, self.qbar, real)
        if not self.per_token and self.keep_values < self.head_dim:  # values may be pruned with keys kept whole
            self.value_channels = self._structured_channels(self.values, self.keep_values, None, real)
        if self.token_budget is not None and self.held_tokens > self.token_budget:
            self._evict(query, attention_mask, scaling or self.head_dim**-0.5)
        self._compress_overflow()

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Evicted tokens shift what is held; like a sliding window, held index j is position offset + j.
        return self.held_tokens + query_length, self.seen_tokens - self.held_tokens

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove (transformers' convention).")
        remove = -tokens_to_remove
        if remove == 0 or not self.is_initialized:
            return
        if remove > self.held_tokens:
            raise ValueError(f"cannot crop {remove} tokens, the layer holds {self.held_tokens}.")
        if self.croppable_tail is not None:
            if remove > self.croppable_tail:
                raise ValueError(
                    f"cannot crop {remove} tokens: token eviction (token_budget) kept other earlier tokens in each head, "
                    f"and only the last {self.croppable_tail} held tokens are the sequence's last positions. Draft at most "
                    f"observation_window ({self.observation_window}) tokens per round (assisted decoding's "
                    "num_assistant_tokens), or drop token_budget."
                )
            self.croppable_tail -= remove
        recent = self.keys.shape[2]
        from_recent = min(remove, recent)
        self.keys = self.keys[:, :, : recent - from_recent]
        if self.values_pruned:
            self.values = self.values[:, :, : recent - from_recent]
        else:
            self.values = self.values[:, :, : self.values.shape[2] - remove]
        if remove > from_recent:
            old = self.old_keys.num_tokens - (remove - from_recent)
            self.old_keys = self.old_keys.head(old)
            if self.old_values is not None:
                self.old_values = self.old_values.head(old)
        self.seen_tokens -= remove
        if self.seen_tokens == 0:  # cropped to empty: the next prompt brings its own query statistics
            self._clear()

    def reset(self) -> None:
        self._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda store: store.select_batch(beam_idx), lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:  # a row mask, as DynamicLayer takes it; the stores' index_select needs indices
            indices = indices.nonzero().flatten()
        self._apply_batch(lambda store: store.select_batch(indices), lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda store: store.repeat_batch(repeats), lambda t: t.repeat_interleave(repeats, dim=0))

    # ------------------------------------------------------------------ accounting
    @property
    def held_tokens(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.shape[2] + (self.old_keys.num_tokens if self.old_keys is not None else 0)

    def memory_footprint(self) -> dict[str, int]:
        """Bytes actually held, and what a DynamicCache layer would hold for the same tokens: every token seen, those
        SnapKV evicted (``token_budget``) included, so the ratio shows the eviction too."""
        if not self.is_initialized:
            return {"held": 0, "dense_equivalent": 0}
        self._check_queries_arrived()  # else the prompt was never compressed: a dense footprint, reported as SparK's
        held = held_bytes(self.keys, self.values, self.qbar, self.key_channels, self.value_channels)
        held += sum(store.nbytes for store in (self.old_keys, self.old_values) if store is not None)
        batch = self.keys.shape[0]
        dense = 2 * batch * self.num_kv_heads * self.seen_tokens * self.head_dim * self.keys.element_size()
        return {"held": held, "dense_equivalent": dense}

    # ------------------------------------------------------------------ internals
    def _apply_batch(self, on_store, on_tensor) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = on_tensor(self.keys), on_tensor(self.values)
        self._value_buffer = None  # the values are a new tensor now; let the old buffer go
        for name in ("qbar", "key_channels", "value_channels"):
            if (tensor := getattr(self, name)) is not None:
                setattr(self, name, on_tensor(tensor))
        if self.old_keys is not None:
            self.old_keys = on_store(self.old_keys)
        if self.old_values is not None:
            self.old_values = on_store(self.old_values)

    def _full_keys(self) -> torch.Tensor:
        if self.old_keys is None:
            return self.keys
        if isinstance(self.old_keys, DenseTokens):
            old = self.old_keys.densify()
        elif isinstance(self.old_keys, SharedChannels):
            old = self.old_keys.densify(self.key_channels, self.head_dim)
        elif self.reference_read:
            old = self.old_keys.densify_keys(self.qbar if self.recovery else None)
        else:  # rebuilt straight into the returned tensor, the recent window copied after it
            qbar = self.qbar if self.recovery else None
            return self._read_into(lambda out: read_keys(self.old_keys, qbar, out, self.scratch),
                                   self.old_keys.num_tokens, self.keys)
        return torch.cat([old, self.keys], dim=2)

    def _full_values(self) -> torch.Tensor:
        if self.old_values is None:  # values not pruned: all of them in one buffer
            return self.values
        if isinstance(self.old_values, SharedChannels):
            old = self.old_values.densify(self.value_channels, self.head_dim)
        elif self.reference_read:
            old = self.old_values.densify_values()
        else:
            return self._read_into(lambda out: read_values(self.old_values, out, self.scratch), self.old_values.num_tokens, self.values)
        return torch.cat([old, self.values], dim=2)

    @staticmethod
    def _read_into(read, old_tokens: int, recent: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # autograd cannot track writes into a preallocated tensor
            return torch.cat([read(None), recent], dim=2)
        batch, heads, recent_tokens, head_dim = recent.shape
        full = recent.new_empty(batch, heads, old_tokens + recent_tokens, head_dim)
        read(full[:, :, :old_tokens])
        full[:, :, old_tokens:].copy_(recent)
        return full

    def _compress_overflow(self, minimum: int = 1) -> None:
        overflow = self.keys.shape[2] - self.recent_window
        if overflow < minimum:
            return
        # The window is copied out: a view would keep the whole tensor alive until the layer's next update (after
        # prefill, the prompt's: every layer at once holds as much as the dense cache through the first decode step).
        keys, self.keys = self.keys[:, :, :overflow], self.keys[:, :, overflow:].clone()
        new_keys = self._compress_keys(keys)
        self.old_keys = new_keys if self.old_keys is None else self.old_keys.append(new_keys)
        if self.values_pruned:
            values, self.values = self.values[:, :, :overflow], self.values[:, :, overflow:].clone()
            new_values = self._compress_values(values)
            self.old_values = new_values if self.old_values is None else self.old_values.append(new_values)

    def _compress_keys(self, keys: torch.Tensor) -> PerTokenChannels | SharedChannels | DenseTokens:
        if self.keep_keys == self.head_dim:  # nothing pruned: no bitmask to pay for; a copy, not a view pinning the
            return DenseTokens(keys.clone())  # whole prefill next to the window copied out of it
        if not self.per_token:
            return SharedChannels.compress(keys, self.key_channels)
        return PerTokenChannels.compress_keys(keys, self.qbar, self.keep_keys)

    def _compress_values(self, values: torch.Tensor) -> PerTokenChannels | SharedChannels:
        if not self.per_token:
            return SharedChannels.compress(values, self.value_channels)
        return PerTokenChannels.compress_values(values, self.keep_values)

    @staticmethod
    def _structured_channels(states: torch.Tensor, keep: int, qbar: torch.Tensor | None,
                             real: torch.Tensor | None = None) -> torch.Tensor:
        # ThinK-style: a channel's weight over the whole prompt (times its query norm, for keys), padding left out.
        states = states.float()
        if real is not None:
            states = states * real[:, None, -states.shape[2]:, None]
        score = states.norm(dim=2)
        if qbar is not None:
            score = score * qbar
        return score.topk(keep, dim=-1).indices.sort(dim=-1).values

    def _evict(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> None:
        if attention_mask is not None and _has_padding(attention_mask):
            raise ValueError(
                "token eviction (token_budget) needs unpadded prompts: held positions would no longer line up with "
                "the padding mask. Run padded prompts one by one, or drop token_budget."
            )
        keep = snapkv_keep_indices(query, self.keys, self.token_budget, self.observation_window, scaling)
        self.croppable_tail = min(self.observation_window, query.shape[2], self.keys.shape[2])  # the kept window
        self.keys = DenseTokens(self.keys).gather_tokens(keep).states
        self.values = DenseTokens(self.values).gather_tokens(keep).states
        self._value_buffer = None


def _real_positions(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """``(B, length)`` bool: which of the last ``length`` key positions the last query may see (left padding hides
    the others from every query); ``None`` when nothing is hidden or there is no 4-D mask."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    real = _visible(attention_mask[:, :, -1, -length:]).any(dim=1)  # the last position is a real token of every row
    return None if bool(real.all()) else real


def _has_padding(attention_mask: torch.Tensor) -> bool:
    """Whether a 4-D attention mask hides some key position from every query of its row."""
    return bool((~_visible(attention_mask).any(dim=-2)).any())


def _visible(attention_mask: torch.Tensor) -> torch.Tensor:
    """A boolean or additive attention mask as booleans (True: the key may be attended to)."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2
