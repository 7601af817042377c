"""One fused Triton read of per-token channel stores on CUDA: gather the kept channels, rebuild the pruned ones.

Used by ``read.py`` only when ``triton`` imports and the store lives on a CUDA device; everywhere else the
PyTorch byte-table path runs. One program handles ``BLOCK_T`` tokens of one (batch, head): it loads each
token's kept-channel bitmask, takes every channel's rank among the kept ones with a ``cumsum`` over the
channel axis, loads kept values by rank and, for pruned channels, the sign bit at their rank among the pruned
ones, and writes ``±fill / sqrt(qbar[i])`` (keys, SparK's recovery; clamped to ``recovery_limit`` as every reader
does), the fill (values) or zero. Each
compressed byte is read once and each output element written once.

``sqrt(qbar)`` is computed by PyTorch as in the reference; the division is IEEE round-to-nearest
(``div_rn``) where Triton provides it, so results match ``densify_keys`` exactly, else within float32
rounding (``tests/test_spark_cache.py``, ``cuda`` marker).

Example:
    >>> usable(torch.zeros(1))  # a CPU tensor: the PyTorch path is used
    False
"""

from __future__ import annotations

import functools

import torch

from .channels import QBAR_FLOOR, recovery_limit


__all__ = ["read_channels", "usable"]

_MODES = {"keys": 0, "values": 1, "zeros": 2}


@functools.cache
def _kernel():
    """The compiled-on-first-use kernel, or ``None`` when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    exact_division = hasattr(tl, "div_rn")

    @triton.jit
    def read_kernel(
        kept_ptr, bits_ptr, signs_ptr, fill_ptr, root_ptr, out_ptr, tokens, limit,
        kept_bh, kept_t, bits_bh, bits_t, signs_bh, signs_t, fill_bh, fill_t, out_bh, out_t,
        HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr,
        EXACT_DIVISION: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        token = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T))[:, None]
        channel = tl.arange(0, BLOCK_D)[None, :]
        row_ok = token < tokens
        ok = row_ok & (channel < HEAD_DIM)
        byte = tl.load(bits_ptr + bh * bits_bh + token * bits_t + channel // 8, mask=ok, other=0).to(tl.int32)
        kept_flag = (byte >> (channel % 8)) & 1
        kept_rank = tl.cumsum(kept_flag, axis=1)  # kept channels up to and including this one
        is_kept = (kept_flag != 0) & ok
        kept = tl.load(kept_ptr + bh * kept_bh + token * kept_t + (kept_rank - 1), mask=is_kept, other=0.0)
        if MODE == 0:
            pruned_rank = channel - kept_rank
            is_pruned = ok & (kept_flag == 0)
            sign_byte = tl.load(signs_ptr + bh * signs_bh + token * signs_t + pruned_rank // 8, mask=is_pruned, other=0)
            positive = ((sign_byte.to(tl.int32) >> (pruned_rank % 8)) & 1) != 0
            fill = tl.load(fill_ptr + bh * fill_bh + token * fill_t, mask=row_ok, other=0.0).to(tl.float32)
            root = tl.load(root_ptr + bh * HEAD_DIM + channel, mask=channel < HEAD_DIM, other=1.0)
            if EXACT_DIVISION:
                magnitude = tl.div_rn(fill, root)
            else:
                magnitude = fill / root
            magnitude = tl.minimum(magnitude, limit)  # float16's range (recovery_limit); float32's max otherwise
            magnitude = magnitude.to(out_ptr.dtype.element_ty)
            rebuilt = tl.where(positive, magnitude, -magnitude)
        elif MODE == 1:
            rebuilt = tl.load(fill_ptr + bh * fill_bh + token * fill_t, mask=row_ok, other=0.0)
        else:
            rebuilt = tl.zeros((BLOCK_T, BLOCK_D), dtype=out_ptr.dtype.element_ty)
        value = tl.where(is_kept, kept, rebuilt)
        tl.store(out_ptr + bh * out_bh + token * out_t + channel, value, mask=ok)

    return triton, read_kernel, exact_division


def usable(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernel serves ``tensor``: it is on a CUDA device and Triton imports."""
    return tensor.is_cuda and _kernel() is not None


def _rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``tensor`` (B, H, T, ...) with (batch, head) flattenable by one stride, unit channel stride; its strides."""
    batch_stride_ok = tensor.shape[0] == 1 or tensor.stride(0) == tensor.shape[1] * tensor.stride(1)
    if not batch_stride_ok or (tensor.dim() == 4 and tensor.stride(-1) != 1):
        tensor = tensor.contiguous()
    return tensor, tensor.stride(1), tensor.stride(2)


def read_channels(store, qbar: torch.Tensor | None, out: torch.Tensor, mode: str) -> torch.Tensor:
    """Fill ``out`` (B, H, T, head_dim) from a ``PerTokenChannels`` store; ``mode`` is keys, values or zeros."""
    triton, kernel, exact_division = _kernel()
    batch, heads, tokens, head_dim = out.shape
    kept, kept_bh, kept_t = _rows(store.kept)
    bits, bits_bh, bits_t = _rows(store.kept_bits)
    fill, fill_bh, fill_t = _rows(store.fill)
    target, out_bh, out_t = _rows(out)
    if mode == "keys":
        signs, signs_bh, signs_t = _rows(store.sign_bits)
        root = qbar.float().clamp_min(QBAR_FLOOR).sqrt().contiguous()
    else:  # unused pointers: any tensor on the device
        signs, signs_bh, signs_t, root = bits, bits_bh, bits_t, fill
    block_t = 32
    grid = (batch * heads, triton.cdiv(tokens, block_t))
    limit = recovery_limit(out.dtype)
    kernel[grid](
        kept, bits, signs, fill, root, target, tokens, torch.finfo(torch.float32).max if limit is None else limit,
        kept_bh, kept_t, bits_bh, bits_t, signs_bh, signs_t, fill_bh, fill_t, out_bh, out_t,
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(head_dim), MODE=_MODES[mode],
        EXACT_DIVISION=exact_division,
    )
    if target is not out:
        out.copy_(target)
    return out
