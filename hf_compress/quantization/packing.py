"""Bit-packing of unsigned integer codes, any width from 2 to 8 bits.

Every 8 consecutive codes of a row are packed into ``bits`` bytes, little-endian: code ``j`` of the
eight occupies bits ``[bits*j, bits*(j+1))`` of that run. This packs widths that do not divide 8 (3, 5,
6 and 7 bits) with no wasted bits, and one format serves every width. Rows are padded with zero codes
to a multiple of 8 columns, so a row of ``n`` codes takes ``ceil(n / 8) * bits`` bytes.

Unpacking is the hot path of the dequantize-on-the-fly linear layer. A code spans at most two
adjacent bytes, so the j-th code of every run is read at once from one or two contiguous byte planes
with shifts and a mask, all in ``uint8``: eight passes, no gathers, no wider integers.

Example:
    >>> import torch
    >>> codes = torch.randint(0, 8, (2, 13), dtype=torch.uint8)
    >>> packed = pack_codes(codes, bits=3)
    >>> tuple(packed.shape), packed.dtype
    ((2, 6), torch.uint8)
    >>> bool((unpack_codes(packed, bits=3, columns=13) == codes).all())
    True
"""

from __future__ import annotations

import math

import torch

from .grid import check_grid_arguments


__all__ = ["pack_codes", "packed_columns", "unpack_codes"]


def packed_columns(columns: int, bits: int) -> int:
    """Bytes per row for ``columns`` codes of ``bits`` bits.

    Example:
        >>> packed_columns(576, 3)
        216
    """
    return math.ceil(columns / 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 2-D tensor of codes in ``[0, 2**bits)`` into a ``uint8`` tensor, row by row."""
    check_grid_arguments(bits, -1)
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes (rows, columns), got shape {tuple(codes.shape)}.")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing.")
    rows, columns = codes.shape
    runs = math.ceil(columns / 8)
    padded = torch.zeros(rows, runs * 8, dtype=torch.int32, device=codes.device)
    padded[:, :columns] = codes.to(torch.int32)
    padded = padded.view(rows, runs, 8)
    # The mirror of unpack_codes: code j of every run is OR-ed into its one or two bytes, one plane at a time.
    packed = torch.zeros(rows, runs, bits, dtype=torch.int32, device=codes.device)
    for j in range(8):
        first, shift = divmod(bits * j, 8)
        value = padded[:, :, j]
        packed[:, :, first] |= (value << shift) & 0xFF
        if shift + bits > 8:
            packed[:, :, first + 1] |= value >> (8 - shift)
    return packed.view(rows, runs * bits).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``(rows, columns)`` codes as ``uint8``."""
    rows = packed.shape[0]
    if packed.shape[1] != packed_columns(columns, bits):
        raise ValueError(
            f"a row of {columns} {bits}-bit codes packs into {packed_columns(columns, bits)} bytes, "
            f"got {packed.shape[1]}."
        )
    # Byte k of every run as one contiguous plane: strided uint8 bitwise ops are several times slower.
    planes = packed.view(rows, -1, bits).permute(2, 0, 1).contiguous()
    mask = 2**bits - 1
    values = []
    for j in range(8):
        first, shift = divmod(bits * j, 8)
        value = planes[first] >> shift
        if shift + bits > 8:
            # The code's high bits start the next byte. Shifted into place they stay inside one byte,
            # so uint8 arithmetic suffices (what overflows is masked away anyway).
            value |= planes[first + 1] << (8 - shift)
        values.append(value.bitwise_and_(mask))
    return torch.stack(values, dim=-1).view(rows, -1)[:, :columns]
