"""hf_compress: LLM compression methods as first-class Hugging Face citizens.

Importing the package registers its checkpoint loaders with transformers and its PEFT methods with
peft; the other method sub-packages are imported on first use.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, tokenizer = tiny_model("llama")
"""

__version__ = "0.1.0.dev0"

# Registers hf_compress's checkpoint formats with transformers, so a plain
# `AutoModelForCausalLM.from_pretrained` loads sparse and packed low-bit checkpoints ...
from .modeling import loading as _loading  # noqa: E402,F401

# ... and its PEFT methods with peft (adds `DLQAT` to `peft.PeftType`), so `PeftModel.from_pretrained`
# loads a saved DL-QAT adapter in a fresh process.
from .quantization import dlqat as _dlqat  # noqa: E402,F401

__all__ = ["__version__"]
