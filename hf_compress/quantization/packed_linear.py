"""``PackedLinear``: a linear layer whose weight is stored as packed low-bit codes.

Buffers (all saved in the checkpoint):

- ``qweight``: ``uint8 (out_features, ceil(in_features / 8) * bits)``, the codes packed by
  ``hf_compress.quantization.packing``;
- ``scales``: ``(out_features, groups)`` in the model's floating dtype;
- ``qzeros``: ``uint8 (out_features, groups)``, the zero-points;
- ``bias`` (a parameter) when the original layer had one.

Its state dict also holds ``weight``: one ``uint8`` byte (the bit width), a marker that makes stock
transformers refuse the checkpoint (wrong shape for a linear weight) rather than load random layers.

**Sparse layers** (a pruned weight, e.g. 2:4, quantized with its zeros kept): built with ``mask=`` (or
``kept=`` at load time), the layer also holds ``qmask``, the ``uint8 (out_features, ceil(in_features / 8))``
bitmask of the kept weights (``formats.sparse.pack_bitmask``), and ``qweight`` becomes 1-D: the packed codes of
the **kept** weights only, in row-major order (``ceil(kept / 8) * bits`` bytes). Every path rebuilds the dense
codes with each masked weight set to its group's zero-point ``z``, whose dequantized value ``s · (z − z)`` is
exactly 0 (the grid always contains 0), so masked weights are exact zeros: in the reference and in the
Triton kernel (which dequantizes the same way, from a once-built dense copy of the codes). The CPU int4
kernel computes ``(q − 8) · s + zero`` in bfloat16, exact for a masked weight only when its group is
re-centred on its own zero-point (``zero = 0``); a sparse layer takes that path only when every group is, and
keeps the reference path otherwise (``cpu_int4.exact_for_masked``).

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
    >>> mask = torch.arange(16).remainder(4) < 2  # keep 2 of every 4 inputs
    >>> sparse = PackedLinear.from_codes(grid.quantize(w), grid.scale, grid.zero, bits=4, group_size=8,
    ...                                  mask=mask.expand(8, 16))
    >>> tuple(sparse.qweight.shape), bool((sparse.weight[:, ~mask] == 0).all())
    ((32,), True)
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .grid import check_grid_arguments
from .kernels import cpu_int4, triton_packed
from .packing import pack_codes, packed_columns, unpack_codes


def _pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    from ..formats.sparse import pack_bitmask  # the sparse format's encoding; imported late (formats import us)

    return pack_bitmask(mask)


def _unpack_bitmask(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    from ..formats.sparse import unpack_bitmask

    return unpack_bitmask(packed, shape)


__all__ = ["FORMAT_MARKER", "PackedLinear"]

FORMAT_MARKER = "weight"
"""State-dict key of the one-byte marker each packed layer saves (the number of bits), see ``_save_to_state_dict``."""


class _DequantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` for a packed layer's frozen ``W``, dequantized again in the backward pass rather than kept for it.

    Autograd would otherwise hold every layer's float weight from the forward to the backward pass: the memory of
    the unquantized model, which is what training adapters over a packed model (QLoRA-style) must not need.
    """

    generate_vmap_rule = True  # torch.func (per-sample gradients with vmap) works through it, as through F.linear

    @staticmethod
    def forward(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        return nn.functional.linear(x, layer.dequantized_weight(x.dtype))

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor, PackedLinear], output: torch.Tensor) -> None:
        layer = inputs[1]
        ctx.layer, ctx.key = layer, layer._cache_key()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.layer._cache_key() != ctx.key:
            raise RuntimeError("A packed layer's codes changed between the forward and the backward pass; the "
                               "gradient would be taken through other weights. Change them outside a training step.")
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


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
        kept: int | None = None,
    ) -> None:
        """``kept``: a sparse layer storing the codes of ``kept`` weights and a ``qmask`` (``None``: dense)."""
        super().__init__()
        check_grid_arguments(bits, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = in_features if group_size == -1 or group_size >= in_features else group_size
        groups = -(-in_features // self.group_size)
        if kept is None:
            codes_shape: tuple[int, ...] = (out_features, packed_columns(in_features, bits))
        else:
            if isinstance(kept, bool) or not isinstance(kept, int) or not 0 <= kept <= in_features * out_features:
                raise ValueError(f"kept must be an integer in [0, {in_features * out_features}], got {kept!r}.")
            codes_shape = (packed_columns(kept, bits),)
            self.register_buffer(
                "qmask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8, device=device)
            )
        self.kept = kept
        self.register_buffer("qweight", torch.zeros(codes_shape, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("qzeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.expects_marker_in_state_dict = True
        # Stands in for a transformers Conv1D (GPT-2's [in, out] weight): dequantize() rebuilds that type, so the
        # float model saves under the architecture's own weight layout. Set by whoever replaces the layer.
        self.replaces_conv1d = False
        self.kernel = "auto"
        self._int4_cache: tuple[tuple, cpu_int4.Int4Weight] | None = None
        self._dense_codes_cache: tuple[tuple, torch.Tensor] | None = None

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
        mask: torch.Tensor | None = None,
    ) -> PackedLinear:
        """Build the layer from integer ``codes (out, in)``, ``scales`` and ``zeros (out, groups)``.

        ``mask`` (bool ``(out, in)``, ``True`` = kept) makes a sparse layer: only the kept codes are stored and
        the masked weights are exact zeros, whatever ``codes`` holds there.
        """
        out_features, in_features = codes.shape
        dtype = dtype or scales.dtype
        kept = None
        if mask is not None:
            if tuple(mask.shape) != (out_features, in_features):
                raise ValueError(f"mask must have the codes' shape {(out_features, in_features)}, got {tuple(mask.shape)}.")
            mask = mask.to(device=codes.device, dtype=torch.bool)
            kept = int(mask.sum())
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, dtype=dtype, device=codes.device,
                    kept=kept)
        if tuple(scales.shape) != tuple(layer.scales.shape) or tuple(zeros.shape) != tuple(layer.qzeros.shape):
            raise ValueError(
                f"scales/zeros must have shape {tuple(layer.scales.shape)} for {in_features} inputs in groups of "
                f"{layer.group_size}; got {tuple(scales.shape)} and {tuple(zeros.shape)}."
            )
        if not (torch.isfinite(scales).all() and torch.isfinite(zeros).all()):
            raise ValueError("the grid's scales or zero-points are not finite (NaN or inf): the weights being packed "
                             "are not finite. Check the model (a diverged training run?) before quantizing it.")
        zeros = zeros.round()
        if zeros.numel() and not (0 <= float(zeros.min()) and float(zeros.max()) < 2**bits):
            raise ValueError(f"zero-points must lie in [0, {2**bits}) for {bits}-bit codes, got values in "
                             f"[{float(zeros.min()):g}, {float(zeros.max()):g}].")
        with torch.no_grad():
            codes = codes.round().to(torch.int32)
            if mask is None:
                layer.qweight.copy_(pack_codes(codes, bits))
            else:
                layer.qweight.copy_(pack_codes(codes[mask].view(1, -1), bits).view(-1))
                layer.qmask.copy_(_pack_bitmask(mask))
            layer.scales.copy_(scales.to(dtype))
            layer.qzeros.copy_(zeros.to(torch.uint8))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    @property
    def is_sparse(self) -> bool:
        """Whether the layer stores a sparsity mask and the codes of its kept weights only."""
        return self.kept is not None

    def mask(self) -> torch.Tensor | None:
        """The bool ``(out, in)`` mask of kept weights of a sparse layer (``None`` for a dense one)."""
        return None if self.kept is None else _unpack_bitmask(self.qmask, (self.out_features, self.in_features))

    def codes(self) -> torch.Tensor:
        """The unpacked ``uint8`` codes ``(out_features, in_features)``; a sparse layer's masked weights hold their
        group's zero-point (dequantized: exactly 0)."""
        if self.kept is None:
            return unpack_codes(self.qweight, self.bits, self.in_features)
        mask = self.mask()
        kept = unpack_codes(self.qweight.view(1, -1), self.bits, self.kept).view(-1)
        # Every weight at its group's zero-point, then the kept codes, row-major as stored. repeat_interleave and
        # masked_scatter_ are ~40x and ~4x faster on CPU than index_select and boolean index_put (a decode step
        # pays this per layer on the reference path).
        dense = self.qzeros.repeat_interleave(self.group_size, dim=1)
        if dense.shape[1] != self.in_features:  # a shorter last group
            dense = dense[:, : self.in_features].contiguous()
        return dense.masked_scatter_(mask, kept)

    def dense_qweight(self) -> torch.Tensor:
        """The codes packed as a dense layer stores them, ``(out, ceil(in / 8) * bits)``: ``qweight`` itself for a
        dense layer, a once-built copy for a sparse one (what the Triton kernel reads; dropped on ``.to()``)."""
        if self.kept is None:
            return self.qweight
        key = self._cache_key()
        cached = getattr(self, "_dense_codes_cache", None)
        if cached is None or cached[0] != key:
            self._dense_codes_cache = None
            self._dense_codes_cache = (key, pack_codes(self.codes(), self.bits))
        return self._dense_codes_cache[1]

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``scales * (codes - zeros)`` as a dense ``(out, in)`` tensor in ``dtype`` (a sparse layer's
        masked weights are exact zeros)."""
        dtype = dtype or self.scales.dtype
        weight = self.codes().to(dtype)
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
            y = triton_packed.packed_matmul(x, self.dense_qweight(), self.scales, self.qzeros, bias if fused else None,
                                            self.bits, self.group_size, self.in_features)
            return y + bias if bias is not None and not fused else y
        if path == "int4":
            weight = self._int4_weight()
            if weight is not None:
                y = weight.matmul(x)
                return y + bias if bias is not None else y
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation: unpack and dequantize every code in ``x``'s dtype, then ``F.linear``."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:  # adapters train through the frozen codes
            y = _DequantizedMatmul.apply(x, self)
            return y if bias is None else y + bias
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    # ---------------------------------------------------------------------------------- kernel cache
    def _stored(self) -> tuple[torch.Tensor, ...]:
        """The tensors that define the weight (codes, scales, zero-points, and a sparse layer's mask)."""
        stored = (self.qweight, self.scales, self.qzeros)
        return stored if self.kept is None else (*stored, self.qmask)

    def _cache_key(self) -> tuple:
        # Any in-place change of the stored tensors (load_state_dict, copy_) bumps a version: rebuild then. Tensors
        # made under torch.inference_mode() keep no version (and cannot be changed in place outside it).
        return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in self._stored())

    def _int4_weight(self) -> cpu_int4.Int4Weight | None:
        """The CPU kernel's form of the codes (built once); ``None`` for a sparse layer it would not keep exact."""
        key = self._cache_key()
        cached = getattr(self, "_int4_cache", None)
        if cached is None or cached[0] != key:
            self._int4_cache = None  # free the stale copy before building the new one
            weight = cpu_int4.Int4Weight.from_layer(self)
            if self.kept is not None and not weight.recentred:
                weight = None  # its masked weights would be a bfloat16 rounding away from 0: keep the reference
            self._int4_cache = (key, weight)
            kernels.register_holder(self)
        return self._int4_cache[1]

    def has_kernel_cache(self) -> bool:
        """Whether the CPU int4 kernel's copy of the codes is held (built on the first call that uses it)."""
        return getattr(self, "_int4_cache", None) is not None

    def kernel_cache_nbytes(self) -> int:
        """Bytes of the CPU kernel's copy of the codes held next to the packed buffers (0 when none)."""
        cached = getattr(self, "_int4_cache", None)
        return 0 if cached is None or cached[1] is None else cached[1].nbytes()

    def clear_kernel_cache(self) -> None:
        """Drop the kernels' copies of the codes (rebuilt on the next call that uses them)."""
        self._int4_cache = None
        self._dense_codes_cache = None

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
        """Bytes of the stored weight (codes, scales, zero-points, a sparse layer's mask; bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self._stored())

    def extra_repr(self) -> str:
        sparse = "" if self.kept is None else f", kept={self.kept}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}{sparse}, bias={self.bias is not None}, kernel={self.kernel!r}"
        )
