"""Evaluation harness: perplexity, zero-shot accuracy, generation speed, memory.

Every function returns plain JSON-ready dicts; ``*_record(s)`` helpers turn them into
:class:`MetricRecord` rows for model cards.

Example:
    >>> from hf_compress.assets import load_reference_model, load_text
    >>> from hf_compress.evaluation import evaluate_perplexity
    >>> model, tokenizer = load_reference_model()  # doctest: +SKIP
    >>> evaluate_perplexity(model, tokenizer, load_text("wikipedia", "eval"))["perplexity"]  # doctest: +SKIP
"""

from .memory import cache_bytes, disk_bytes, measure_kv_cache_bytes, parameter_bytes
from .perplexity import evaluate_perplexity, perplexity_record, token_windows, tokenize_stream
from .results import MetricRecord
from .speed import compare_generation_speed, measure_generation_speed, speed_ratio
from .zero_shot import evaluate_zero_shot, zero_shot_records


__all__ = [
    "MetricRecord",
    "cache_bytes",
    "compare_generation_speed",
    "disk_bytes",
    "evaluate_perplexity",
    "evaluate_zero_shot",
    "measure_generation_speed",
    "measure_kv_cache_bytes",
    "parameter_bytes",
    "perplexity_record",
    "speed_ratio",
    "token_windows",
    "tokenize_stream",
    "zero_shot_records",
]
