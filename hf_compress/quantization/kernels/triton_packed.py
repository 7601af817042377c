"""A fused unpack-and-matmul Triton kernel for ``PackedLinear`` on CUDA, reading the checkpoint's own packing.

Used only when ``triton`` imports and the layer lives on a CUDA device; elsewhere the PyTorch path runs.
One program computes a ``BLOCK_M × BLOCK_N`` tile of ``x @ W.T``: for each ``BLOCK_K`` slice of the inputs
it reads the packed bytes of its ``BLOCK_N`` rows straight from ``qweight`` (code ``k`` of a row starts
at bit ``bits · (k mod 8)`` of the ``bits``-byte run ``k // 8``, spanning at most two bytes, so every width
from 2 to 8 bits takes the same two loads, a shift and a mask), dequantizes them in registers as the
reference does (``(code − zero) · scale``, the scale first rounded to the activations' dtype) and feeds
``tl.dot``, accumulating in float32. No dense weight is ever written to memory, and no extra copy of the
codes is kept: the GPU path costs no memory beyond the packed layer.

Float32 activations use IEEE products (no TF32), so results match the reference within float32 rounding;
bfloat16/float16 ones match within that dtype's rounding (the weights are the reference's bit for bit,
only the summation order differs). ``tests/test_packed_kernels.py`` checks both (``cuda`` marker), and the
same kernel under ``TRITON_INTERPRET=1`` on CPU when Triton is installed.

Example:
    >>> usable(torch.zeros(1))  # a CPU tensor: the PyTorch path is used
    False
"""

from __future__ import annotations

import functools

import torch


__all__ = ["packed_matmul", "usable"]


@functools.lru_cache(maxsize=None)
def _kernel():
    """The compiled-on-first-use kernel, or ``None`` when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def packed_matmul_kernel(
        x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K,
        stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rm < M
        col_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            # Codes as the transposed tile (BLOCK_K, BLOCK_N): two byte loads, a shift, a mask.
            bit = (rk % 8) * BITS
            byte = (rk // 8) * BITS + bit // 8
            shift = (bit % 8)[:, None]
            ok = k_ok[:, None] & col_ok[None, :]
            row = q_ptr + rn[None, :].to(tl.int64) * stride_qn + byte[:, None]
            low = tl.load(row, mask=ok, other=0).to(tl.int32)
            high = tl.load(row + 1, mask=ok & (shift + BITS > 8), other=0).to(tl.int32)
            code = ((low | (high << 8)) >> shift) & ((1 << BITS) - 1)
            group = (rk // GROUP)[:, None]
            scale = tl.load(s_ptr + rn[None, :].to(tl.int64) * stride_sn + group, mask=ok, other=0.0)
            zero = tl.load(z_ptr + rn[None, :].to(tl.int64) * stride_zn + group, mask=ok, other=0).to(tl.float32)
            # As the reference: the scale in the activations' dtype, (code - zero) * scale rounded once to it.
            scale = scale.to(x_ptr.dtype.element_ty).to(tl.float32)
            w = ((code.to(tl.float32) - zero) * scale).to(x_ptr.dtype.element_ty)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    return triton, packed_matmul_kernel


def usable(x: torch.Tensor) -> bool:
    """Whether the Triton path runs for ``x``: a float CUDA tensor, and Triton installed."""
    return x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and _kernel() is not None


def packed_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bias: torch.Tensor | None,
    bits: int, group_size: int, in_features: int,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x (..., in_features)`` with ``W = scales · (codes − qzeros)`` unpacked on the fly.

    The arguments are ``PackedLinear``'s buffers; the result has ``x``'s dtype.
    """
    triton, kernel = _kernel()
    rows = x.reshape(-1, in_features).contiguous()
    out_features = qweight.shape[0]
    y = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    # Decode (a few rows) is bound by reading the codes: narrow column tiles spread them over more programs.
    block_m, block_n, block_k = (16, 32, 128) if rows.shape[0] <= 16 else (64, 64, 64)
    grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(out_features, block_n))
    kernel[grid](
        rows, qweight, scales, qzeros, bias if bias is not None else y, y, rows.shape[0], out_features, in_features,
        rows.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), y.stride(0),
        BITS=bits, GROUP=group_size, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.reshape(*x.shape[:-1], out_features)
