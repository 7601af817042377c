"""Group-wise integer grids for weight-only quantization: one place for the arithmetic.

A linear weight ``W`` of shape ``(out_features, in_features)`` is cut, row by row, into groups of
``group_size`` consecutive input channels (``group_size=-1``: one group per row, i.e. per-channel).
Each group gets a scale ``s`` and a zero-point ``z`` and its values are stored as unsigned ``bits``-bit
codes ``q = clamp(round(w / s) + z, 0, 2**bits - 1)``, read back as ``s * (q - z)``.

- **Asymmetric** (default): the range is ``[min(w, 0), max(w, 0)]``, ``s = range / (2**bits - 1)``,
  ``z = round(-min / s)``. Zero is always representable, as in GPTQ/AWQ.
- **Symmetric**: ``s = max|w| / (2**(bits-1) - 1)``, ``z = 2**(bits-1)``. The signed codes
  ``[-2**(bits-1), 2**(bits-1) - 1]`` are stored shifted to unsigned.

A group size that does not divide ``in_features`` is allowed: the last group of each row is shorter and
its grid is computed on its own columns. (This equals zero-padding the row, because the range always
contains 0.) SmolLM2's 576-wide layers with groups of 128, for example, get four full groups and one
of 64.

The straight-through estimator lives here too (``round_clamp_ste``): the gradient of ``round`` is taken
as identity, and that of the clamp passes only inside the range.

Example:
    >>> import torch
    >>> w = torch.randn(4, 10)
    >>> grid = QuantizationGrid.fit(w, bits=4, group_size=4)
    >>> tuple(grid.scale.shape), grid.num_groups
    ((4, 3), 3)
    >>> codes = grid.quantize(w)
    >>> bool(codes.max() <= 15), bool((grid.quantize(grid.dequantize(codes)) == codes).all())
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


__all__ = [
    "SPARSITY_THRESHOLD", "SUPPORTED_BITS", "QuantizationGrid", "check_grid_arguments", "group_index", "keeps_sparsity",
    "round_clamp_ste",
]

SPARSITY_THRESHOLD = 0.1
"""``keep_sparsity="auto"``: a layer keeps its mask when at least this fraction of its weights is exactly 0.
Trained dense weights have practically no exact zeros; every pruning level worth storing sparse is far above."""

SUPPORTED_BITS: tuple[int, ...] = tuple(range(2, 9))
"""Bit widths the grid, the packing and the exported format support."""


def check_grid_arguments(bits: int, group_size: int) -> None:
    """Raise a ``ValueError`` that says what to pass when ``bits`` or ``group_size`` is unsupported.

    Example:
        >>> check_grid_arguments(3, 128)
        >>> check_grid_arguments(1, 128)
        Traceback (most recent call last):
        ...
        ValueError: bits must be an integer from 2 to 8, got 1.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an integer from {SUPPORTED_BITS[0]} to {SUPPORTED_BITS[-1]}, got {bits!r}.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ValueError(
            f"group_size must be a positive integer (e.g. 128) or -1 for one group per output channel, "
            f"got {group_size!r}."
        )


def keeps_sparsity(weight: torch.Tensor, setting: bool | str) -> bool:
    """Whether a layer with ``weight`` keeps its exact zeros as a mask when quantized (``keep_sparsity``).

    The grid needs no change for it: its range always contains 0, so the grid of a sparse weight is the grid
    of its kept weights, and a masked code at the zero-point reads back as exactly 0.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
        >>> keeps_sparsity(w, "auto"), keeps_sparsity(w, False), keeps_sparsity(torch.ones(2, 2), True)
        (True, False, False)
    """
    if setting is False:
        return False
    zeros = int((weight == 0).sum())
    return zeros > 0 if setting is True else zeros >= SPARSITY_THRESHOLD * weight.numel()


