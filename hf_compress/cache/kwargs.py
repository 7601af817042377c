"""``cache_kwargs``: hand a cache to ``generate()`` or a forward under the name the installed transformers takes.

transformers 5.24 renamed the model keyword ``past_key_values`` to ``cache``: 5.24 still accepts the old name
but warns (``FutureWarning``), 5.23 refuses the new one (``model_kwargs are not used by the model: ['cache']``).
``model.generate(**inputs, **cache_kwargs(model, cache))`` works on both without a warning.

Example:
    >>> import torch
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.cache import SparKCache
    >>> model, _ = tiny_model("llama")
    >>> cache = SparKCache(model.config, channel_ratio=0.5)
    >>> out = model.generate(torch.tensor([[1, 2, 3]]), **cache_kwargs(model, cache), max_new_tokens=4, do_sample=False)
    >>> out.shape
    torch.Size([1, 7])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import _compat


if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel


__all__ = ["cache_kwargs"]


def cache_kwargs(model: PreTrainedModel, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` on transformers ≥ 5.24, ``{"past_key_values": cache}`` before (read from the model).

    The name comes from ``model.forward``'s signature (remote-code models that still take ``past_key_values``
    get that), so the same line runs, without a deprecation warning, on every transformers hf_compress supports.
    """
    return {_compat.cache_kwarg_name(model): cache}
