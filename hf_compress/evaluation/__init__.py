"""Evaluation harness: perplexity, zero-shot accuracy, generation speed, memory.

Every function returns plain JSON-ready dicts; ``*_record(s)`` helpers turn them into
:class:`MetricRecord` rows for model cards.

Example:
    >>> from hf_compress.assets import load_reference_model, load_text
    >>> from hf_compress.evaluation import evaluate_perplexity
    >>> model, tokenizer = load_reference_model()  # doctest: +SKIP
    >>> evaluate_perplexity(model, tokenizer, load_text("wikipedia", "eval"))["perplexity"]  # doctest: +SKIP
"""

from ..utils.import_hooks import lazy_exports


# Names load on first use: `MetricRecord` (what cards and recipes import) does not import torch.
_EXPORTS = {
    **dict.fromkeys(("cache_bytes", "disk_bytes", "measure_kv_cache_bytes", "parameter_bytes"), "memory"),
    **dict.fromkeys(("evaluate_perplexity", "perplexity_record", "token_windows", "tokenize_stream"), "perplexity"),
    "MetricRecord": "results",
    **dict.fromkeys(("compare_generation_speed", "measure_generation_speed", "speed_ratio"), "speed"),
    **dict.fromkeys(("evaluate_zero_shot", "zero_shot_records"), "zero_shot"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
