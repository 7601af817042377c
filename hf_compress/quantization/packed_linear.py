"""``PackedLinear``: a linear layer whose weight is stored as packed low-bit codes.

Buffers (all saved in the checkpoint):

- ``qweight``: ``uint8 (out_features, ceil(in_features / 8) * bits)``, the codes packed by
  ``hf_compress.quantization.packing``;
- ``scales``: ``(out_features, groups)`` in the model's floating dtype;
- ``qzeros``: ``uint8 (out_features, groups)``, the zero-points;
- ``bias`` (a parameter) when the original layer had one.

Its state dict also holds ``weight``: one ``uint8`` byte (the bit width), a marker that makes stock
transformers refuse the checkpoint (wrong shape for a linear weight) rather than load random layers.

The reference forward dequantizes the whole weight on the fly (``scales * (codes - qzeros)``) in the
input's dtype and discards it after the matmul: only the packed form stays resident, at the price of an
unpack per call (~15× a dense layer at decode on CPU). ``kernel`` (``"auto"`` by default, see
``hf_compress.quantization.kernels``) lets a call take a kernel instead: a fused Triton unpack-and-matmul on
CUDA, or PyTorch's int4 CPU kernel over a once-converted copy of the codes (a bounded cache, not saved).

Example:
    >>> import torch
    >>> from hf_compress.quantization.grid import QuantizationGrid
    >>> w = torch.randn(8, 16)
    >>> grid = QuantizationGrid.fit(w, bits=4, group_size=8)
    >>> layer = PackedLinear.from_codes(grid.quantize(w), grid.scale, grid.zero, bits=4, group_size=8)
    >>> x = torch.randn(2, 16)
    >>> bool(torch.allclose(layer(x), x @ grid.dequantize(grid.quantize(w)).T, atol=1e-6))
    True
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .grid import check_grid_arguments
from .kernels import cpu_int4, triton_packed
from .packing import pack_codes, packed_columns, unpack_codes


__all__ = ["FORMAT_MARKER", "PackedLinear"]

FORMAT_MARKER = "weight"
"""State-dict key of the one-byte marker each packed layer saves (the number of bits), see ``_save_to_state_dict``."""


class PackedLinear(nn.Module):
    """Linear layer over packed ``bits``-bit group-quantized weights (dequantize on the fly, or a kernel).

    ``kernel``: ``"auto"``, ``"fast"`` or ``"reference"`` (see ``hf_compress.quantization.kernels``).
    """

    kernel: str = "auto"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_grid_arguments(bits, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = in_features if group_size == -1 or group_size >= in_features else group_size
        groups = -(-in_features // self.group_size)
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_columns(in_features, bits), dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("qzeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.expects_marker_in_state_dict = True
        self.kernel = "auto"
        self._int4_cache: tuple[tuple, cpu_int4.Int4Weight] | None = None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> PackedLinear:
        """Build the layer from integer ``codes (out, in)``, ``scales`` and ``zeros (out, groups)``."""
        out_features, in_features = codes.shape
        dtype = dtype or scales.dtype
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, dtype=dtype, device=codes.device)
        if tuple(scales.shape) != tuple(layer.scales.shape) or tuple(zeros.shape) != tuple(layer.qzeros.shape):
            raise ValueError(
                f"scales/zeros must have shape {tuple(layer.scales.shape)} for {in_features} inputs in groups of "
                f"{layer.group_size}; got {tuple(scales.shape)} and {tuple(zeros.shape)}."
            )
        with torch.no_grad():
            layer.qweight.copy_(pack_codes(codes.round().to(torch.int32), bits))
            layer.scales.copy_(scales.to(dtype))
            layer.qzeros.copy_(zeros.round().to(torch.uint8))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    def codes(self) -> torch.Tensor:
        """The unpacked ``uint8`` codes ``(out_features, in_features)``."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``scales * (codes - zeros)`` as a dense ``(out, in)`` tensor in ``dtype``."""
        dtype = dtype or self.scales.dtype
        weight = unpack_codes(self.qweight, self.bits, self.in_features).to(dtype)
        zeros, scales = self.qzeros.to(dtype), self.scales.to(dtype)
        # In place, group by group through views: no expanded scale/zero tensors, no padding copy.
        full = self.in_features // self.group_size
        if full:
            grouped = weight[:, : full * self.group_size].unflatten(1, (full, self.group_size))
            grouped.sub_(zeros[:, :full, None]).mul_(scales[:, :full, None])
        if full < scales.shape[1]:  # the shorter last group
            weight[:, full * self.group_size :].sub_(zeros[:, full:]).mul_(scales[:, full:])
        return weight

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``[out, in]`` weight, computed on access (a new tensor: writing to it changes nothing).

        Read-only on purpose: code that only inspects ``layer.weight`` (its dtype, device or values, or
        transformers' weight initialisers walking the model at load time) keeps working.
        """
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        path = kernels.choose(self, x)
        if path == "triton":
            # The bias is fused unless autograd must reach it.
            fused = bias is not None and not (torch.is_grad_enabled() and bias.requires_grad)
            y = triton_packed.packed_matmul(x, self.qweight, self.scales, self.qzeros, bias if fused else None,
                                            self.bits, self.group_size, self.in_features)
            return y + bias if bias is not None and not fused else y
        if path == "int4":
            y = self._int4_weight().matmul(x)
            return y + bias if bias is not None else y
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation: unpack and dequantize every code in ``x``'s dtype, then ``F.linear``."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    # ---------------------------------------------------------------------------------- kernel cache
    def _cache_key(self) -> tuple:
        # Any in-place change of the stored tensors (load_state_dict, copy_) bumps a version: rebuild then.
        return tuple((t.data_ptr(), t._version) for t in (self.qweight, self.scales, self.qzeros))

    def _int4_weight(self) -> cpu_int4.Int4Weight:
        key = self._cache_key()
        cached = getattr(self, "_int4_cache", None)
        if cached is None or cached[0] != key:
            self._int4_cache = None  # free the stale copy before building the new one
            self._int4_cache = (key, cpu_int4.Int4Weight.from_layer(self))
            kernels.register_holder(self)
        return self._int4_cache[1]

    def has_kernel_cache(self) -> bool:
        """Whether the CPU int4 kernel's copy of the codes is held (built on the first call that uses it)."""
        return getattr(self, "_int4_cache", None) is not None

    def kernel_cache_nbytes(self) -> int:
        """Bytes of the CPU kernel's copy of the codes held next to the packed buffers (0 when none)."""
        cached = getattr(self, "_int4_cache", None)
        return 0 if cached is None else cached[1].nbytes()

    def clear_kernel_cache(self) -> None:
        """Drop the CPU kernel's copy of the codes (rebuilt on the next call that uses it)."""
        self._int4_cache = None

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() ... replace the buffers: the cache would describe the old ones.
        self.clear_kernel_cache()
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # A one-byte ``weight`` marker: stock transformers (without hf_compress) finds ``weight`` with a
        # shape that fits no nn.Linear and refuses the checkpoint instead of initialising the layer randomly.
        # While from_pretrained fills this layer, the marker is not one of its keys (the loader skips it).
        if self.expects_marker_in_state_dict:
            destination[prefix + FORMAT_MARKER] = torch.tensor([self.bits], dtype=torch.uint8, device=self.qweight.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + FORMAT_MARKER, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def packed_bytes(self) -> int:
        """Bytes of the stored weight (codes, scales, zero-points; bias excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self.kernel!r}"
        )
