"""hf_compress: LLM compression methods as first-class Hugging Face citizens.

``import hf_compress`` is light (no torch, no transformers model code): it checks that the installed
transformers/peft/accelerate are at least the releases hf_compress was tested with, and arranges for
its checkpoint formats to register with transformers and its PEFT method with peft as soon as those are
imported. A plain ``AutoModelForCausalLM.from_pretrained`` then loads sparse, packed and slim checkpoints,
and ``PeftModel.from_pretrained`` loads DL-QAT adapters; given a drafting-heads or CoSpec arbiter folder, it
says what the folder is and how to decode with it (:mod:`hf_compress.utils.model_types`). Subpackages are
imported on first use, so ``hf_compress.recipe.run(...)`` works after a bare ``import hf_compress``.

Example:
    >>> import hf_compress
    >>> from hf_compress.assets import tiny_model
    >>> model, tokenizer = tiny_model("llama")
"""

__version__ = "0.1.0.dev0"

import importlib as _importlib
import pkgutil as _pkgutil
from importlib.util import find_spec as _find_spec

from . import _compat
from .formats import register_lazily as _register_formats
from .utils.import_hooks import when_imported as _when_imported
from .utils.model_types import register_lazily as _register_model_types


_compat.check_minimum_versions()


def _register_peft_methods(_peft_module) -> None:
    # Adds `DLQAT` to `peft.PeftType` and registers the method, so a saved adapter loads in a fresh process; and lets
    # LoRA adapt packed low-bit layers (a LoRA adapter trained on a packed model loads there again).
    _importlib.import_module("hf_compress.quantization.dlqat")
    _importlib.import_module("hf_compress.quantization.packed_lora")


_register_formats()
_register_model_types()  # heads and arbiter folders: AutoModelForCausalLM says what they are
_when_imported("peft", _register_peft_methods)


def __getattr__(name: str):
    # A subpackage imports on first attribute access (as in transformers), so `import hf_compress` stays light;
    # found on disk rather than listed, so a new method folder needs no edit here.
    if not name.startswith("_") and _find_spec(f"{__name__}.{name}") is not None:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {m.name for m in _pkgutil.iter_modules(__path__) if not m.name.startswith("_")})


__all__ = ["__version__"]
