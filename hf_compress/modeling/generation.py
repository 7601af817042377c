"""What a ``generate()`` call will use, read before the call, for wrappers that must decide something first.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model = tiny_model("llama")[0]
    >>> generation_setting(model, "num_beams", {"num_beams": 4})
    4
"""

from __future__ import annotations

from typing import Any

from torch import nn


__all__ = ["generation_setting"]


def generation_setting(model: nn.Module, name: str, kwargs: dict[str, Any], args: tuple = ()) -> Any:
    """``name`` as ``model.generate(*args, **kwargs)`` will read it: the keyword (even ``None``), else the generation
    config the call was given (keyword or second positional argument), else the model's."""
    if name in kwargs:
        return kwargs[name]
    given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
    for config in (given, getattr(model, "generation_config", None)):
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None
