"""The ``hf_compress_packed`` checkpoint format: group-quantized linear weights stored as packed integers.

A model exported by ``DLQATModel.merge_and_quantize()`` (or ``hf_compress.quantization.quantize_rtn``) holds ``PackedLinear``
layers in place of the quantized ``nn.Linear`` ones. Its ``save_pretrained`` writes their buffers
(``qweight``, ``scales``, ``qzeros``; see ``packed_linear``) and a ``quantization_config``::

    {"quant_method": "hf_compress_packed", "format_version": 1, "bits": 3, "group_size": 128,
     "symmetric": false, "modules": ["model.layers.0.self_attn.q_proj", ...], "recipe": {...}}

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

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import _compat
from ..modeling.layers import in_features, out_features, replace_module
from ..quantization.grid import check_grid_arguments
from ..quantization.packed_linear import PackedLinear
from ..utils import get_logger
from .base import CompressedFormatConfig, CompressedFormatQuantizer, register_format


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = [
    "FORMAT_NAME",
    "PackedFormatConfig",
    "PackedFormatQuantizer",
    "attach_packed_format",
    "packed_size",
]

logger = get_logger(__name__)

FORMAT_NAME = "hf_compress_packed"


class PackedFormatConfig(CompressedFormatConfig):
    """``quantization_config`` of a packed low-bit checkpoint (``bits``, ``group_size``, ``symmetric``,
    ``modules``: the qualified names of the packed layers, ``recipe``: how the weights were made)."""

    QUANT_METHOD = FORMAT_NAME

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = False,
        modules: Sequence[str] = (),
        recipe: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_grid_arguments(bits, group_size)
        super().__init__(
            bits=bits, group_size=group_size, symmetric=symmetric, modules=list(modules), recipe=dict(recipe or {}),
            **kwargs,
        )


@register_format
class PackedFormatQuantizer(CompressedFormatQuantizer):
    """Rebuilds ``PackedLinear`` layers at load time and stays attached (a compute format)."""

    config_class = PackedFormatConfig

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        config = self.quantization_config
        modules = dict(model.named_modules())
        missing = [name for name in config.modules if name not in modules]
        if missing:
            raise ValueError(
                f"This packed checkpoint lists {len(missing)} layer(s) the model does not have (e.g. {missing[0]!r}); "
                "the config.json and the weights come from different models."
            )
        for name in config.modules:
            layer = modules[name]
            weight = layer.weight
            packed = PackedLinear(
                in_features(layer), out_features(layer), config.bits, config.group_size,
                bias=layer.bias is not None, dtype=weight.dtype, device=weight.device,
            )
            replace_module(model, name, packed)
        return model

    def update_weight_conversions(self, weight_conversions: list, model: PreTrainedModel) -> list:
        return list(weight_conversions)  # the stored buffers load as they are

    def postprocess_model(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        # HfQuantizer's own: keep the quantization_config and mark the model quantized.
        return super(CompressedFormatQuantizer, self).postprocess_model(model, **kwargs)

    @property
    def is_trainable(self) -> bool:
        return False

    def _dequantize(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
        for name, module in list(model.named_modules()):
            if isinstance(module, PackedLinear):
                linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                target = dtype or module.scales.dtype
                linear.to(device=module.qweight.device, dtype=target)
                with torch.no_grad():
                    linear.weight.copy_(module.dequantized_weight(target))
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
                replace_module(model, name, linear)
        return model


def attach_packed_format(model: PreTrainedModel, config: PackedFormatConfig) -> PreTrainedModel:
    """Mark a model holding ``PackedLinear`` layers as a ``hf_compress_packed`` model (as loading would).

    ``save_pretrained`` then writes the packed checkpoint with its ``quantization_config``.
    """
    quantizer = PackedFormatQuantizer(config, pre_quantized=True)
    _compat.attach_quantizer(model, quantizer, FORMAT_NAME)
    return quantizer.postprocess_model(model)


def packed_size(model: nn.Module) -> dict[str, int]:
    """Bytes of the packed layers (``packed``) against the same weights in bf16 (``bf16``).

    Example:
        >>> from hf_compress.assets import tiny_model
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
