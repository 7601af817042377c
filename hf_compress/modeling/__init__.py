"""Model introspection and block-by-block calibration shared by every compression method.

``layers`` finds decoder blocks and their linear layers generically (``nn.Linear`` and GPT-2's
``Conv1D``) and gives a uniform ``[out_features, in_features]`` weight view; ``calibration`` runs
calibration data through the blocks one at a time (the SparseGPT/Wanda sequential convention),
collecting per-layer statistics for a method's callback.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.modeling import HessianCollector, calibration_batches, for_each_block
    >>> model, tokenizer = tiny_model("llama")
    >>> ids = calibration_batches(["calibration text " * 50], tokenizer, num_sequences=4, seq_len=32)
    >>> seen = []
    >>> _ = for_each_block(model, ids, lambda ctx: seen.append(sorted(ctx.stats)), progress=False,
    ...                    collectors_for=lambda name, layer: [HessianCollector()], skip=["mlp.*"])
    >>> seen[0]
    ['self_attn.k_proj', 'self_attn.o_proj', 'self_attn.q_proj', 'self_attn.v_proj']
"""

from .calibration import (
    BlockCall,
    BlockContext,
    BlockInputs,
    Collector,
    HessianCollector,
    InputNormCollector,
    calibration_batches,
    calibration_loss,
    capture_block_inputs,
    for_each_block,
    forward_from_block,
)
from .layers import (
    LINEAR_TYPES,
    check_within_learned_positions,
    find_decoder_blocks,
    find_linear_layers,
    in_features,
    is_linear,
    learned_position_limit,
    matches_any,
    module_execution_device,
    onloaded,
    out_features,
    replace_module,
    set_weight_matrix,
    weight_matrix,
)
from .reconstruction import reconstruction_error, train_block_reconstruction


__all__ = [
    "BlockCall",
    "BlockContext",
    "BlockInputs",
    "Collector",
    "HessianCollector",
    "InputNormCollector",
    "LINEAR_TYPES",
    "check_within_learned_positions",
    "learned_position_limit",
    "calibration_batches",
    "calibration_loss",
    "capture_block_inputs",
    "find_decoder_blocks",
    "find_linear_layers",
    "for_each_block",
    "forward_from_block",
    "in_features",
    "is_linear",
    "matches_any",
    "module_execution_device",
    "onloaded",
    "out_features",
    "reconstruction_error",
    "replace_module",
    "set_weight_matrix",
    "train_block_reconstruction",
    "weight_matrix",
]
