"""hf_compress: LLM compression methods as first-class Hugging Face citizens.

Importing the package is cheap; sub-packages are imported on first use.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, tokenizer = tiny_model("llama")
"""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