def check_keep_sparsity(setting: object) -> None:
    """``keep_sparsity`` must be ``"auto"``, ``True`` or ``False``."""
    if setting != "auto" and not isinstance(setting, bool):
        raise ValueError(f"keep_sparsity must be 'auto', True or False, got {setting!r}.")


def group_index(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """For each input column, the index of its group (``-1`` group size: all columns in group 0).

    Example:
        >>> group_index(5, 2).tolist()
        [0, 0, 1, 1, 2]
    """
    size = in_features if group_size == -1 or group_size >= in_features else group_size
    return torch.arange(in_features, device=device) // size


@dataclass
class QuantizationGrid:
    """The frozen per-group grid of one weight matrix: ``scale`` and ``zero`` of shape ``(out, groups)``.

    ``zero`` holds integer values in a float tensor (so it broadcasts in the fake-quant arithmetic);
    ``zero.to(torch.uint8)`` is exact.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    in_features: int

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    @property
    def num_groups(self) -> int:
        return self.scale.shape[1]

    @classmethod
    @torch.no_grad()
    def fit(cls, weight: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False) -> QuantizationGrid:
        """Min-max grid of ``weight`` (computed in float32 whatever its dtype)."""
        check_grid_arguments(bits, group_size)
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}.")
        out_features, in_features = weight.shape
        size = in_features if group_size == -1 or group_size >= in_features else group_size
        num_groups = math.ceil(in_features / size)
        padded = torch.zeros(out_features, num_groups * size, dtype=torch.float32, device=weight.device)
        padded[:, :in_features] = weight.float()
        groups = padded.view(out_features, num_groups, size)
        if symmetric:
            half = 2 ** (bits - 1)
            scale = groups.abs().amax(dim=-1) / (half - 1)
            zero = torch.full_like(scale, float(half))
        else:
            low = groups.amin(dim=-1).clamp(max=0)
            high = groups.amax(dim=-1).clamp(min=0)
            scale = (high - low) / (2**bits - 1)
            zero = None
        # An all-zero group has no range: any scale reproduces it exactly.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if zero is None:
            zero = torch.round(-low / scale).clamp(0, 2**bits - 1)
        return cls(scale=scale, zero=zero, bits=bits, group_size=size, in_features=in_features)

    def columns(self, per_group: torch.Tensor) -> torch.Tensor:
        """Expand an ``(out, groups)`` tensor to ``(out, in_features)`` (differentiable)."""
        index = group_index(self.in_features, self.group_size, device=per_group.device)
        return per_group.index_select(1, index)

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest codes of ``weight`` on this grid, as float values in ``[0, max_code]``."""
        scaled = weight.float() / self.columns(self.scale)
        return (torch.round(scaled) + self.columns(self.zero)).clamp(0, self.max_code)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scale * (codes - zero)`` column-wise; ``scale`` defaults to the grid's own."""
        scale = self.scale if scale is None else scale
        return self.columns(scale) * (codes.float() - self.columns(self.zero))


class _RoundClampSTE(torch.autograd.Function):
    """``clamp(round(u) + zero, 0, max_code)`` with the straight-through gradient."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, zero: torch.Tensor, max_code: int) -> torch.Tensor:
        shifted = torch.round(values) + zero
        inside = (shifted >= 0) & (shifted <= max_code)
        ctx.save_for_backward(inside)  # a bool mask: the only tensor kept for backward
        return shifted.clamp(0, max_code)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def round_clamp_ste(values: torch.Tensor, zero: torch.Tensor, max_code: int) -> torch.Tensor:
    """Integer codes ``clamp(round(values) + zero, 0, max_code)`` whose gradient is the identity inside the range.

    Example:
        >>> u = torch.tensor([0.4, 2.6, 9.0], requires_grad=True)
        >>> q = round_clamp_ste(u, torch.zeros(3), 7)
        >>> q.tolist()
        [0.0, 3.0, 7.0]
        >>> q.sum().backward(); u.grad.tolist()
        [1.0, 1.0, 0.0]
    """
    return _RoundClampSTE.apply(values, zero, max_code)
