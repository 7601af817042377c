"""The ``hf_compress_packed`` checkpoint format: group-quantized linear weights stored as packed integers.

A model exported by ``DLQATModel.merge_and_quantize()`` (or ``hf_compress.quantization.quantize_rtn``) holds ``PackedLinear``
layers in place of the quantized ``nn.Linear`` ones. Its ``save_pretrained`` writes their buffers
(``qweight``, ``scales``, ``qzeros``; see ``packed_linear``) and a ``quantization_config``::

    {"quant_method": "hf_compress_packed", "format_version": 2, "bits": 3, "group_size": 128,
     "symmetric": false, "modules": ["model.layers.0.self_attn.q_proj", ...], "recipe": {...}}

**Stacked sparse + low-bit** (format version 3): when packed layers carry a sparsity mask (a pruned model
quantized with its zeros kept: ``merge_and_quantize()`` of a DL-QAT adapter on a sparse base, see
``PackedLinear``), the checkpoint stores for each of them ``qmask`` (the bitmask of the kept weights,
``formats.sparse.pack_bitmask``) and a 1-D ``qweight`` holding the codes of the kept weights only;
``sparse_modules`` maps each such layer to its number of kept weights. At 2:4 and 4 bits with groups of 128
and fp32 scales that is ``1/8 + 1/4 + 5/128`` bytes a weight, 0.10× dense fp32. A checkpoint without sparse
layers keeps version 2, so older hf_compress versions still read it.

A slim (Týr) model's per-block widths go under ``slim`` (see ``formats.slim.slim_record``) and are applied
before the packed layers are built; ``dequantize()`` leaves the model a ``SlimFormatConfig``.

After ``import hf_compress``, a plain ``AutoModelForCausalLM.from_pretrained(folder)`` rebuilds the
same ``PackedLinear`` layers before the weights stream in (``PackedFormatQuantizer``), so the loaded
model is low-bit in memory too. Unlike the sparse *storage* format, this is a *compute* format: the
quantizer stays attached (``model.is_quantized``, ``model.hf_quantizer``), the model cannot be fully
fine-tuned, and ``model.dequantize()`` turns it back into a float model with ``nn.Linear`` layers.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.quantization import quantize_rtn
    >>> model, _ = tiny_model("llama")
    >>> packed = quantize_rtn(model, bits=4, group_size=32)
    >>> type(packed.model.layers[0].mlp.up_proj).__name__, packed.config.quantization_config.bits
    ('PackedLinear', 4)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import _compat
from ..modeling.layers import in_features, out_features, replace_module
from ..modeling.sublayers import removed_sublayer_markers
from ..quantization.grid import check_grid_arguments
from ..quantization.packed_linear import FORMAT_MARKER, PackedLinear
from ..quantization.packing import packed_columns
from ..utils import get_logger
from ..utils.processes import main_process_only
from .base import CompressedFormatConfig, CompressedFormatQuantizer, register_format
from .integrity import CheckpointIntegrityError, CheckpointReader, check_module_lists, seal_checkpoint
from .slim import apply_slim_record, keep_slim_widths, slim_record
from .sparse import check_bitmask_entry


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = [
    "FORMAT_NAME",
    "PackedFormatConfig",
    "PackedFormatQuantizer",
    "attach_packed_format",
    "check_not_packed",
    "packed_size",
    "save_packed",
]

logger = get_logger(__name__)

FORMAT_NAME = "hf_compress_packed"


DENSE_FORMAT_VERSION = 2
"""The version a checkpoint without sparse layers is written with (readable by hf_compress before version 3)."""


class PackedFormatConfig(CompressedFormatConfig):
    """``quantization_config`` of a packed low-bit checkpoint (``bits``, ``group_size``, ``symmetric``,
    ``modules``: the qualified names of the packed layers, ``recipe``: how the weights were made,
    ``sparse_modules``: the layers stored with a mask, each with its number of kept weights, ``slim``: the
    per-block widths of a slim model, see ``formats.slim.slim_record``)."""

    QUANT_METHOD = FORMAT_NAME
    # 2: each packed layer also stores the one-byte ``weight`` marker (PackedLinear); 3: sparse layers
    # (``qmask`` + the codes of the kept weights, ``sparse_modules``) and ``slim``.
    FORMAT_VERSION = 3

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = False,
        modules: Sequence[str] = (),
        recipe: Mapping[str, Any] | None = None,
        sparse_modules: Mapping[str, int] | None = None,
        slim: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_grid_arguments(bits, group_size)
        sparse_modules = dict(sparse_modules or {})
        kwargs.setdefault("format_version", required_version(sparse_modules, slim))
        super().__init__(
            bits=bits, group_size=group_size, symmetric=symmetric, modules=list(modules), recipe=dict(recipe or {}),
            sparse_modules=sparse_modules, slim=None if slim is None else dict(slim), **kwargs,
        )


def required_version(sparse_modules: Mapping[str, int] | None, slim: Mapping[str, Any] | None) -> int:
    """The oldest format version that can hold these fields (so older readers still load dense checkpoints)."""
    return PackedFormatConfig.FORMAT_VERSION if sparse_modules or slim else DENSE_FORMAT_VERSION


@register_format
class PackedFormatQuantizer(CompressedFormatQuantizer):
    """Rebuilds ``PackedLinear`` layers at load time and stays attached (a compute format)."""

    config_class = PackedFormatConfig

    def check_checkpoint(self, model: PreTrainedModel, reader: CheckpointReader) -> None:
        """The listed layers are exactly the stored ones, exist in the model as linear layers, and their
        codes, scales, zero-points (all ``< 2**bits``), bias and marker have the shapes the layer needs; a
        sparse layer's mask keeps exactly as many weights as it has codes. A slim model's widths are checked
        and applied first (the layers' shapes depend on them)."""
        config = self.quantization_config
        apply_slim_record(model, getattr(config, "slim", None))
        # Keys as the model names them -> as stored (save_pretrained reverts the architecture's renamings, which
        # config.modules does not know; Phi-MoE stores its `mlp` as `block_sparse_moe`).
        stored_keys = reader.keys_as_loaded(model)
        stored = {name[: -len(".qweight")] for name in stored_keys if name.endswith(".qweight")}
        check_module_lists(set(config.modules), stored, "modules", "packed")
        sparse = _sparse_modules(config)
        masked = {name[: -len(".qmask")] for name in stored_keys if name.endswith(".qmask")}
        check_module_lists(set(sparse), masked, "sparse_modules", "masked packed")
        if not set(sparse) <= set(config.modules):
            raise CheckpointIntegrityError(
                f"config.json: sparse_modules names {sorted(set(sparse) - set(config.modules))[0]!r}, which is not "
                "in modules; the checkpoint was edited, re-download or re-save it."
            )
        modules = dict(model.named_modules())
        missing = [name for name in config.modules if name not in modules]
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        if missing and prefix != "." and all(n.startswith(prefix) and n.removeprefix(prefix) in modules for n in missing):
            raise ValueError(
                f"This packed checkpoint was saved from a model with its head; {type(model).__name__} is the base model "
                "without one, which packed checkpoints do not load into. Load it with AutoModelForCausalLM (its "
                "`.base_model` is the base model)."
            )
        if missing:
            raise CheckpointIntegrityError(
                f"This packed checkpoint lists {len(missing)} layer(s) the model does not have (e.g. {missing[0]!r}); "
                "the config.json and the weights come from different models."
            )
        for name in sorted(stored):
            check_packed_layer(reader, name, modules[name], config, stored_keys)

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        config = self.quantization_config
        modules = dict(model.named_modules())
        # The markers are for stock transformers only (see PackedLinear): skip them quietly here.
        _compat.ignore_unexpected_keys(model, [rf"{re.escape(name)}\.{FORMAT_MARKER}$" for name in config.modules])
        sparse = _sparse_modules(config)
        for name in config.modules:
            layer = modules[name]
            weight = layer.weight
            packed = PackedLinear(
                in_features(layer), out_features(layer), config.bits, config.group_size,
                bias=layer.bias is not None, dtype=weight.dtype, device=weight.device, kept=sparse.get(name),
            )
            packed.expects_marker_in_state_dict = False  # see PackedLinear._save_to_state_dict
            packed.replaces_conv1d = isinstance(layer, Conv1D)
            replace_module(model, name, packed)
        return model

    def update_weight_conversions(self, weight_conversions: list, model: PreTrainedModel) -> list:
        return list(weight_conversions)  # the stored buffers load as they are

    def postprocess_model(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        # HfQuantizer's own: keep the quantization_config and mark the model quantized.
        self.forget_integrity_record()
        # The layers now save in the current layout (marker included), whatever version was loaded.
        config = self.quantization_config
        config.format_version = required_version(_sparse_modules(config), getattr(config, "slim", None))
        for module in model.modules():
            if isinstance(module, PackedLinear):
                module.expects_marker_in_state_dict = True
        removed_sublayer_markers(model, saved=True)  # so do removed sub-blocks (skip_markers_while_loading)
        return super(CompressedFormatQuantizer, self).postprocess_model(model, **kwargs)

    def dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        slim = getattr(self.quantization_config, "slim", None)
        # HfQuantizer's default is config.dtype, which model.to(dtype) leaves behind: the float layers must match
        # the rest of the model as it is now.
        model = super().dequantize(model, dtype=dtype if dtype is not None else model.dtype)
        keep_slim_widths(model, slim)  # a float slim model still needs its widths to save and load again
        return model

    @property
    def is_trainable(self) -> bool:
        # Adapters train over the frozen codes (quantization.packed_lora); Trainer still refuses a packed model with
        # no adapter attached ("purely quantized"), as it does for every quantization method.
        return True

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
        if isinstance(dtype, str):  # a loaded model's config.dtype is a name ("float32")
            dtype = getattr(torch, dtype)
        from peft.tuners.tuners_utils import BaseTunerLayer

        # With adapters attached (quantization.packed_lora), peft froze the whole base: the float layers stay frozen,
        # targeted or not, or training after this would silently fine-tune them in full.
        frozen = any(isinstance(module, BaseTunerLayer) for module in model.modules())
        # By name, not a list of the modules: each packed layer is freed once its float layer replaces it.
        names = [name for name, module in model.named_modules() if isinstance(module, PackedLinear)]
        for name in names:
            module = model.get_submodule(name)
            target = dtype or module.scales.dtype
            weight = module.dequantized_weight(target)  # (out, in)
            if module.replaces_conv1d:  # the architecture's own layer, [in, out], so the float model reloads
                linear = Conv1D(module.out_features, module.in_features)
                weight = weight.T
                if module.bias is None:
                    linear.bias = None
            else:
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.to(device=module.qweight.device, dtype=target)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
                    linear.bias.requires_grad_(module.bias.requires_grad)
            linear.weight.requires_grad_(not frozen)
            replace_module(model, name, linear)
        return model


def check_packed_layer(
    reader: CheckpointReader, name: str, layer: nn.Module, config: PackedFormatConfig,
    stored_keys: Mapping[str, str] | None = None,
) -> None:
    """Refuse stored tensors of packed layer ``name`` that do not fit ``layer`` (``CheckpointIntegrityError``).

    ``stored_keys``: model key → stored key, where saving renamed some (``CheckpointReader.keys_as_loaded``).
    """
    stored_keys = stored_keys or {}

    def key(part: str) -> str:
        return stored_keys.get(f"{name}.{part}", f"{name}.{part}")

    if not hasattr(layer, "weight") or getattr(layer.weight, "ndim", 0) != 2:
        raise CheckpointIntegrityError(f"packed layer {name!r}: the model's module there is a {type(layer).__name__}, not a linear layer.")
    rows, columns = out_features(layer), in_features(layer)
    group_size = columns if config.group_size == -1 or config.group_size >= columns else config.group_size
    groups = -(-columns // group_size)
    expected = {
        "qweight": (("U8",), (rows, packed_columns(columns, config.bits))),
        "scales": (("F16", "BF16", "F32", "F64"), (rows, groups)),
        "qzeros": (("U8",), (rows, groups)),
    }
    kept = _sparse_modules(config).get(name)
    if kept is not None:
        if isinstance(kept, bool) or not isinstance(kept, int) or not 0 <= kept <= rows * columns:
            raise CheckpointIntegrityError(
                f"packed layer {name!r}: sparse_modules records {kept!r} kept weights, not an integer in "
                f"[0, {rows * columns}]; the checkpoint was edited, re-download or re-save it."
            )
        expected["qweight"] = (("U8",), (packed_columns(kept, config.bits),))
    if layer.bias is not None:
        expected["bias"] = (("F16", "BF16", "F32", "F64"), (rows,))
    if config.format_version >= 2:
        expected[FORMAT_MARKER] = (("U8",), (1,))
    for part, (dtypes, shape) in expected.items():
        entry = reader.entries.get(key(part))
        if entry is None:
            raise CheckpointIntegrityError(f"packed layer {name!r}: {name}.{part} is missing; the checkpoint is incomplete, re-save it.")
        if entry.dtype not in dtypes or entry.shape != shape:
            raise CheckpointIntegrityError(
                f"packed layer {name!r}: {part} is {entry.dtype} {list(entry.shape)}, expected {'/'.join(dtypes)} {list(shape)}."
            )
    if layer.bias is None and key("bias") in reader.entries:
        raise CheckpointIntegrityError(f"packed layer {name!r}: a bias is stored but the architecture's layer has none.")
    largest = int(reader.read(key("qzeros")).max()) if rows and groups else 0
    if largest >= 2**config.bits:
        raise CheckpointIntegrityError(
            f"packed layer {name!r}: zero-point {largest} is outside [0, {2**config.bits}) for {config.bits}-bit codes."
        )
    if kept is not None:
        marked = check_bitmask_entry(reader, key("qmask"), rows, columns, f"packed layer {name!r}")
        if marked != kept:
            raise CheckpointIntegrityError(
                f"packed layer {name!r}: the mask keeps {marked} weights but codes for {kept} are stored "
                "(sparse_modules and qweight); the mask or the codes are corrupted, re-download or re-save it."
            )


def _sparse_modules(config: Any) -> dict[str, int]:
    return dict(getattr(config, "sparse_modules", None) or {})


def sync_packed_config(model: nn.Module, config: PackedFormatConfig) -> PackedFormatConfig:
    """Make ``config`` describe the model's layers: ``sparse_modules`` from the masks they carry, the slim widths
    when the model needs them, and the version these fields require. Returns ``config``."""
    modules = dict(model.named_modules())
    config.sparse_modules = {
        name: modules[name].kept for name in config.modules
        if isinstance(modules.get(name), PackedLinear) and modules[name].is_sparse
    }
    if getattr(config, "slim", None) is None:
        config.slim = slim_record(model)
    config.format_version = required_version(config.sparse_modules, config.slim)
    return config


def check_not_packed(model: nn.Module, hint: str) -> None:
    """Refuse a model that already holds packed layers, before any work: a new ``quantization_config`` would list
    only the layers packed now (one bit width, one module list), a checkpoint no loader accepts. ``hint``: what to
    do instead."""
    already = sum(isinstance(module, PackedLinear) for module in model.modules())
    if already:
        raise ValueError(f"The model already holds {already} packed layers: {hint}, or call `model.dequantize()` first.")


def attach_packed_format(model: PreTrainedModel, config: PackedFormatConfig) -> PreTrainedModel:
    """Mark a model holding ``PackedLinear`` layers as a ``hf_compress_packed`` model (as loading would).

    ``save_pretrained`` then writes the packed checkpoint with its ``quantization_config``.
    """
    sync_packed_config(model, config)  # before the attach below replaces a slim model's SlimFormatConfig
    quantizer = PackedFormatQuantizer(config, pre_quantized=True)
    _compat.attach_quantizer(model, quantizer, FORMAT_NAME)
    return quantizer.postprocess_model(model)


@main_process_only("save_dir")
def save_packed(
    model: PreTrainedModel,
    tokenizer: Any,
    save_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    card: Any = None,
) -> Path:
    """Save a packed low-bit model (and tokenizer, and model card) atomically, with checksums.

    Layers that carry a sparsity mask are written in the stacked sparse + low-bit form (mask + the codes of
    the kept weights); a slim model's widths go with them (see the module docstring).

    A plain ``model.save_pretrained(folder)`` also writes a loadable checkpoint; this adds what every
    hf_compress writer guarantees: all-or-nothing (``atomic_directory``), a non-empty ``save_dir`` only with
    ``overwrite=True``, and per-tensor checksums verified at load (``seal_checkpoint``).

    Example:
        >>> save_packed(quantize_rtn(model, bits=4), tokenizer, "llama-4bit")  # doctest: +SKIP
    """
    from ..hub import write_model_card
    from ..utils import atomic_directory, check_save_dir

    if not any(isinstance(module, PackedLinear) for module in model.modules()):
        raise ValueError("save_packed needs a model with packed layers (merge_and_quantize() or quantize_rtn()).")
    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, PackedFormatConfig):
        raise ValueError("save_packed needs a model marked packed (merge_and_quantize(), quantize_rtn() or "
                         "attach_packed_format()); this one carries no hf_compress_packed quantization_config.")
    sync_packed_config(model, config)  # masks added or removed since: written as the layers are now
    target = check_save_dir(save_dir, overwrite)
    with atomic_directory(target, overwrite=overwrite) as staging:
        with _compat.quiet_weight_progress():  # a second of bookkeeping: no "Writing model shards" bar
            model.save_pretrained(staging)
        seal_checkpoint(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if card is not None:
            write_model_card(staging, card)
    return target


def packed_size(model: nn.Module) -> dict[str, int]:
    """Bytes of the packed layers (``packed``, masks included) against the same weights in bf16 (``bf16``).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> from hf_compress.quantization import quantize_rtn
        >>> size = packed_size(quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32))
        >>> round(size["packed"] / size["bf16"], 3)
        0.328
    """
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    return {
        "layers": len(packed),
        "packed": sum(m.packed_bytes() for m in packed),
        "bf16": sum(2 * m.in_features * m.out_features for m in packed),
    }
