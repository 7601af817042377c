"""The ``hf_compress_sparse`` checkpoint format: pruned weights stored as a bitmask plus their non-zeros.

**Encoding** of one weight ``W`` (any shape, stored in its own layout and dtype: GPT-2's ``Conv1D``
weight stays ``[in, out]``), under the weight's own name ``<module>.weight``:

================================  ===============================  ====================================
key                               tensor                           content
================================  ===============================  ====================================
``<module>.weight``               ``W.dtype``, 1-D, ``[nnz]``      the non-zero values, row-major order
``<module>.weight_bitmask``       ``uint8``, ``[rows, ceil(c/8)]`` ``W != 0``, ``rows = W.shape[0]``,
                                                                   ``c = W[0].numel()``; bit ``j`` of
                                                                   byte ``k`` is column ``8k + j``
``<module>.weight_shape``         ``int64``, ``[W.ndim]``          ``W.shape``
================================  ===============================  ====================================

Bytes per element: ``(1 - sparsity) * itemsize + 1/8``, e.g. 2:4 or 50% sparsity in fp32
``0.53x`` dense and in bf16 ``0.56x``; compression only pays off above ``1 / (8 * itemsize)``
sparsity (3% fp32, 6% bf16).

Decoding is exact: every non-zero element comes back bit for bit (NaN payloads included). Zeros
come back as ``+0.0``: ``-0.0`` (what multiplying a negative weight by a 0 mask gives) counts as
zero for the mask, so its sign bit is not kept; ``torch.equal`` and every computation except
``1 / x`` are unaffected.

The values keep the parameter's name on purpose: transformers without hf_compress finds
``weight`` with the wrong shape and refuses to load (``RuntimeError`` after a report listing
the mismatch), instead of silently leaving randomly initialised layers.

**Fused mixture-of-experts weights** (3-D ``[experts, ...]`` parameters such as
``mlp.experts.gate_up_proj``; format version 2, listed in ``compressed_experts``) are encoded the
same way, rows being experts, but stored as ``<parameter>_values`` / ``_bitmask`` / ``_shape``: under
the parameter's own name, the model's save conversions (one tensor per expert) would act on the
encoded values. A checkpoint without encoded experts stays version 1.

**Loading.** ``config.json`` carries ``quantization_config = {"quant_method": "hf_compress_sparse", ...}``
(``SparseStorageConfig``). ``SparseStorageQuantizer`` is registered with transformers under that
name (``hf_compress.formats.base``); it appends one v5 ``WeightConverter`` that gathers
``weight``/``weight_bitmask``/``weight_shape`` of each parameter and runs ``SparseDecode``, which
returns the dense tensor (a ``weight`` stored dense passes through unchanged), and one more per name of
the encoded expert parameters. The model then holds ordinary dense ``nn.Linear``/``Conv1D`` weights.

**2:4 semi-structured kernels (opt-in, CUDA).** Dense weights run dense kernels, however many zeros they
hold. :func:`load_semi_structured` (or :func:`to_semi_structured` on a loaded model) swaps the weight of
every 2:4 linear layer for a ``torch.sparse.to_sparse_semi_structured`` tensor, so ``F.linear`` runs
cuSPARSELt/CUTLASS 2:4 kernels. It needs CUDA, fp16/bf16 and ``nn.Linear`` weights of ``[rows, cols]``
with ``rows % 32 == 0`` and ``cols % 64 == 0`` (what both kernels take), every group of 4 inputs holding
at most 2 non-zeros; anything else is refused before any layer changes. Inference only: save the
checkpoint this model was loaded from, not the converted model.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.5, 0.0, -2.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    >>> packed = encode_sparse(w)
    >>> packed.values.tolist(), packed.bitmask.tolist(), packed.shape.tolist()
    ([0.5, -2.0, 1.0], [[5], [8]], [2, 4])
    >>> torch.equal(decode_sparse(packed.values, packed.bitmask, packed.shape), w)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter

from .base import CompressedFormatConfig, CompressedFormatQuantizer, register_format
from .integrity import CheckpointIntegrityError, CheckpointReader, check_module_lists
from .slim import apply_slim_record, keep_slim_widths
from ..modeling.sublayers import removed_sublayer_markers
from ..utils import get_logger


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = [
    "BITMASK_SUFFIX",
    "SEMI_STRUCTURED_DTYPES",
    "FORMAT_NAME",
    "SHAPE_SUFFIX",
    "VALUES_SUFFIX",
    "SparseDecode",
    "SparseStorageConfig",
    "SparseStorageQuantizer",
    "SparseTensor",
    "decode_sparse",
    "check_bitmask_entry",
    "encode_sparse",
    "load_semi_structured",
    "pack_bitmask",
    "semi_structured_backends",
    "semi_structured_weight",
    "to_semi_structured",
    "unpack_bitmask",
]

logger = get_logger(__name__)

FORMAT_NAME = "hf_compress_sparse"
BITMASK_SUFFIX = "_bitmask"
SHAPE_SUFFIX = "_shape"
VALUES_SUFFIX = "_values"  # fused expert parameters only: a linear weight's values keep its own name

# Bit j of each byte is column 8k + j (little-endian bit order, as numpy.packbits(..., bitorder="little")).
_BIT_WEIGHTS = tuple(1 << j for j in range(8))


class SparseTensor(NamedTuple):
    """A weight in the stored form: non-zero values, packed bitmask, original shape."""

    values: torch.Tensor
    bitmask: torch.Tensor
    shape: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes the three tensors take in a safetensors file (headers excluded)."""
        return sum(t.numel() * t.element_size() for t in self)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into ``uint8`` row by row: ``[rows, ceil(cols / 8)]``, 8 columns per byte.

    ``rows`` is ``mask.shape[0]`` and ``cols`` the product of the other dimensions (a 1-D mask is
    one row). Bit ``j`` of byte ``k`` holds column ``8k + j``; padding bits are 0.

    Example:
        >>> pack_bitmask(torch.tensor([[True, False, True, False, False, False, False, False, True]]))
        tensor([[5, 1]], dtype=torch.uint8)
    """
    rows = mask.shape[0] if mask.ndim > 1 else 1
    flat = mask.reshape(rows, -1).to(torch.uint8)
    pad = -flat.shape[1] % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    bits = flat.reshape(rows, -1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    # The bits are disjoint, so their sum is their bitwise OR and fits in a byte.
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``pack_bitmask``: the boolean tensor of ``shape``.

    Example:
        >>> unpack_bitmask(torch.tensor([[5, 1]], dtype=torch.uint8), [1, 9]).int().tolist()
        [[1, 0, 1, 0, 0, 0, 0, 0, 1]]
    """
    shape = [int(s) for s in shape]
    numel = math.prod(shape)
    rows = shape[0] if len(shape) > 1 else 1
    cols = numel // rows if rows else 0
    expected = (rows, math.ceil(cols / 8))
    if tuple(packed.shape) != expected or packed.dtype != torch.uint8:
        raise ValueError(
            f"bitmask of shape {list(packed.shape)} ({packed.dtype}) does not fit a weight of shape {shape}: "
            f"expected uint8 {list(expected)}."
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(rows, -1)[:, :cols].bool().reshape(shape)


def encode_sparse(weight: torch.Tensor) -> SparseTensor:
    """The stored form of ``weight``: non-zeros (row-major, own dtype), packed ``weight != 0``, shape.

    Example:
        >>> encode_sparse(torch.tensor([[0.0, 3.0], [-0.0, 0.0]])).values.tolist()
        [3.0]
    """
    if weight.ndim == 0:
        raise ValueError("cannot sparse-encode a scalar.")
    weight = weight.detach()
    mask = weight != 0  # -0.0 counts as zero (see the module docstring)
    return SparseTensor(
        values=weight[mask],
        bitmask=pack_bitmask(mask),
        shape=torch.tensor(list(weight.shape), dtype=torch.int64, device="cpu"),  # metadata, saved as is
    )


def decode_sparse(
    values: torch.Tensor,
    bitmask: torch.Tensor,
    shape: torch.Tensor | Sequence[int],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The dense tensor of the stored form (on ``values``' device, in ``dtype`` or ``values``' dtype).

    Raises:
        ValueError: the three tensors are inconsistent (corrupted or mismatched checkpoint).

    Example:
        >>> decode_sparse(torch.tensor([3.0]), torch.tensor([[2], [0]], dtype=torch.uint8), [2, 2])
        tensor([[0., 3.],
                [0., 0.]])
    """
    shape = [int(s) for s in (shape.tolist() if isinstance(shape, torch.Tensor) else shape)]
    if values.ndim != 1:
        raise ValueError(f"sparse values must be 1-D, got shape {list(values.shape)}.")
    mask = unpack_bitmask(bitmask.to(values.device), shape)
    nonzeros = int(mask.sum())
    if nonzeros != values.numel():
        raise ValueError(f"bitmask marks {nonzeros} non-zeros but {values.numel()} values are stored.")
    if dtype is not None:
        values = values.to(dtype)
    dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
    dense[mask] = values  # an indexed copy: the stored bits are written unchanged
    return dense


# --------------------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------------------


class SparseStorageConfig(CompressedFormatConfig):
    """``quantization_config`` of an ``hf_compress_sparse`` checkpoint (written by ``save_pruned``).

    Fields (all JSON): ``format`` (``"bitmask"``), ``format_version``, ``compressed_modules`` (module
    names whose weight is stored sparse), ``compressed_experts`` (fused expert parameters stored sparse, by
    parameter name; version 2, which only a checkpoint with some needs), ``min_sparsity`` (threshold used
    when saving), ``recipe`` (the pruning recipe, e.g. ``PruningConfig.to_dict()``, or ``None``), ``storage``
    (``dense_linear_bytes``, ``stored_linear_bytes``, ``ratio``, measured when saving) and, for a slim
    (Týr) model, ``slim`` (its per-block widths, see ``formats.slim.slim_record``).

    Example:
        >>> SparseStorageConfig(compressed_modules=["model.layers.0.mlp.up_proj"]).to_dict()["quant_method"]
        'hf_compress_sparse'
    """

    QUANT_METHOD = FORMAT_NAME
    FORMAT_VERSION = 2

    def __init__(
        self,
        compressed_modules: Sequence[str] = (),
        min_sparsity: float | None = None,
        recipe: dict[str, Any] | None = None,
        storage: dict[str, Any] | None = None,
        format: str = "bitmask",
        compressed_experts: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        if format != "bitmask":
            raise ValueError(f"unknown {FORMAT_NAME} encoding {format!r}; this hf_compress reads 'bitmask'.")
        # Version 1 readers know nothing of encoded experts; a checkpoint without them stays readable by them.
        kwargs.setdefault("format_version", 2 if compressed_experts else 1)
        if compressed_experts:
            kwargs["compressed_experts"] = list(compressed_experts)
        super().__init__(
            format=format, compressed_modules=list(compressed_modules), min_sparsity=min_sparsity,
            recipe=recipe, storage=storage, **kwargs,
        )


class SparseDecode(ConversionOps):
    """Loader op: ``{weight, weight_bitmask, weight_shape}`` of one parameter -> its dense tensor.

    A ``weight`` without companions was stored dense and passes through. The values arrive already
    cast to the parameter's dtype by the loader (it casts floating-point checkpoint tensors, not the
    ``uint8`` bitmask or the ``int64`` shape), so ``from_pretrained(..., dtype=...)`` works as usual.
    ``name`` and ``values_suffix`` select another parameter's triple (a fused expert parameter's
    ``gate_up_proj_values``, ``gate_up_proj_bitmask``, ``gate_up_proj_shape``).
    """

    def __init__(self, name: str = "weight", values_suffix: str = "") -> None:
        self.name = name
        self.values_suffix = values_suffix

    def convert(
        self, input_dict: dict[str, Any], full_layer_name: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        names = [self.name + suffix for suffix in (self.values_suffix, BITMASK_SUFFIX, SHAPE_SUFFIX)]
        values, bitmask, shape = (_single(input_dict.get(name)) for name in names)
        key = full_layer_name if full_layer_name is not None else self.name
        if bitmask is None and shape is None and not self.values_suffix:
            return {key: values}
        if values is None or bitmask is None or shape is None:
            found = sorted(k for k, v in input_dict.items() if _single(v) is not None)
            raise ValueError(f"incomplete {FORMAT_NAME} tensor for {key}: found {found}, expected {', '.join(names)}.")
        return {key: decode_sparse(values, bitmask, shape)}

    @property
    def reverse_op(self) -> ConversionOps:
        # Saving writes the dense tensors (the quantizer also drops this converter from the model's
        # conversions after loading, so save_pretrained normally never asks).
        return _PassThrough()


class _PassThrough(ConversionOps):
    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return input_dict

    @property
    def reverse_op(self) -> ConversionOps:
        return self


_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64, device="cpu")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")


def check_sparse_triple(
    reader: CheckpointReader, key: str, parameter: torch.Tensor | None, stored_keys: Mapping[str, str] | None = None,
    values_suffix: str = "",
) -> None:
    """Refuse an inconsistent stored tensor ``key`` (``CheckpointIntegrityError``); see the quantizer.

    ``stored_keys``: model key → stored key, where saving renamed some (``CheckpointReader.keys_as_loaded``).
    ``values_suffix``: ``VALUES_SUFFIX`` for a fused expert parameter, whose values are not under its own name.
    """
    where = f"sparse weight {key!r}"
    stored_keys = stored_keys or {}
    names = {"": key + values_suffix, BITMASK_SUFFIX: key + BITMASK_SUFFIX, SHAPE_SUFFIX: key + SHAPE_SUFFIX}
    keys = {part: stored_keys.get(name, name) for part, name in names.items()}
    entries = {part: reader.entries.get(stored) for part, stored in keys.items()}
    missing = [keys[part] for part, entry in entries.items() if entry is None]
    if missing:
        raise CheckpointIntegrityError(f"{where}: {missing[0]!r} is missing; the checkpoint is incomplete, re-save it.")
    values, shape = entries[""], entries[SHAPE_SUFFIX]
    if len(values.shape) != 1 or values.dtype not in _FLOAT_DTYPES:
        raise CheckpointIntegrityError(f"{where}: the values must be a 1-D float tensor, got {values.dtype} {list(values.shape)}.")
    if shape.dtype != "I64" or len(shape.shape) != 1 or not 1 <= shape.numel <= 8:
        raise CheckpointIntegrityError(f"{where}: the shape must be 1 to 8 int64 values, got {shape.dtype} {list(shape.shape)}.")
    dims = reader.read(keys[SHAPE_SUFFIX]).tolist()
    if parameter is not None and tuple(dims) != tuple(parameter.shape):
        raise CheckpointIntegrityError(
            f"{where}: stored shape {dims} but the model's weight is {list(parameter.shape)}; the config.json and "
            "the weights come from different models."
        )
    if any(d <= 0 for d in dims) or math.prod(dims) > 2**40:
        raise CheckpointIntegrityError(f"{where}: stored shape {dims} is not a valid weight shape.")
    rows = dims[0] if len(dims) > 1 else 1
    cols = math.prod(dims) // rows
    nonzeros = check_bitmask_entry(reader, keys[BITMASK_SUFFIX], rows, cols, where)
    if nonzeros != values.numel:
        raise CheckpointIntegrityError(f"{where}: bitmask marks {nonzeros} non-zeros but {values.numel} values are stored.")


def check_bitmask_entry(reader: CheckpointReader, key: str, rows: int, cols: int, where: str) -> int:
    """Check the stored bitmask ``key`` of a ``rows × cols`` weight (``pack_bitmask``'s layout, no bits set past the
    last column) and return how many weights it marks; also used by the stacked packed format."""
    entry = reader.entries.get(key)
    expected = (rows, math.ceil(cols / 8))
    if entry is None:
        raise CheckpointIntegrityError(f"{where}: {key!r} is missing; the checkpoint is incomplete, re-save it.")
    if entry.dtype != "U8" or entry.shape != expected:
        raise CheckpointIntegrityError(f"{where}: bitmask is {entry.dtype} {list(entry.shape)}, expected U8 {list(expected)}.")
    bits = reader.read(key)
    if cols % 8 and bits.numel() and bool((bits[:, -1] >> (cols % 8)).any()):
        raise CheckpointIntegrityError(f"{where}: bitmask has bits set past the last column.")
    return int(_POPCOUNT[bits.long()].sum())


def _single(value: Any) -> torch.Tensor | None:
    if isinstance(value, list):
        if len(value) > 1:
            raise ValueError(f"expected one tensor per key, got {len(value)}.")
        return value[0] if value else None
    return value


@register_format
class SparseStorageQuantizer(CompressedFormatQuantizer):
    """Decodes ``hf_compress_sparse`` checkpoints while ``from_pretrained`` reads them.

    Registered with transformers under ``quant_method="hf_compress_sparse"`` when
    ``hf_compress`` is imported. Every key ending in ``weight`` is routed through
    one ``WeightConverter`` (after the model's own converters, which keep precedence), gathering
    ``weight``, ``weight_bitmask`` and ``weight_shape`` of a parameter for ``SparseDecode``; encoded
    fused expert parameters get one converter per parameter name (``gate_up_proj_values``, ... →
    ``gate_up_proj``).
    """

    config_class = SparseStorageConfig

    def weight_converters(self) -> list[WeightConverter]:
        sources = ["weight", "weight" + BITMASK_SUFFIX, "weight" + SHAPE_SUFFIX]
        converters = [WeightConverter(sources, target_patterns="weight", operations=[SparseDecode()])]
        for name in sorted({key.rpartition(".")[2] for key in self._compressed_experts()}):
            sources = [name + VALUES_SUFFIX, name + BITMASK_SUFFIX, name + SHAPE_SUFFIX]
            converters.append(WeightConverter(sources, target_patterns=name,
                                              operations=[SparseDecode(name, VALUES_SUFFIX)]))
        return converters

    def _compressed_experts(self) -> list[str]:
        return list(getattr(self.quantization_config, "compressed_experts", None) or [])

    def check_checkpoint(self, model: PreTrainedModel, reader: CheckpointReader) -> None:
        """The listed modules (and expert parameters) are exactly the stored ones; each stored triple is consistent with itself
        (bitmask shape, popcount = number of values, zero padding bits) and with the model's weight shape
        (a slim model's, once its recorded widths are checked and applied)."""
        apply_slim_record(model, getattr(self.quantization_config, "slim", None))
        suffix = ".weight" + BITMASK_SUFFIX
        # Keys as the model names them -> as stored: save_pretrained reverts the architecture's renamings, which
        # compressed_modules does not know, and a renaming may take a weight but not its bitmask (Phi-MoE stores
        # `mlp.router.weight` as `block_sparse_moe.gate.weight`, its bitmask as `block_sparse_moe.router...`).
        stored_keys = reader.keys_as_loaded(model)
        stored = {name[: -len(suffix)] for name in stored_keys if name.endswith(suffix)}
        listed = set(getattr(self.quantization_config, "compressed_modules", []) or [])
        check_module_lists(listed, stored, "compressed_modules", "sparse")
        # Every other bitmask belongs to a fused expert parameter (its values under `<parameter>_values`).
        experts = {name[: -len(BITMASK_SUFFIX)] for name in stored_keys
                   if name.endswith(BITMASK_SUFFIX) and not name.endswith(suffix)}
        check_module_lists(set(self._compressed_experts()), experts, "compressed_experts", "sparse expert")
        parameters = dict(model.named_parameters())
        prefix = f"{getattr(model, 'base_model_prefix', '')}."

        def parameter_of(key: str) -> torch.nn.Parameter | None:
            # A head model's checkpoint also loads into its base model (and back): the prefix comes and goes.
            return next((parameters[name] for name in (key, key.removeprefix(prefix), prefix + key)
                         if name in parameters), None)

        keys = {f"{module}.weight": "" for module in stored} | {key: VALUES_SUFFIX for key in experts}
        missing = [key for key in sorted(keys) if parameter_of(key) is None]
        if missing:
            raise CheckpointIntegrityError(
                f"This sparse checkpoint stores {len(missing)} weight(s) the model does not have (e.g. {missing[0]!r}); "
                "the config.json and the weights come from different models."
            )
        for key, values_suffix in sorted(keys.items()):
            check_sparse_triple(reader, key, parameter_of(key), stored_keys, values_suffix)

    def stored_differently(self) -> set[str]:
        modules = getattr(self.quantization_config, "compressed_modules", [])
        return {f"{module}.weight" for module in modules} | set(self._compressed_experts())

    def _process_model_after_weight_loading(self, model, **kwargs):
        modules = getattr(self.quantization_config, "compressed_modules", [])
        logger.info("decoded %d sparse weights (%s)", len(modules) + len(self._compressed_experts()), FORMAT_NAME)
        # A slim model keeps its widths on its config (as one loaded from a slim checkpoint), so it saves again.
        keep_slim_widths(model, getattr(self.quantization_config, "slim", None))
        removed_sublayer_markers(model, saved=True)  # loaded: its next save writes them (skip_markers_while_loading)
        return model


# --------------------------------------------------------------------------------------------------
# 2:4 semi-structured kernels (opt-in, CUDA)
# --------------------------------------------------------------------------------------------------

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
# Shapes both PyTorch backends take for fp16/bf16 (CUTLASS: multiples of 32 x 64; cuSPARSELt: 16 x 16).
_SEMI_STRUCTURED_MULTIPLES = (32, 64)
_SEMI_STRUCTURED_BACKENDS = ("auto", "cusparselt", "cutlass")


def semi_structured_backends(device: str | torch.device) -> tuple[str, ...]:
    """The named backends whose 2:4 kernels run on the CUDA ``device``: PyTorch builds CUTLASS's for compute
    capability 8.x alone (elsewhere they convert, then fail at the first matmul).

    Example:
        >>> semi_structured_backends("cuda")  # doctest: +SKIP
        ('cusparselt',)
    """
    return ("cusparselt", "cutlass") if torch.cuda.get_device_capability(device)[0] == 8 else ("cusparselt",)


def semi_structured_weight(weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """A 2:4 ``weight`` (CUDA, fp16/bf16) as PyTorch's semi-structured sparse tensor of ``backend``.

    Example:
        >>> sparse = semi_structured_weight(two_of_four_weight.cuda().bfloat16(), "cusparselt")  # doctest: +SKIP
    """
    from torch.sparse import (
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
        to_sparse_semi_structured,
    )

    _check_backend(backend)
    convert = {"auto": to_sparse_semi_structured, "cusparselt": SparseSemiStructuredTensorCUSPARSELT.from_dense,
               "cutlass": SparseSemiStructuredTensorCUTLASS.from_dense}[backend]
    return convert(weight)


def _check_backend(backend: str) -> None:
    if backend not in _SEMI_STRUCTURED_BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto', 'cusparselt' or 'cutlass'.")


def to_semi_structured(
    model: torch.nn.Module, modules: Sequence[str] | None = None, backend: str = "auto"
) -> list[str]:
    """Run the 2:4 linear layers of ``model`` (on CUDA, fp16/bf16) with semi-structured sparse kernels.

    ``modules`` defaults to the checkpoint's ``compressed_modules`` (an ``hf_compress_sparse`` model), else
    every ``nn.Linear`` whose weight is 2:4 apart from the output embeddings. Every layer is checked first
    (dtype, the 2:4 pattern, the shape, the device) and nothing changes unless all pass; returns the names
    converted. In place; inference only (the weights become non-trainable sparse tensors). ``backend`` picks
    PyTorch's kernels: ``"cusparselt"``, ``"cutlass"``, or ``"auto"`` (PyTorch's own choice, cuSPARSELt where
    it is built in; CUTLASS's kernels run on compute capability 8.x GPUs only);
    ``bench/results/gpu/semi_structured.md`` times them.

    Raises:
        ValueError: in one line, the first layer the kernels cannot take and why.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("pruned-2of4", dtype=torch.bfloat16).cuda()  # doctest: +SKIP
        >>> len(to_semi_structured(model))  # doctest: +SKIP
        210
    """
    _check_backend(backend)  # before anything changes
    layers = _semi_structured_layers(model, modules)
    if not layers:
        raise ValueError("no 2:4 sparse linear layer to convert; prune the model to 2:4 first (hf-compress prune ... "
                         "--sparsity 2:4).")
    for name, layer in layers.items():
        _check_semi_structured(name, layer)
    device = next(iter(layers.values())).weight.device
    if backend != "auto" and backend not in semi_structured_backends(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"backend={backend!r}: PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x (Ampere) "
                         f"GPUs only, and this one is {major}.{minor}; use backend='cusparselt' (or 'auto').")
    for layer in layers.values():
        layer.weight = torch.nn.Parameter(semi_structured_weight(layer.weight.detach(), backend), requires_grad=False)
    logger.info("%d linear layers run 2:4 semi-structured sparse kernels (%s)", len(layers), backend)
    return list(layers)


def load_semi_structured(
    pretrained_model_name_or_path: str | Any, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
    backend: str = "auto", **kwargs: Any,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` of a 2:4 checkpoint, then :func:`to_semi_structured` on ``device``
    with ``backend``.

    The device and dtype are checked before anything loads.

    Example:
        >>> model = load_semi_structured("pruned-2of4", dtype=torch.float16)  # doctest: +SKIP
        >>> model.generate(**inputs, max_new_tokens=32)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    _check_semi_structured_target(torch.device(device), dtype)
    model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, dtype=dtype, **kwargs)
    model.to(device).eval()
    to_semi_structured(model, backend=backend)
    return model


def _semi_structured_layers(model: torch.nn.Module, modules: Sequence[str] | None) -> dict[str, torch.nn.Module]:
    named = dict(model.named_modules())
    if modules is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        listed = config.get("compressed_modules") if isinstance(config, dict) else getattr(config, "compressed_modules", None)
        if listed:
            modules = listed
        else:
            from ..pruning.masks import check_pattern

            output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            modules = [name for name, module in named.items() if isinstance(module, torch.nn.Linear)
                       and module is not output and check_pattern(module.weight, "2:4")]
    unknown = [name for name in modules if name not in named]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a module of this model; pass names from model.named_modules().")
    return {name: named[name] for name in modules}


def _check_semi_structured_target(device: torch.device, dtype: torch.dtype) -> None:
    if dtype not in SEMI_STRUCTURED_DTYPES:
        raise ValueError(f"2:4 semi-structured kernels run in float16 or bfloat16, not {dtype}; load with "
                         "dtype=torch.bfloat16 (or float16).")
    if device.type != "cuda":
        raise ValueError(f"2:4 semi-structured kernels need a CUDA GPU; the model is on {device}. Load it without "
                         "semi-structured kernels there (a plain from_pretrained), or move it to cuda first.")
    if not torch.cuda.is_available():
        raise ValueError("2:4 semi-structured kernels need a CUDA GPU and none is available here; load the "
                         "checkpoint with a plain from_pretrained.")


def _check_semi_structured(name: str, layer: torch.nn.Module) -> None:
    from ..pruning.masks import check_pattern

    if not isinstance(layer, torch.nn.Linear):
        raise ValueError(f"{name} is a {type(layer).__name__}; 2:4 semi-structured kernels replace nn.Linear "
                         "weights only (GPT-2's Conv1D is not supported).")
    weight = layer.weight
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        raise ValueError(f"{name}: 2:4 semi-structured kernels run in float16 or bfloat16, not {weight.dtype}; "
                         "load with dtype=torch.bfloat16 (or float16).")
    if not check_pattern(weight, "2:4"):
        raise ValueError(f"{name}: the weight is not 2:4 sparse (some group of 4 inputs holds more than 2 "
                         "non-zeros); prune it to 2:4 first, or leave it out of `modules`.")
    rows, cols = weight.shape
    multiple_rows, multiple_cols = _SEMI_STRUCTURED_MULTIPLES
    if rows % multiple_rows or cols % multiple_cols:
        raise ValueError(f"{name}: weight [{rows}, {cols}] does not fit the 2:4 kernels, which take "
                         f"[rows, cols] with rows a multiple of {multiple_rows} and cols of {multiple_cols}; "
                         "leave it out of `modules`.")
    _check_semi_structured_target(weight.device, weight.dtype)
