"""hf_compress's checkpoint formats, registered with transformers without importing any method package.

A format is a ``quant_method`` in ``config.json`` that transformers resolves through its quantizer registry.
``import hf_compress`` calls :func:`register_lazily`: as soon as transformers' quantizer registry is imported
(by the user's first ``from_pretrained``, or already), each format gets a placeholder entry; the first
checkpoint of that format to load imports the module that implements it, which replaces the placeholder
with the real classes. So the import stays light (no torch) and a plain
``AutoModelForCausalLM.from_pretrained(folder)`` still loads every format.

Example:
    >>> import hf_compress
    >>> from transformers import AutoModelForCausalLM
    >>> sorted(FORMAT_MODULES)
    ['hf_compress_packed', 'hf_compress_routed', 'hf_compress_slim', 'hf_compress_sparse']
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


__all__ = ["FORMAT_MODULES", "load_format", "register_lazily"]

FORMAT_MODULES: dict[str, str] = {
    "hf_compress_sparse": "hf_compress.formats.sparse",
    "hf_compress_packed": "hf_compress.formats.packed",
    "hf_compress_slim": "hf_compress.formats.slim",
    "hf_compress_routed": "hf_compress.routing.format",
}
"""``quant_method`` → the module that implements it (and registers it when imported)."""

_REGISTRY_MODULE = "transformers.quantizers.auto"


def load_format(name: str) -> type:
    """Import the module of format ``name`` and return its quantizer class (now registered with transformers)."""
    importlib.import_module(FORMAT_MODULES[name])
    from .base import registered_formats

    return registered_formats()[name]


def register_lazily() -> None:
    """Register placeholders for every format once transformers' quantizer registry is imported."""
    from ..utils.import_hooks import when_imported

    when_imported(_REGISTRY_MODULE, _register_placeholders)


def _register_placeholders(registry: ModuleType) -> None:
    from .. import _compat

    for name in FORMAT_MODULES:
        if _compat.registered_quantization_config(name) is None:
            _compat.register_quantization_format(name, *_placeholders(name))


def _placeholders(name: str) -> tuple[type, type]:
    """A config class and a quantizer class that stand for format ``name`` until its module is imported."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class LazyFormatConfig(QuantizationConfigMixin):
        hf_compress_format = name

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
            config_class = load_format(name).config_class
            return config_class.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    class LazyFormatQuantizer(HfQuantizer):
        hf_compress_format = name

        def __new__(cls, *args: Any, **kwargs: Any):
            # An instance of the real class is returned, so Python does not call this class's __init__.
            return load_format(name)(*args, **kwargs)

    for cls in (LazyFormatConfig, LazyFormatQuantizer):
        cls.__qualname__ = f"{cls.__name__}[{name}]"
    return LazyFormatConfig, LazyFormatQuantizer
