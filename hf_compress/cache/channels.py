"""Compact storage of key/value vectors with some channels dropped, and their reconstruction.

Three stores share one shape convention: every tensor field is ``(batch, kv_heads, tokens, ...)``, so
cropping, concatenating and batch re-indexing are one generic operation on all fields.

- ``DenseTokens``: the full vectors (the recent window, or values when they are not pruned).
- ``PerTokenChannels`` (SparK): each token keeps its own top channels. Held per token: the kept values, a
  bitmask of which channels they are, and for keys the signs of the pruned entries plus one fill scalar,
  ``sqrt(mean pruned saliency)``; for values one fill scalar, the mean of the pruned entries.
- ``SharedChannels`` (structured, ThinK-like baseline): every token of a head keeps the same channels;
  only the kept values are held per token, the channel index once per head by the cache layer.

Recovery (SparK's "avg" rule): a pruned key entry ``i`` of token ``t`` is rebuilt as
``sign(K[t, i]) * sqrt(mean_{j pruned} s[t, j] / qbar[i])`` with saliency ``s[t, j] = K[t, j]**2 * qbar[j]``,
so the pruned channels together keep exactly the saliency they had: ``sum_i qbar[i] * Khat[t, i]**2``
over pruned ``i`` equals ``sum_i s[t, i]``.

``densify_keys`` / ``densify_values`` are the reference reconstruction; the cache layer reads through
``read.py`` (byte tables and one gather on any device, a fused Triton kernel on CUDA), tested equal to them.

Example:
    >>> import torch
    >>> keys = torch.randn(1, 2, 5, 8)
    >>> qbar = torch.rand(1, 2, 8) + 0.1
    >>> store = PerTokenChannels.compress_keys(keys, qbar, keep=4)
    >>> store.densify_keys(qbar).shape
    torch.Size([1, 2, 5, 8])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TypeVar

import torch


__all__ = [
    "DenseTokens",
    "PerTokenChannels",
    "SharedChannels",
    "append_tokens",
    "channel_saliency",
    "kept_channel_count",
    "held_bytes",
    "pack_bits",
    "query_channel_norms",
    "unpack_bits",
]

# Below this a query channel norm counts as zero: recovery divides by it.
QBAR_FLOOR = 1e-6


def recovery_limit(dtype: torch.dtype) -> float | None:
    """The largest recovered key magnitude a store of ``dtype`` holds, where that dtype's exponent range is narrower
    than float32's (float16: 65504); ``None`` otherwise.

    Recovery divides a token's fill by ``sqrt(qbar[i])``: for a channel the queries hardly use, that can pass
    float16's range and become ``inf`` (then ``nan`` in attention). Every reader clamps the float32 quotient to
    this limit before rounding, so they stay bit-identical.

    Example:
        >>> recovery_limit(torch.float16), recovery_limit(torch.bfloat16)
        (65504.0, None)
    """
    limit = torch.finfo(dtype).max
    # bfloat16 has float32's exponent range (its max only a rounding below): no clamp, no extra pass over a read.
    return limit if limit < 2.0**127 else None

Store = TypeVar("Store", bound="_TokenStore")


def kept_channel_count(head_dim: int, ratio: float) -> int:
    """Channels kept per token when a fraction ``ratio`` is pruned (the paper's ``D - floor(ratio * D)``)."""
    return head_dim - math.floor(ratio * head_dim)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor's last dimension into bytes (little-endian bit order, zero-padded)."""
    length = flags.shape[-1]
    padded_length = math.ceil(length / 8) * 8
    if padded_length != length:
        flags = torch.nn.functional.pad(flags, (0, padded_length - length))
    weights = 2 ** torch.arange(8, device=flags.device, dtype=torch.uint8)
    return (flags.reshape(*flags.shape[:-1], padded_length // 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``length`` flags of each packed row, as ``bool``."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :length].bool()


def query_channel_norms(query: torch.Tensor, num_kv_heads: int, window: int) -> torch.Tensor:
    """SparK's query statistic: per KV head and channel, the L2 norm over the last ``window`` queries.

    ``query`` is ``(batch, heads, positions, head_dim)``; query heads of a GQA group are averaged first,
    as the reference code does. Returns ``(batch, kv_heads, head_dim)`` in float32.
    """
    batch, heads, _, head_dim = query.shape
    recent = query[:, :, -window:, :].float()
    grouped = recent.view(batch, num_kv_heads, heads // num_kv_heads, -1, head_dim).mean(dim=2)
    return grouped.norm(dim=2)


def channel_saliency(keys: torch.Tensor, qbar: torch.Tensor) -> torch.Tensor:
    """``s[t, i] = K[t, i]**2 * qbar[i]`` per token, in float32."""
    return keys.float().square() * qbar.unsqueeze(2)


def _top_channel_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)


def append_tokens(held: torch.Tensor, new: torch.Tensor, buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.cat([held, new], dim=2)`` without copying ``held`` when it already starts a large enough ``buffer``.

    Returns the concatenation (a view of the buffer) and the buffer. When ``held`` is not the buffer's prefix
    (reordered batch, ...) or the buffer is full, a new one is allocated with headroom for about 1/128 more
    tokens (at least 16): a whole copy every ``n / 128`` appends instead of every append, for under 1% more
    memory at long contexts (counted by ``nbytes``/``memory_footprint``). Appending to nothing (a prompt)
    allocates exactly.

    Example:
        >>> import torch
        >>> view, buffer = append_tokens(torch.zeros(1, 1, 3, 2), torch.ones(1, 1, 1, 2), None)
        >>> view.shape, buffer.shape[2]
        (torch.Size([1, 1, 4, 2]), 20)
    """
    length, added = held.shape[2], new.shape[2]
    if torch.is_grad_enabled() and (held.requires_grad or new.requires_grad):
        # Autograd keeps `held` for the backward pass: writing the next tokens into its buffer would corrupt it.
        return torch.cat([held, new], dim=2), None
    fits = (
        buffer is not None
        and held.data_ptr() == buffer.data_ptr()
        and held.stride() == buffer.stride()
        and held.shape[:2] == buffer.shape[:2]
        and held.shape[3:] == buffer.shape[3:]
        and buffer.shape[2] >= length + added
        and buffer.dtype == new.dtype
        and buffer.device == new.device
        # A buffer made under torch.inference_mode() cannot be written outside it (a cache reused after such a call).
        and (not buffer.is_inference() or torch.is_inference_mode_enabled())
    )
    if not fits:
        needed = length + added
        headroom = max(16, needed // 128) if length else 0
        buffer = new.new_empty(*new.shape[:2], needed + headroom, *new.shape[3:])
        buffer[:, :, :length].copy_(held)
    buffer[:, :, length : length + added].copy_(new)
    return buffer[:, :, : length + added], buffer


def held_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes ``tensors`` keep allocated: each distinct storage whole, as a view keeps its base alive (an append
    buffer's headroom, a window sliced off a larger tensor) and two views of one base hold it once."""
    storages = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@dataclasses.dataclass
class _TokenStore:
    """Tensor fields shaped ``(batch, kv_heads, tokens, ...)``; ``None`` fields are absent.

    ``append`` writes in place into buffers with headroom (``append_tokens``): a decoding step appends one
    token without copying the whole store.
    """

    def __post_init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def _map(self: Store, fn: Callable[[torch.Tensor], torch.Tensor]) -> Store:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return type(self)(**{k: (fn(v) if isinstance(v, torch.Tensor) else v) for k, v in values.items()})

    def _tensors(self) -> list[torch.Tensor]:
        return [v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]

    @property
    def num_tokens(self) -> int:
        return self._tensors()[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the held tokens, append headroom included."""
        return held_bytes(*self._tensors())

    def append(self: Store, other: Store) -> Store:
        """This store with ``other``'s tokens after its own (in place; returns ``self``)."""
        for f in dataclasses.fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, torch.Tensor):
                view, self._buffers[f.name] = append_tokens(mine, getattr(other, f.name), self._buffers.get(f.name))
                setattr(self, f.name, view)
        return self

    def head(self: Store, tokens: int) -> Store:
        """The first ``tokens`` tokens (in place, keeping the buffers for later appends; returns ``self``)."""
        for f in dataclasses.fields(self):
            if isinstance(mine := getattr(self, f.name), torch.Tensor):
                setattr(self, f.name, mine[:, :, :tokens])
        return self

    def token_range(self: Store, start: int, stop: int) -> Store:
        """Tokens ``start:stop`` as a new store of views (this one is unchanged)."""
        return self._map(lambda t: t[:, :, start:stop])

    def select_batch(self: Store, indices: torch.Tensor) -> Store:
        return self._map(lambda t: t.index_select(0, indices.to(t.device)))

    def repeat_batch(self: Store, repeats: int) -> Store:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def gather_tokens(self: Store, indices: torch.Tensor) -> Store:
        """Keep tokens ``indices`` (``(batch, kv_heads, kept)``) of every head."""

        def gather(t: torch.Tensor) -> torch.Tensor:
            index = indices.view(*indices.shape, *([1] * (t.dim() - 3))).expand(*indices.shape, *t.shape[3:])
            return t.gather(2, index)

        return self._map(gather)


@dataclasses.dataclass
class DenseTokens(_TokenStore):
    """Full key or value vectors, ``(batch, kv_heads, tokens, head_dim)``."""

    states: torch.Tensor

    def densify(self) -> torch.Tensor:
        return self.states


@dataclasses.dataclass
class PerTokenChannels(_TokenStore):
    """SparK's per-token unstructured channel selection, stored compactly (see the module docstring)."""

    kept: torch.Tensor  # (B, H, T, keep), in ascending channel order
    kept_bits: torch.Tensor  # (B, H, T, ceil(D / 8)) uint8 bitmask of the kept channels
    fill: torch.Tensor  # (B, H, T): keys: sqrt(mean pruned saliency); values: mean pruned value
    sign_bits: torch.Tensor | None  # keys only: (B, H, T, ceil((D - keep) / 8)), 1 = pruned entry was >= 0
    head_dim: int

    @classmethod
    def compress_keys(cls, keys: torch.Tensor, qbar: torch.Tensor, keep: int) -> PerTokenChannels:
        """Keep each token's ``keep`` most salient channels for queries of channel norms ``qbar``."""
        saliency = channel_saliency(keys, qbar)
        kept_mask = _top_channel_mask(saliency, keep)
        batch, heads, tokens, head_dim = keys.shape
        pruned = head_dim - keep
        pruned_saliency = saliency.masked_fill(kept_mask, 0.0).sum(-1) / max(pruned, 1)
        pruned_signs = keys[~kept_mask].view(batch, heads, tokens, pruned) >= 0
        return cls(
            kept=keys[kept_mask].view(batch, heads, tokens, keep),
            kept_bits=pack_bits(kept_mask),
            fill=pruned_saliency.sqrt().to(keys.dtype),
            sign_bits=pack_bits(pruned_signs),
            head_dim=head_dim,
        )

    @classmethod
    def compress_values(cls, values: torch.Tensor, keep: int) -> PerTokenChannels:
        """Keep each token's ``keep`` largest-magnitude value entries; the rest are rebuilt as their mean."""
        kept_mask = _top_channel_mask(values.float().abs(), keep)
        batch, heads, tokens, head_dim = values.shape
        pruned = head_dim - keep
        pruned_mean = values.float().masked_fill(kept_mask, 0.0).sum(-1) / max(pruned, 1)
        return cls(
            kept=values[kept_mask].view(batch, heads, tokens, keep),
            kept_bits=pack_bits(kept_mask),
            fill=pruned_mean.to(values.dtype),
            sign_bits=None,
            head_dim=head_dim,
        )

    def _scatter_kept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept values at their channels (pruned slots hold junk), the kept mask and each channel's rank.

        A gather by rank (``cumsum`` of the mask) is several times faster than ``masked_scatter`` on CPU.
        """
        kept_mask = unpack_bits(self.kept_bits, self.head_dim)
        kept_before = kept_mask.to(torch.int16).cumsum(-1, dtype=torch.int16)
        rank = (kept_before.long() - 1).clamp_min_(0)
        return self.kept.gather(-1, rank), kept_mask, kept_before

    def densify_keys(self, qbar: torch.Tensor | None) -> torch.Tensor:
        """Keys with every pruned entry recovered; ``qbar=None`` fills pruned entries with zeros.

        The reference: ``read.read_keys`` computes the same tensor faster.
        """
        dense, kept_mask, kept_before = self._scatter_kept()
        if qbar is None or self.sign_bits is None:
            return dense.masked_fill_(~kept_mask, 0)
        pruned = self.head_dim - self.kept.shape[-1]
        # Channel i is the (i - kept_before[i])-th pruned channel (0-based) when it is pruned.
        channel = torch.arange(self.head_dim, device=dense.device, dtype=torch.int16)
        pruned_rank = (channel - kept_before).long().clamp_(0, max(pruned - 1, 0))
        signs = unpack_bits(self.sign_bits, pruned).gather(-1, pruned_rank)
        magnitude = self.fill.unsqueeze(-1) / qbar.clamp_min(QBAR_FLOOR).sqrt().unsqueeze(2)
        if (limit := recovery_limit(dense.dtype)) is not None:
            magnitude = magnitude.clamp_max(limit)
        magnitude = magnitude.to(dense.dtype)
        recovered = torch.where(signs, magnitude, -magnitude)
        return torch.where(kept_mask, dense, recovered)

    def densify_values(self) -> torch.Tensor:
        """Values with every pruned entry set to the token's fill (the reference for ``read.read_values``)."""
        dense, kept_mask, _ = self._scatter_kept()
        return torch.where(kept_mask, dense, self.fill.unsqueeze(-1))


@dataclasses.dataclass
class SharedChannels(_TokenStore):
    """Structured selection: the kept channels are the same for every token of a head (held by the layer)."""

    kept: torch.Tensor  # (B, H, T, keep), in the order of the head's channel index

    @classmethod
    def compress(cls, states: torch.Tensor, channels: torch.Tensor) -> SharedChannels:
        index = channels.unsqueeze(2).expand(-1, -1, states.shape[2], -1)
        return cls(kept=states.gather(-1, index))

    def densify(self, channels: torch.Tensor, head_dim: int) -> torch.Tensor:
        batch, heads, tokens, _ = self.kept.shape
        dense = torch.zeros(batch, heads, tokens, head_dim, dtype=self.kept.dtype, device=self.kept.device)
        return dense.scatter_(-1, channels.unsqueeze(2).expand(-1, -1, tokens, -1), self.kept)
