"""Fast reads of per-token channel stores: kept channels gathered and pruned ones rebuilt in one gather.

``PerTokenChannels.densify_keys`` / ``densify_values`` (channels.py) are the reference: readable, about a
dozen full-size passes (bit unpacking, ``cumsum`` ranks, two gathers, ``torch.where`` with broadcasting).
This module computes the same tensors with fewer, cheaper passes, and is what the cache layer reads with:

- **Where each channel comes from, by byte tables.** A token's kept-channel bitmask is read one byte
  (8 channels) at a time. For every byte value, 256-row tables give each channel's rank inside the byte;
  the kept channels before the byte (a ``cumsum`` over ``head_dim / 8`` popcounts, not ``head_dim`` flags)
  complete it. So the gather index of all ``head_dim`` channels is two ``index_select`` row lookups (rows
  keyed by byte value and kept/pruned channels before it) and one add, in int32 where ``index_select``
  takes it.
- **One gather (an ``index_select`` over flattened rows) from a per-token source row** ``[kept values | pruned entries in pruned order]``: the pruned
  part is ``±fill`` for keys (its signs unpacked by a ±1 byte table), the fill for values, zeros without
  recovery. Kept channels take their value, pruned ones their entry, in the same gather.
- **Recovery's per-channel divisor** ``sqrt(qbar[i])`` (1 for kept channels) comes from a per-head byte
  table, and the division is done as the reference does it (in float32, rounded once to the keys' dtype),
  so the result is **bit-identical** to the reference in every dtype (tested).
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

import functools

import torch

from . import triton_read
from .channels import QBAR_FLOOR


__all__ = ["read_keys", "read_values"]


@functools.cache
def _index_dtype() -> torch.dtype:
    """int32 halves the index traffic where ``index_select`` takes it (recent torch); int64 otherwise."""
    try:
        torch.zeros(2, device="cpu").index_select(0, torch.zeros(1, dtype=torch.int32, device="cpu"))
    except (RuntimeError, TypeError):
        return torch.int64
    return torch.int32


@functools.lru_cache(maxsize=64)
def _byte_tables(head_dim: int, keep: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Row tables: where each of a byte's 8 channels is found in a token's source row.

    A byte (8 channels) of a token's kept mask with value ``b``, after ``u`` kept and ``v`` pruned channels
    in earlier bytes: its kept channel ``j`` is at ``u + (kept up to j in b) - 1`` and its pruned channel
    ``j`` at ``keep + v + (pruned before j in b)`` (keys) or at ``keep`` (values: the fill). ``kept[b * (keep
    + 1) + u]`` holds the kept positions (0 elsewhere), ``pruned[b * (head_dim - keep + 1) + v]`` the pruned
    ones: one row lookup each and one add give a byte's 8 positions, with no per-channel arithmetic.
    """
    # Built on the CPU (small), then moved to the store's device once.
    bits = (torch.arange(256, device="cpu").unsqueeze(-1) >> torch.arange(8, device="cpu")) & 1  # bit j of byte b
    kept = bits.bool()
    kept_up_to = bits.cumsum(-1)
    pruned_before = torch.arange(8, device="cpu") - kept_up_to + bits
    before_kept = torch.arange(keep + 1, device="cpu").view(1, -1, 1)
    before_pruned = torch.arange(head_dim - keep + 1, device="cpu").view(1, -1, 1)
    kept_rows = (before_kept + kept_up_to.unsqueeze(1) - 1) * kept.unsqueeze(1)  # (256, keep + 1, 8)
    tables = {
        "popcount": bits.sum(-1),
        "key_kept": kept_rows.reshape(-1, 8),
        "key_pruned": ((keep + before_pruned + pruned_before.unsqueeze(1)) * ~kept.unsqueeze(1)).reshape(-1, 8),
        "value": torch.where(kept.unsqueeze(1), kept_rows, keep).reshape(-1, 8),
        "kept": kept,
        "signs": torch.where(kept, 1.0, -1.0),  # sign bit 1 = the pruned entry was >= 0
    }
    index_dtype = _index_dtype()
    return {
        name: table.to(device=device, dtype=index_dtype if table.dtype == torch.int64 else table.dtype)
        for name, table in tables.items()
    }


def _gather_rows(source: torch.Tensor, kept_bits: torch.Tensor, tables: dict[str, torch.Tensor], kind: str,
                 head_dim: int, keep: int) -> torch.Tensor:
    """``(B, H, T, head_dim)``: each token's channels picked from its ``source`` row (``(B, H, T, width)``).

    One ``index_select`` over the flattened rows, the token's row offset added to its positions: with int32
    positions this is several times cheaper than ``gather``, which widens its index to int64 first.
    """
    *lead, width = source.shape
    index = _channel_index(kept_bits, tables, kind, head_dim, keep)  # (B, H, T, groups * 8)
    rows = source.numel() // max(width, 1)
    index.view(rows, -1).add_(torch.arange(0, rows * width, width, device=index.device, dtype=index.dtype).unsqueeze(-1))
    index = index[..., :head_dim]
    picked = source.reshape(-1).index_select(0, index.reshape(-1))
    return picked.view(*lead, head_dim)


