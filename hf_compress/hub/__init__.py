"""Hugging Face Hub integration: model cards for compressed artifacts, and pushing them.

Example:
    >>> from hf_compress.hub import build_model_card, write_model_card, push_to_hub
    >>> card = build_model_card(
    ...     base_model="HuggingFaceTB/SmolLM2-135M", model_name="SmolLM2-135M-wanda",
    ...     recipe={"method": "wanda", "sparsity": 0.5}, metrics=records,
    ... )  # doctest: +SKIP
    >>> write_model_card("out/SmolLM2-135M-wanda", card)  # doctest: +SKIP
    >>> push_to_hub("out/SmolLM2-135M-wanda", "me/SmolLM2-135M-wanda")  # doctest: +SKIP
"""

from ..utils.import_hooks import lazy_exports


# Names load on first use: the CLI registers `hf-compress publish` without importing torch (the cards import the
# evaluation package, whose measurements import torch).
_EXPORTS = {
    **dict.fromkeys((
        "COMPRESSION_METADATA_KEY", "HF_COMPRESS_TAG", "TEMPLATES", "build_model_card", "eval_result_to_metric",
        "base_model_of", "base_weights_of", "hub_model_id", "load_card", "metric_to_eval_result", "read_metrics",
        "read_recipe", "validate_model_card", "write_model_card",
    ), "model_card"),
    **dict.fromkeys(
        ("DEFAULT_ALLOW_PATTERNS", "PICKLE_PATTERNS", "PushPlan", "find_local_paths", "plan_push", "push_to_hub"), "push"
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
