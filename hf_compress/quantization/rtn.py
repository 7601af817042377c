"""Round-to-nearest quantization into the packed low-bit format: DL-QAT's baseline, no training.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> packed = quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32)
    >>> packed.config.quantization_config.recipe
    {'method': 'rtn'}

A pruned model stays sparse (``keep_sparsity="auto"``, as in DL-QAT): each layer with at least 10% exact zeros
becomes a sparse ``PackedLinear`` (its mask + the codes of the kept weights), so ``save_packed`` writes the
stacked sparse + low-bit checkpoint; a slim (Týr / block-removal) model's widths are recorded with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers.pytorch_utils import Conv1D

from ..formats.packed import PackedFormatConfig, attach_packed_format, check_not_packed
from ..formats.slim import slim_record
from ..modeling.fused_experts import warn_fused_experts_untouched
from ..modeling.layers import (
    check_not_offloaded, check_skip_patterns, computes_linear, find_decoder_blocks, find_linear_layers, replace_module,
    weight_matrix,
)
from ..routing.layer import check_not_routed
from ..utils import InvalidArgumentTypeError, check_bool, check_str_list, get_logger
from .grid import QuantizationGrid, check_grid_arguments, check_keep_sparsity, keeps_sparsity
from .packed_linear import PackedLinear


if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = get_logger(__name__)


__all__ = ["quantize_rtn"]

ROUTED_HINT = ("quantize the model it was routed from instead: the routed format keeps every weight in float, so a "
               "quantized checkpoint would drop the router")
"""What RTN and DL-QAT tell the owner of a token-routed model (``check_not_routed``)."""


@torch.no_grad()
def quantize_rtn(
    model: PreTrainedModel,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    skip: Sequence[str] = (),
    keep_sparsity: bool | str = "auto",
) -> PreTrainedModel:
    """Round-to-nearest: pack every linear layer (or ``Conv1D``) of the decoder blocks in place, no training.

    The baseline of DL-QAT (and what a DL-QAT adapter at initialisation exports). ``skip`` holds
    ``fnmatch`` patterns of qualified layer names to keep in full precision. ``keep_sparsity`` as in
    ``DLQATConfig``: ``"auto"`` keeps the exact zeros of layers at least 10% zero as a mask (a pruned model stays
    sparse), ``True`` of every layer with any zero, ``False`` packs every layer dense.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise InvalidArgumentTypeError(
            f"model must be a transformers PreTrainedModel (a causal LM), got {type(model).__name__}."
        )
    check_grid_arguments(bits, group_size)
    check_bool("symmetric", symmetric)
    check_keep_sparsity(keep_sparsity)
    skip = check_str_list("skip", skip, hint="skip holds fnmatch patterns of layer names, e.g. '*down_proj'.")
    check_not_packed(model, "quantize the float model instead (all layers at once; `skip` keeps some in full precision)")
    check_not_routed(model, ROUTED_HINT)
    check_not_offloaded(model, "Round-to-nearest quantization")  # offloaded weights are on 'meta'
    slim = slim_record(model)  # measured on the nn.Linear layers, before they are replaced
    prefix, blocks = find_decoder_blocks(model)
    check_skip_patterns(model, skip)
    layers = {f"{prefix}.{index}.{name}": layer for index, block in enumerate(blocks)
              for name, layer in find_linear_layers(block, skip=skip, qualified_prefix=f"{prefix}.{index}").items()}
    # Refused before any layer is replaced: a refused model stays as it came.
    if not layers:  # a "packed" model of float layers would only mislabel the checkpoint
        raise ValueError(
            f"no layers to quantize: the {len(blocks)} decoder blocks of {type(model).__name__} hold no "
            f"nn.Linear/Conv1D left after skip={skip}."
        )
    broken = next((name for name, layer in layers.items() if not torch.isfinite(weight_matrix(layer)).all()), None)
    if broken is not None:
        raise ValueError(f"{broken} holds non-finite weights (NaN or inf); quantize a finite model.")
    warn_fused_experts_untouched(model, "Round-to-nearest quantization")  # PackedLinear replaces nn.Linear only
    routers = [name for name, layer in layers.items() if not computes_linear(layer)]
    if routers:  # a PackedLinear computes x·Wᵀ, not what these compute from their weight
        logger.warning("Round-to-nearest quantization leaves %d layers in full precision that are nn.Linear "
                       "subclasses computing something other than a linear map (e.g. %s, a %s)", len(routers),
                       routers[0], type(layers[routers[0]]).__name__)
        layers = {name: layer for name, layer in layers.items() if name not in routers}
    names = list(layers)
    for name in names:
        layer = layers.pop(name)  # the float layer is freed once replaced: never float and packed weights of all
        w = weight_matrix(layer)
        grid = QuantizationGrid.fit(w, bits, group_size, symmetric)
        packed = PackedLinear.from_codes(
            grid.quantize(w), grid.scale, grid.zero, bits, group_size,
            bias=layer.bias, dtype=w.dtype, mask=(w != 0) if keeps_sparsity(w, keep_sparsity) else None,
        )
        packed.replaces_conv1d = isinstance(layer, Conv1D)
        replace_module(model, name, packed)
    config = PackedFormatConfig(bits, group_size, symmetric, names, recipe={"method": "rtn"}, slim=slim)
    return attach_packed_format(model, config)