def _channel_index(kept_bits: torch.Tensor, tables: dict[str, torch.Tensor], kind: str, head_dim: int, keep: int):
    """``(B, H, T, groups * 8)`` positions in each token's source row, from the ``(B, H, T, groups)`` bitmask."""
    *lead, groups = kept_bits.shape
    byte = kept_bits.to(tables["popcount"].dtype)
    popcount = tables["popcount"].index_select(0, byte.view(-1)).view(*lead, groups)
    kept_before = popcount.cumsum(-1, dtype=popcount.dtype).sub_(popcount)
    kept_row = byte * (keep + 1) + kept_before
    if kind == "value":
        index = tables["value"].index_select(0, kept_row.view(-1))
    else:
        index = tables["key_kept"].index_select(0, kept_row.view(-1))
        pruned_before = torch.arange(0, 8 * groups, 8, device=byte.device, dtype=byte.dtype) - kept_before
        pruned_row = byte * (head_dim - keep + 1) + pruned_before
        index += tables["key_pruned"].index_select(0, pruned_row.view(-1))
    return index.view(*lead, groups * 8)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def read_keys(store, qbar: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``store.densify_keys(qbar)`` (bit-identical), written into ``out`` when given.

    ``store`` is a key ``PerTokenChannels``; ``qbar=None`` (no recovery) rebuilds pruned entries as zeros.
    Differentiable when its inputs require grad (no ``out`` then, and no Triton).
    """
    kept, head_dim = store.kept, store.head_dim
    if out is None and not _needs_grad(kept, store.fill, *([] if qbar is None else [qbar])):
        out = kept.new_empty(*kept.shape[:-1], head_dim)
    if kept.shape[2] == 0:
        return kept.new_empty(*kept.shape[:-1], head_dim) if out is None else out
    mode = "keys" if qbar is not None and store.sign_bits is not None else "zeros"
    if out is not None and triton_read.usable(kept):
        return triton_read.read_channels(store, qbar, out, mode=mode)
    keep = kept.shape[-1]
    tables = _byte_tables(head_dim, keep, kept.device)
    if mode == "zeros":
        source = torch.cat([kept, kept.new_zeros(*kept.shape[:-1], 1)], dim=-1)
        rebuilt = _gather_rows(source, store.kept_bits, tables, "value", head_dim, keep)
        return rebuilt if out is None else out.copy_(rebuilt)
    *lead, sign_bytes = store.sign_bits.shape
    signs = tables["signs"].to(kept.dtype).index_select(0, store.sign_bits.reshape(-1).int())
    pruned = signs.view(*lead, sign_bytes * 8)[..., : head_dim - keep].mul_(store.fill.unsqueeze(-1))
    rebuilt = _gather_rows(torch.cat([kept, pruned], dim=-1), store.kept_bits, tables, "key", head_dim, keep)
    # Divisor per channel: 1 where kept, sqrt(qbar) where pruned; looked up per (batch, head) and byte.
    batch, heads, groups = qbar.shape[0], qbar.shape[1], store.kept_bits.shape[-1]
    root = torch.nn.functional.pad(qbar.float().clamp_min(QBAR_FLOOR).sqrt(), (0, groups * 8 - head_dim), value=1.0)
    divisors = torch.where(tables["kept"], 1.0, root.view(batch, heads, groups, 1, 8)).view(-1, 8)
    head_row = torch.arange(batch * heads, device=kept.device, dtype=torch.int32).view(batch, heads, 1, 1)
    head_row *= groups * 256
    group_row = torch.arange(groups, device=kept.device, dtype=torch.int32) * 256
    row = (store.kept_bits.int() + group_row + head_row).view(-1)
    divisor = divisors.index_select(0, row).view(*lead, groups * 8)[..., :head_dim]
    # float32 division rounded once to the keys' dtype: exactly the reference's `fill / sqrt(qbar)`.
    if out is None:
        return torch.div(rebuilt, divisor).to(kept.dtype)
    return torch.div(rebuilt, divisor, out=out)


def read_values(store, out: torch.Tensor | None = None) -> torch.Tensor:
    """``store.densify_values()`` (bit-identical: pure data movement), written into ``out`` when given."""
    kept, head_dim = store.kept, store.head_dim
    if out is None and not _needs_grad(kept, store.fill):
        out = kept.new_empty(*kept.shape[:-1], head_dim)
    if kept.shape[2] == 0:
        return kept.new_empty(*kept.shape[:-1], head_dim) if out is None else out
    if out is not None and triton_read.usable(kept):
        return triton_read.read_channels(store, None, out, mode="values")
    keep = kept.shape[-1]
    tables = _byte_tables(head_dim, keep, kept.device)
    source = torch.cat([kept, store.fill.unsqueeze(-1)], dim=-1)
    rebuilt = _gather_rows(source, store.kept_bits, tables, "value", head_dim, keep)
    return rebuilt if out is None else out.copy_(rebuilt)
