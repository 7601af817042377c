"""PyTorch's int4 weight-only CPU kernel behind ``PackedLinear``: no per-call unpack of the layer.

``torch._weight_int4pack_mm_for_cpu`` multiplies activations by weights held as 4-bit codes in its own
tiled layout, dequantizing inside the kernel (``w = (q - 8) * scale + zero`` per group, float32
accumulation). It is vectorised for **bfloat16** activations only: on this repository's CPUs its float32
and float16 paths are 10–25× slower than a dense layer, so this path always computes in bfloat16 and
casts the result back. Codes of 2, 3 and 4 bits all fit its 4-bit slots.

The kernel's layout is built once per layer from the packed codes (``Int4Weight.from_layer``) and kept
next to them (the saved ``qweight`` is untouched, so checkpoints stay byte-identical); it costs
``out × in / 2`` bytes plus a bfloat16 (scale, zero) pair per group of 32–256 inputs.

Our grid is ``w = s · (q − z)``; the kernel's is ``(q − 8) · s + zero``. Codes are stored re-centred,
``q − c + 8``, with ``zero = s · (c − z)``: ``c = z`` (a zero term of exactly 0) wherever the group's codes
lie within [z − 8, z + 7] (every group of ≤ 3 bits), else ``c = 8``. A group
size the kernel does not take (it accepts 32, 64, 128, 256), or a short last group, is expressed with the
largest accepted size dividing both the group size and ``in_features``, each group's (scale, zero) repeated.

A sparse layer's masked weights hold their group's zero-point ``z``: re-centred (``c = z``) they are
``(8 − 8) · s + 0``, exactly 0; with ``c = 8`` they would be ``(z − 8) · s + bf16(s · (8 − z))``, off by a
bfloat16 rounding. ``Int4Weight.recentred`` says whether every group was re-centred, and a sparse layer uses
this kernel only then (``PackedLinear._int4_weight``), so its masked weights stay exact zeros.

Checked on torch 2.13 (the ops exist since 2.5 under these names); absent ops make ``usable`` false and the
reference path runs.

Example:
    >>> import torch
    >>> from hf_compress.quantization.grid import QuantizationGrid
    >>> from hf_compress.quantization.packed_linear import PackedLinear
    >>> w = torch.randn(32, 64)
    >>> grid = QuantizationGrid.fit(w, bits=4, group_size=32)
    >>> layer = PackedLinear.from_codes(grid.quantize(w), grid.scale, grid.zero, bits=4, group_size=32)
    >>> kernel_group(layer)
    32
    >>> x = torch.randn(1, 64, dtype=torch.bfloat16)
    >>> y = Int4Weight.from_layer(layer).matmul(x)
    >>> bool(torch.allclose(y.float(), x.float() @ layer.dequantized_weight().T, rtol=0.02, atol=0.05))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from ..packed_linear import PackedLinear


__all__ = ["ACCEPTED_GROUPS", "Int4Weight", "kernel_group", "planned_nbytes", "usable"]

ACCEPTED_GROUPS = (256, 128, 64, 32)
"""Group sizes the kernel takes, largest first."""

_CONVERT = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
_MATMUL = getattr(torch, "_weight_int4pack_mm_for_cpu", None)


def kernel_group(layer: PackedLinear) -> int | None:
    """The kernel group size that expresses ``layer``'s grid exactly, or ``None`` when the kernel cannot run it.

    Needs codes of at most 4 bits, ``out_features`` a multiple of 16 (the kernel's tile) and an accepted size
    dividing both the layer's group size and ``in_features``.
    """
    if _CONVERT is None or _MATMUL is None or layer.bits > 4 or layer.out_features % 16:
        return None
    for size in ACCEPTED_GROUPS:
        if layer.group_size % size == 0 and layer.in_features % size == 0:
            return size
    return None


def planned_nbytes(layer: PackedLinear) -> int:
    """Bytes ``Int4Weight.from_layer(layer)`` will hold (``layer`` must pass ``kernel_group``)."""
    groups = layer.in_features // kernel_group(layer)
    return layer.out_features * layer.in_features // 2 + groups * layer.out_features * 2 * 2


def usable(layer: PackedLinear, x: torch.Tensor) -> bool:
    """Whether this path can run ``layer`` on ``x``: a CPU tensor and a layer ``kernel_group`` accepts."""
    return x.device.type == "cpu" and layer.qweight.device.type == "cpu" and kernel_group(layer) is not None


@dataclass(frozen=True)
class Int4Weight:
    """A layer's weight in the kernel's layout: tiled 4-bit codes and bfloat16 (scale, zero) per kernel group."""

    packed: torch.Tensor
    scale_zeros: torch.Tensor
    group: int
    out_features: int
    recentred: bool = False
    """Every group re-centred on its own zero-point: a code equal to it gives exactly 0 (see the module doc)."""

    @classmethod
    @torch.no_grad()
    def from_layer(cls, layer: PackedLinear) -> Int4Weight:
        """Convert ``layer``'s codes, scales and zero-points (one unpack, at build time only)."""
        group = kernel_group(layer)
        if group is None:
            raise ValueError(f"{layer.extra_repr()}: the CPU int4 kernel cannot express this layer; use the reference path.")
        rows, columns = layer.out_features, layer.in_features
        starts = torch.arange(0, columns, group, device=layer.scales.device) // layer.group_size
        scales = layer.scales.float()[:, starts]  # (out, in / group): each group's scale, repeated
        zeros = layer.qzeros[:, starts].to(torch.int32)
        codes = layer.codes().to(torch.int32).view(rows, -1, group)
        # Re-centre each group's codes on its own zero-point when they fit the kernel's [-8, 7] around it
        # (always for <= 3 bits): the kernel's zero term is then exactly 0, instead of s·(8 − z) cancelling
        # (q − 8)·s in bfloat16. Otherwise the codes stay and the zero term carries the shift.
        fits = (codes.amin(-1) - zeros >= -8) & (codes.amax(-1) - zeros <= 7)
        centre = torch.where(fits, zeros, 8)
        codes = codes.sub_(centre[..., None]).add_(8).view(rows, columns)
        packed = _CONVERT(codes, 1)  # inner k-tiles: 1 is as fast as 2/4/8 for one-token decode here
        del codes
        zeros = scales * (centre - zeros).float()
        scale_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed, scale_zeros, group, layer.out_features, recentred=bool(fits.all()))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x (..., in)`` of any float dtype, computed in bfloat16, returned in ``x.dtype``."""
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = _MATMUL(rows, self.packed, self.group, self.scale_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        """Bytes this form holds (codes in the kernel's layout + the (scale, zero) table)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_zeros))
