"""Fast reads of per-token channel stores: kept channels gathered and pruned ones rebuilt in one gather.

``PerTokenChannels.densify_keys`` / ``densify_values`` (channels.py) are the reference: readable, about a
dozen full-size passes (bit unpacking, ``cumsum`` ranks, two gathers, ``torch.where`` with broadcasting).
This module computes the same tensors with few, cheap passes, and is what the cache layer reads with:

- **Where each channel comes from, by byte tables.** A token's kept-channel bitmask is read one byte
  (8 channels) at a time. The kept channels before the byte (a ``cumsum`` over ``head_dim / 8`` popcounts,
  not ``head_dim`` flags) and the byte's value select one row of a precomputed table that holds the source
  positions of the byte's 8 channels: one ``index_select`` of 8-wide rows gives every channel's position.
  For keys the row is also keyed by the byte's place (the pruned channels before it follow from it), so a
  single lookup suffices while that table stays small (``_COMBINED_TABLE_ENTRIES``); wider heads add a
  second lookup for the pruned channels.
- **One ``torch.gather`` from a per-token source row** ``[kept values | pruned entries in pruned order]``,
  written straight into the caller's output: the pruned part is ``±fill`` for keys (signs unpacked by a ±1
  byte table), the fill for values, zeros without recovery.
- **Recovery's per-channel divisor** ``sqrt(qbar[i])`` (1 for kept channels) comes from a per-head byte
  table, and the division is done as the reference does it (in float32, rounded once to the keys' dtype),
  so the result is **bit-identical** to the reference in every dtype (tested).
- **No allocation per read.** Positions, source rows and divisors go into a ``ReadScratch`` that a cache's
  layers share (they read one at a time): on a 2-core CPU, allocating those megabytes for every layer and
  step cost about a tenth of the read. Very long reads go in chunks of tokens, which bounds the scratch.
- On CUDA with Triton installed, keys and values are instead read by one fused Triton kernel
  (``triton_read.py``), equal to the reference within float32 rounding.

Example:
    >>> import torch
    >>> from hf_compress.cache.channels import PerTokenChannels
    >>> keys, qbar = torch.randn(1, 2, 5, 16), torch.rand(1, 2, 16) + 0.1
    >>> store = PerTokenChannels.compress_keys(keys, qbar, keep=8)
    >>> torch.equal(read_keys(store, qbar), store.densify_keys(qbar))
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import triton_read
from .channels import QBAR_FLOOR, recovery_limit


__all__ = ["ReadScratch", "read_keys", "read_values"]

# Entries of the one-lookup key table (groups x 256 bytes x (keep + 1) counts x 8 channels, int64): 2^22 is
# 32 MiB, reached near head_dim 160 at half the channels kept. Beyond it the two-lookup tables (a few MiB) serve.
_COMBINED_TABLE_ENTRIES = 1 << 22
# Reads of more channel positions than this go chunk by chunk of tokens, so a long context's scratch stays
# bounded (about 16 bytes a position: the int64 position, a source entry, a float32 divisor; ~64 MiB here).
_MAX_POSITIONS_PER_READ = 1 << 22


class ReadScratch:
    """Buffers a read reuses instead of allocating: positions, source rows and divisors of one layer's read.

    A cache's layers share one (they read one at a time, each read consumes its buffers before returning);
    it grows to the largest read and is freed with the cache.

    Example:
        >>> scratch = ReadScratch()
        >>> scratch.take("source", 6, torch.float32, torch.device("cpu")).shape
        torch.Size([6])
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D view of ``numel`` elements of buffer ``name`` (contents undefined)."""
        buffer = self._buffers.get(name)
        # A buffer made under inference_mode cannot be written outside it (and would be unsafe inside autograd).
        inference = torch.is_inference_mode_enabled()
        if (buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device
                or buffer.is_inference() != inference):
            # Headroom: a decoding cache grows by a token per step; regrow every few percent, not every step.
            buffer = torch.empty(max(numel + numel // 16, 64), dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:numel]

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())


@dataclasses.dataclass(frozen=True)
class _Tables:
    """Per (head_dim, keep, device) constants; positions are int64 because ``torch.gather`` takes no other."""

    groups: int
    popcount: torch.Tensor  # (256,) int32: kept channels in a byte
    kept: torch.Tensor  # (256, 8) bool: channel j of byte b is kept
    signs: torch.Tensor  # (256, 8) float32: +1 where a sign bit is set (the pruned entry was >= 0), else -1
    value: torch.Tensor  # (256 * (keep + 1), 8): row b * (keep + 1) + u, u kept channels before the byte
    key: torch.Tensor | None  # (groups * 256 * (keep + 1), 8): row (g * 256 + b) * (keep + 1) + u, or None
    key_kept: torch.Tensor  # two-lookup keys: kept positions, row b * (keep + 1) + u (0 for pruned channels)
    key_pruned: torch.Tensor  # pruned positions, row b * (head_dim - keep + 1) + v (0 for kept channels)


@functools.lru_cache(maxsize=64)
def _tables(head_dim: int, keep: int, device: torch.device) -> _Tables:
    """Row tables: where each of a byte's 8 channels is found in a token's source row.

    A byte of a token's kept mask with value ``b``, after ``u`` kept and ``v`` pruned channels in earlier bytes:
    its kept channel ``j`` is at ``u + (kept up to j in b) - 1`` and its pruned channel ``j`` at
    ``keep + v + (pruned before j in b)`` (keys) or at ``keep`` (values: the fill). For the byte at group ``g``,
    ``v = 8 g - u``, so ``(g, b, u)`` fixes all 8 positions: the one-lookup key table.
    """
    # Normal tensors even when first built under inference_mode: autograd may use them later (lru-cached).
    with torch.inference_mode(False):
        return _build_tables(head_dim, keep, device)


def _build_tables(head_dim: int, keep: int, device: torch.device) -> _Tables:
    # Built on the CPU (small), then moved to the store's device once.
    groups = math.ceil(head_dim / 8)
    bits = (torch.arange(256, device="cpu").unsqueeze(-1) >> torch.arange(8, device="cpu")) & 1  # bit j of byte b
    kept = bits.bool().view(256, 1, 8)
    kept_up_to = bits.cumsum(-1).view(256, 1, 8)
    pruned_before = (torch.arange(8, device="cpu") - bits.cumsum(-1) + bits).view(256, 1, 8)
    before_kept = torch.arange(keep + 1, device="cpu").view(1, -1, 1)
    kept_at = before_kept + kept_up_to - 1  # (256, keep + 1, 8)
    key = None
    if groups * 256 * (keep + 1) * 8 <= _COMBINED_TABLE_ENTRIES:
        pruned_at = keep + 8 * torch.arange(groups, device="cpu").view(-1, 1, 1, 1) - before_kept + pruned_before
        # Rows with u > 8 g never occur; clamping keeps their (unused) entries inside the row.
        key = torch.where(kept, kept_at, pruned_at).clamp_(0, head_dim - 1).reshape(-1, 8)
    before_pruned = torch.arange(head_dim - keep + 1, device="cpu").view(1, -1, 1)
    tables = _Tables(
        groups=groups,
        popcount=bits.sum(-1).int(),
        kept=kept.view(256, 8),
        signs=torch.where(kept.view(256, 8), 1.0, -1.0),
        value=torch.where(kept, kept_at, keep).reshape(-1, 8),
        key=key,
        key_kept=(kept_at * kept).reshape(-1, 8),
        key_pruned=((keep + before_pruned + pruned_before) * ~kept).reshape(-1, 8),
    )
    return dataclasses.replace(tables, **{
        field.name: getattr(tables, field.name).to(device)
        for field in dataclasses.fields(tables) if isinstance(getattr(tables, field.name), torch.Tensor)
    })


def _positions(store, tables: _Tables, kind: str, scratch: ReadScratch | None) -> torch.Tensor:
    """``(B, H, T, head_dim)`` int64: each channel's position in its token's source row (``kind``: key/value).

    ``scratch=None`` allocates the result: a differentiable gather keeps its index for the backward pass, which a
    shared scratch buffer would not survive (the next layer's read overwrites it)."""
    kept_bits, head_dim, keep = store.kept_bits, store.head_dim, store.kept.shape[-1]
    *lead, groups = kept_bits.shape
    byte = kept_bits.int()
    popcount = tables.popcount.index_select(0, byte.view(-1)).view(byte.shape)
    kept_before = popcount.cumsum(-1, dtype=torch.int32).sub_(popcount)
    positions = (torch.empty(byte.numel() * 8, dtype=torch.int64, device=byte.device) if scratch is None
                 else scratch.take("positions", byte.numel() * 8, torch.int64, byte.device)).view(-1, 8)
    if kind == "value":
        torch.index_select(tables.value, 0, byte.mul(keep + 1).add_(kept_before).view(-1), out=positions)
    elif tables.key is not None:
        group_row = torch.arange(0, groups * 256, 256, device=byte.device, dtype=torch.int32)
        row = byte.add(group_row).mul_(keep + 1).add_(kept_before)
        torch.index_select(tables.key, 0, row.view(-1), out=positions)
    else:
        torch.index_select(tables.key_kept, 0, byte.mul(keep + 1).add_(kept_before).view(-1), out=positions)
        pruned_before = torch.arange(0, 8 * groups, 8, device=byte.device, dtype=torch.int32) - kept_before
        pruned_row = byte.mul(head_dim - keep + 1).add_(pruned_before)
        positions += tables.key_pruned.index_select(0, pruned_row.view(-1))
    return positions.view(*lead, groups * 8)[..., :head_dim]


def _source(kept: torch.Tensor, width: int, scratch: ReadScratch) -> torch.Tensor:
    """A ``(..., width)`` row per token in the scratch, the kept values copied into its start (the rest unset)."""
    shape = (*kept.shape[:-1], width)
    source = scratch.take("source", math.prod(shape), kept.dtype, kept.device).view(shape)
    source[..., : kept.shape[-1]].copy_(kept)
    return source


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _token_chunks(store) -> int | None:
    """Tokens per chunk when one read of ``store`` would pass ``_MAX_POSITIONS_PER_READ``, else ``None``."""
    batch, heads, tokens = store.kept.shape[:3]
    per_token = batch * heads * store.head_dim
    if tokens <= 1 or tokens * per_token <= _MAX_POSITIONS_PER_READ:  # one token is read whole, however wide
        return None
    return max(1, _MAX_POSITIONS_PER_READ // per_token)


def read_keys(store, qbar: torch.Tensor | None, out: torch.Tensor | None = None,
              scratch: ReadScratch | None = None) -> torch.Tensor:
    """``store.densify_keys(qbar)`` (bit-identical), written into ``out`` when given.

    ``store`` is a key ``PerTokenChannels``; ``qbar=None`` (no recovery) rebuilds pruned entries as zeros.
    ``scratch`` holds the intermediate buffers between calls. Differentiable when its inputs require grad
    (no ``out`` then, and no Triton).
    """
    kept, head_dim = store.kept, store.head_dim
    differentiable = _needs_grad(kept, store.fill, *([] if qbar is None else [qbar]))
    if out is None and not differentiable:
        out = kept.new_empty(*kept.shape[:-1], head_dim)
    if kept.shape[2] == 0:
        return kept.new_empty(*kept.shape[:-1], head_dim) if out is None else out
    mode = "keys" if qbar is not None and store.sign_bits is not None else "zeros"
    if out is not None and triton_read.usable(kept):
        return triton_read.read_channels(store, qbar, out, mode=mode)
    scratch = scratch or ReadScratch()
    if not differentiable and (chunk := _token_chunks(store)):
        for start in range(0, kept.shape[2], chunk):
            read_keys(store.token_range(start, start + chunk), qbar, out[:, :, start : start + chunk], scratch)
        return out
    keep, tables = kept.shape[-1], _tables(head_dim, kept.shape[-1], kept.device)
    if mode == "zeros":  # pruned channels all point at one zero after the kept values
        positions = _positions(store, tables, "value", None if differentiable else scratch)
        if differentiable:
            return torch.gather(torch.nn.functional.pad(kept, (0, 1)), -1, positions)
        source = _source(kept, keep + 1, scratch)
        source[..., keep] = 0
        return torch.gather(source, -1, positions, out=out)
    *lead, sign_bytes = store.sign_bits.shape
    signs = tables.signs.to(kept.dtype).index_select(0, store.sign_bits.reshape(-1).int())
    signs = signs.view(*lead, sign_bytes * 8)[..., : head_dim - keep]
    positions = _positions(store, tables, "key", None if differentiable else scratch)
    if differentiable:
        rebuilt = torch.gather(torch.cat([kept, signs * store.fill.unsqueeze(-1)], -1), -1, positions)
    else:  # rebuilt in place in `out`, divided below
        source = _source(kept, head_dim, scratch)
        torch.mul(signs, store.fill.unsqueeze(-1), out=source[..., keep:])
        torch.gather(source, -1, positions, out=out)
    # Divisor per channel: 1 where kept, sqrt(qbar) where pruned; looked up per (batch, head), group and byte.
    batch, heads, groups = qbar.shape[0], qbar.shape[1], tables.groups
    root = torch.nn.functional.pad(qbar.float().clamp_min(QBAR_FLOOR).sqrt(), (0, groups * 8 - head_dim), value=1.0)
    divisors = root.view(batch * heads * groups, 1, 8).expand(-1, 256, 8).masked_fill(tables.kept, 1.0)
    row = torch.arange(0, batch * heads * groups * 256, 256, device=kept.device, dtype=torch.int32)
    row = store.kept_bits.int().add_(row.view(batch, heads, 1, groups)).view(-1)
    # float32 division rounded once to the keys' dtype: exactly the reference's `fill / sqrt(qbar)`, clamped
    # where the dtype's range is narrower (float16: a quotient past 65504 rounds to inf, clamped back to 65504).
    limit = recovery_limit(kept.dtype)
    if differentiable:
        divisor = divisors.view(-1, 8).index_select(0, row).view(*lead, groups * 8)[..., :head_dim]
        quotient = torch.div(rebuilt, divisor)
        return (quotient if limit is None else quotient.clamp(-limit, limit)).to(kept.dtype)
    divisor = scratch.take("divisor", row.numel() * 8, torch.float32, kept.device).view(-1, 8)
    torch.index_select(divisors.view(-1, 8), 0, row, out=divisor)
    out.div_(divisor.view(*lead, groups * 8)[..., :head_dim])
    return out if limit is None else out.clamp_(-limit, limit)


def read_values(store, out: torch.Tensor | None = None, scratch: ReadScratch | None = None) -> torch.Tensor:
    """``store.densify_values()`` (bit-identical: pure data movement), written into ``out`` when given."""
    kept, head_dim = store.kept, store.head_dim
    differentiable = _needs_grad(kept, store.fill)
    if out is None and not differentiable:
        out = kept.new_empty(*kept.shape[:-1], head_dim)
    if kept.shape[2] == 0:
        return kept.new_empty(*kept.shape[:-1], head_dim) if out is None else out
    if out is not None and triton_read.usable(kept):
        return triton_read.read_channels(store, None, out, mode="values")
    scratch = scratch or ReadScratch()
    if not differentiable and (chunk := _token_chunks(store)):
        for start in range(0, kept.shape[2], chunk):
            read_values(store.token_range(start, start + chunk), out[:, :, start : start + chunk], scratch)
        return out
    keep, tables = kept.shape[-1], _tables(head_dim, kept.shape[-1], kept.device)
    positions = _positions(store, tables, "value", None if differentiable else scratch)
    if differentiable:
        return torch.gather(torch.cat([kept, store.fill.unsqueeze(-1)], -1), -1, positions)
    source = _source(kept, keep + 1, scratch)
    source[..., keep] = store.fill
    return torch.gather(source, -1, positions, out=out)
