"""Which computation a ``PackedLinear`` runs: the PyTorch reference or a kernel that avoids unpacking the layer.

Paths (``choose`` picks one per call):

- ``"reference"``: unpack every code, dequantize, ``F.linear`` (``PackedLinear.dequantized_weight``). Exact,
  autograd-friendly, and the yardstick the others are tested against; ~15× a dense layer's time at decode on CPU.
- ``"triton"``: CUDA only, when ``triton`` imports: one fused unpack-and-matmul over the stored bytes
  (``triton_packed.py``), no extra memory, any width 2–8 bits, within the activations' dtype rounding.
- ``"int4"``: CPU, layers of ≤ 4 bits that PyTorch's int4 kernel can express (``cpu_int4.py``): the codes
  are converted once into the kernel's layout, a cache of ``out × in / 2`` bytes per layer, bounded by
  ``set_kernel_cache_budget`` (layers beyond it keep the reference path). It computes in bfloat16.

A layer's ``kernel`` setting (``set_packed_kernel``) says what may be used:

- ``"auto"`` (default): the fastest path equal to the reference within the *activations'* dtype tolerance:
  Triton on CUDA, the int4 kernel on CPU for bfloat16 activations; float32 CPU activations keep the exact
  reference path (the kernel would round them to bfloat16).
- ``"fast"``: also the int4 kernel for float32/float16 CPU activations, i.e. bfloat16 compute inside the
  packed layers of a float32 model (≈ 3× faster than the dense float32 layer; error of bfloat16 rounding,
  far below the 4-bit quantization error, but not float32-exact).
- ``"reference"``: always the reference.

Kernels serve inference: when autograd must reach the input, the reference path runs. The int4 kernel is
for decode-sized inputs (≤ ``INT4_MAX_ROWS`` rows); longer prompts are faster through one dequantized GEMM.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.quantization import quantize_rtn
    >>> model = quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32)
    >>> set_packed_kernel(model, "fast")
    14
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...utils import get_logger
from . import cpu_int4, triton_packed


if TYPE_CHECKING:
    from ..packed_linear import PackedLinear


__all__ = [
    "DEFAULT_CACHE_BUDGET",
    "INT4_MAX_ROWS",
    "KERNEL_SETTINGS",
    "choose",
    "kernel_cache_bytes",
    "set_kernel_cache_budget",
    "set_packed_kernel",
]

logger = get_logger(__name__)

KERNEL_SETTINGS = ("auto", "fast", "reference")

DEFAULT_CACHE_BUDGET = 1 << 30
"""1 GiB of kernel-layout codes in the process: every packed layer of a 4-bit model of up to ~2B parameters
(½ byte per weight, plus one bfloat16 (scale, zero) pair per 32–256 weights; SmolLM2-135M needs 55 MB).
A bound, not a target: the cache duplicates the codes, so a large model does not silently double its packed
size; raise it with ``set_kernel_cache_budget`` when the memory is there."""

INT4_MAX_ROWS = 32
"""Rows (tokens × batch) up to which the CPU int4 kernel runs. Side by side on 2 cores (1536 × 576 layer,
float32 dense vs int4): 2.6× faster at 1 row, even at 64, 2× slower at 512 (the kernel targets small M)."""

_budget: int | None = DEFAULT_CACHE_BUDGET
_holders: weakref.WeakSet = weakref.WeakSet()
_warned_budget = False


def set_kernel_cache_budget(budget_bytes: int | None) -> None:
    """Bound the bytes all layers' CPU kernel caches may hold together (``None``: no bound, ``0``: no cache).

    Lowering it drops nothing already built; layers that find the budget spent keep the reference path.

    Example:
        >>> set_kernel_cache_budget(256 * 2**20)
        >>> set_kernel_cache_budget(DEFAULT_CACHE_BUDGET)
    """
    global _budget, _warned_budget
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                     or budget_bytes < 0):
        raise ValueError(f"budget_bytes must be a non-negative integer of bytes or None (no bound), got {budget_bytes!r}.")
    _budget, _warned_budget = budget_bytes, False


def kernel_cache_bytes(model: nn.Module | None = None) -> int:
    """Bytes held by CPU kernel caches: of ``model``'s packed layers, or of every layer in the process.

    Example:
        >>> kernel_cache_bytes()  # doctest: +SKIP
        55296000
    """
    from ..packed_linear import PackedLinear

    layers = list(_holders) if model is None else [m for m in model.modules() if isinstance(m, PackedLinear)]
    return sum(layer.kernel_cache_nbytes() for layer in layers)


def set_packed_kernel(model: nn.Module, kernel: str) -> int:
    """Set the ``kernel`` setting (see the module docstring) of every ``PackedLinear`` in ``model``.

    Returns the number of layers set; ``"reference"`` also frees their caches.
    """
    from ..packed_linear import PackedLinear

    if kernel not in KERNEL_SETTINGS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNEL_SETTINGS))}, got {kernel!r}.")
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for layer in layers:
        layer.kernel = kernel
        if kernel == "reference":
            layer.clear_kernel_cache()
    return len(layers)


def choose(layer: PackedLinear, x: torch.Tensor) -> str:
    """The path ``layer`` takes for input ``x``: ``"triton"``, ``"int4"`` or ``"reference"``."""
    setting = getattr(layer, "kernel", "auto")
    if setting == "reference" or (torch.is_grad_enabled() and x.requires_grad):
        return "reference"
    if x.is_cuda:
        return "triton" if triton_packed.usable(x) else "reference"
    if x.dtype != torch.bfloat16 and setting != "fast":
        return "reference"
    if x.numel() > INT4_MAX_ROWS * layer.in_features or not cpu_int4.usable(layer, x):
        return "reference"
    return "int4" if layer.has_kernel_cache() or _reserve(layer) else "reference"


def _reserve(layer: PackedLinear) -> bool:
    """Whether ``layer`` may build its cache within the budget."""
    global _warned_budget
    if _budget is not None and kernel_cache_bytes() + cpu_int4.planned_nbytes(layer) > _budget:
        if not _warned_budget:
            logger.warning("packed-kernel cache budget (%d bytes) spent: further layers use the slower reference "
                           "path; raise it with set_kernel_cache_budget().", _budget)
            _warned_budget = True
        return False
    return True


def register_holder(layer: PackedLinear) -> None:
    """Count ``layer``'s cache against the budget (``PackedLinear`` calls this when it builds one)."""
    _holders.add(layer)
