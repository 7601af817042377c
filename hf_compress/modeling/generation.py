"""What a ``generate()`` call will use, read before the call, for wrappers that must decide something first.

Example:
    >>> import torch
    >>> from hf_compress.assets import tiny_model
    >>> model = tiny_model("llama")[0]
    >>> generation_setting(model, "num_beams", {"num_beams": 4})
    4
    >>> inferred_attention_mask(model, torch.tensor([[7, 7, 5]]), {"pad_token_id": 7, "eos_token_id": 2})
    tensor([[0, 0, 1]])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


__all__ = ["generation_setting", "inferred_attention_mask"]


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


def inferred_attention_mask(model: nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any],
                            args: tuple = ()) -> torch.Tensor | None:
    """The mask ``generate()`` infers when given none (its ``_prepare_attention_mask_for_generation``): the pad
    tokens masked if the pad token occurs in ``input_ids`` and is not an end-of-sequence token; ``None`` (all ones)
    otherwise."""
    pad, eos = (generation_setting(model, name, kwargs, args) for name in ("pad_token_id", "eos_token_id"))
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if pad is None or pad in eos or not bool((input_ids == pad).any()):
        return None
    return input_ids.ne(pad).long()
