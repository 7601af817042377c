"""What a recipe measures after the base model and after every step: perplexity on fixed windows and bytes.

Perplexity comes from ``evaluation.suite.run_evaluation`` with the recipe's ``EvaluationSpec`` (the same evenly
spaced windows every time, so the numbers compare). Bytes are those of the tensors the final save would write
for the model as it is (``stored_bytes``: sparse layers encoded as ``save_pruned`` encodes them, packed layers
as they are packed, tied weights once), and of the decoder-block linear weights against the base model's in
fp32 (the issue's target is ≤ 0.2× for 2:4 + 4-bit).

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, _ = tiny_model("llama")
    >>> sizes = weight_bytes(model)
    >>> sizes["decoder_linear_bytes"] == decoder_linear_fp32_bytes(model)
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..modeling.layers import evaluation_mode
from ..utils import get_logger
from .config import EvaluationSpec


if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..evaluation.results import MetricRecord


__all__ = ["decoder_linear_fp32_bytes", "measure", "weight_bytes"]

logger = get_logger(__name__)


def measure(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: EvaluationSpec, *, base_linear_fp32: int,
    zero_shot: bool = False, progress: bool = True,
) -> tuple[dict[str, Any], list[MetricRecord]]:
    """Perplexity (and zero-shot where asked) plus :func:`weight_bytes`; returns (numbers, model-card records)."""
    from ..evaluation.suite import headline_metrics, run_evaluation

    with evaluation_mode(model):
        results, records = run_evaluation(model, tokenizer, spec.settings(zero_shot=zero_shot), progress=progress)
    metrics: dict[str, Any] = headline_metrics(results, spec.text)
    metrics.update(weight_bytes(model))
    metrics["decoder_linear_vs_base_fp32"] = round(metrics["decoder_linear_bytes"] / base_linear_fp32, 6)
    metrics["evaluation_seconds"] = round(results["seconds"], 2)
    return metrics, records


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the checkpoint's tensors (``stored_bytes``) and of its decoder-block linear weights, as stored."""
    from ..pruning.storage import filled_state_dict, plan_sparse_storage
    from ..quantization.packed_linear import PackedLinear

    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if packed:
        # save_packed stores every layer it did not pack as is, dense (a pruned layer the quantizer skipped too).
        dense = sum(weight.numel() * weight.element_size() for weight in _decoder_linear_weights(model))
        return {"stored_bytes": _unique_bytes(model.state_dict().values()),
                "decoder_linear_bytes": dense + sum(m.packed_bytes() for m in packed)}
    state_dict = filled_state_dict(model)  # an offloaded model's tensors are 'meta' placeholders, which count nothing
    storage = plan_sparse_storage(model, state_dict=state_dict).storage  # pruned layers stored sparse-encoded
    return {  # the dense state dict, less what the encoding saves on the decoder-block weights
        "stored_bytes": _unique_bytes(state_dict.values()) + storage["stored_linear_bytes"]
        - storage["dense_linear_bytes"],
        "decoder_linear_bytes": storage["stored_linear_bytes"],
    }


def decoder_linear_fp32_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder-block linear weights held in fp32 (the reference of the stacking target); a packed layer
    (a ``base_model`` saved quantized) counts as the float layer it stands for."""
    from ..modeling.layers import find_decoder_blocks
    from ..quantization.packed_linear import PackedLinear

    _, blocks = find_decoder_blocks(model)
    packed = sum(4 * module.in_features * module.out_features for block in blocks for module in block.modules()
                 if isinstance(module, PackedLinear))
    return packed + sum(4 * weight.numel() for weight in _decoder_linear_weights(model))


def _decoder_linear_weights(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The weight of every linear layer in the decoder blocks, each fused MoE expert's projections included (packed
    layers are not linears)."""
    from ..modeling.layers import find_decoder_blocks, find_linear_layers, weight_matrix

    _, blocks = find_decoder_blocks(model)
    return (weight_matrix(layer) for block in blocks
            for layer in find_linear_layers(block, fused_experts=True).values())


def _unique_bytes(tensors: Any) -> int:
    """Total bytes, a tensor shared by two names (tied embeddings) counted once, as save_pretrained stores it."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
