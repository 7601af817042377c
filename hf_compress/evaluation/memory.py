"""Memory measurements: bytes of parameters, of a saved checkpoint, and of a filled KV cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from .. import _compat
from ..modeling.layers import check_within_learned_positions
from ..utils import InvalidArgumentTypeError, check_int, check_path, check_str


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by a model's parameters and buffers (tied weights counted once).

    Example:
        >>> parameter_bytes(model)["parameters"]  # doctest: +SKIP
        538090496
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentTypeError(f"model must be a torch model (nn.Module), got {type(model).__name__}.")
    seen: set[int] = set()
    params = buffers = count = 0
    for tensor in model.parameters():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            params += tensor.numel() * tensor.element_size()
            count += tensor.numel()
    for tensor in model.buffers():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            buffers += tensor.numel() * tensor.element_size()
    return {"parameters": params, "buffers": buffers, "parameter_count": count}


def disk_bytes(folder: str | os.PathLike, pattern: str = "*") -> int:
    """Total size of the files under ``folder`` matching ``pattern`` (recursively).

    Example:
        >>> disk_bytes("out/", "*.safetensors")  # doctest: +SKIP
    """
    check_path("folder", folder)
    check_str("pattern", pattern)
    if not Path(folder).is_dir():
        raise NotADirectoryError(f"folder {os.fspath(folder)!r} is not a directory; pass the saved checkpoint folder.")
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern) if p.is_file())


def cache_bytes(cache: Cache) -> int:
    """Bytes a KV cache actually holds.

    A cache that knows its own footprint (``memory_footprint()`` returning bytes held, as hf_compress
    caches do) is asked; otherwise every key/value tensor a layer holds is summed, including the ones kept
    in tuples and dicts (transformers' quantized layers keep ``(codes, scale)`` pairs, HQQ's ``(codes, meta)``
    with the scales and zero points in ``meta``, in ``_quantized_keys`` next to an empty ``keys`` tensor).
    Bookkeeping tensors (a sliding window's size) are not cache payload.
    """
    footprint = getattr(cache, "memory_footprint", None)
    if callable(footprint):
        held = footprint()
        return int(held["held"] if isinstance(held, dict) else held)
    return sum(cache_layer_bytes(layer) for layer in cache.layers)


def cache_layer_bytes(layer: Any) -> int:
    """Bytes of keys and values one transformers cache layer keeps: the elements of its key/value tensors.

    A sliding-window layer (Gemma 3's local layers) keeps the last ``sliding_window - 1`` tokens, which after a
    longer prefill are a view of that forward's states until its next update: the window is counted, what it keeps
    from then on. hf_compress caches count such a dense layer with this too, so their footprint compares with a
    ``DynamicCache`` measured here.

    Example:
        >>> from types import SimpleNamespace
        >>> cache_layer_bytes(SimpleNamespace(keys=torch.zeros(2, 3), values=torch.zeros(2, 3), cumulative_length=6))
        48
    """
    return sum(_tensor_bytes(value) for name, value in vars(layer).items() if "key" in name or "value" in name)


def _tensor_bytes(value: Any) -> int:
    # Tensors, also inside tuples, lists and dicts: HQQ's quantized layers keep (codes, meta) with the scales and
    # zero points in the meta dict.
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    return 0


@torch.inference_mode()
def measure_kv_cache_bytes(
    model: PreTrainedModel, seq_len: int = 2048, batch_size: int = 1, cache: Cache | None = None
) -> dict[str, Any]:
    """Fill a cache with a ``seq_len``-token prefill of random ids and report the bytes it holds.

    Example:
        >>> measure_kv_cache_bytes(model, seq_len=2048)["kv_bytes"]  # doctest: +SKIP
        47185920
    """
    check_int("seq_len", seq_len, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    if cache is not None and not isinstance(cache, Cache):
        raise InvalidArgumentTypeError(f"cache must be a transformers Cache or None, got {type(cache).__name__}.")
    check_within_learned_positions(model, seq_len, "seq_len is", "seq_len")
    cache = cache if cache is not None else DynamicCache(config=model.config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch_size, seq_len), generator=generator)
    model(input_ids=ids.to(model.device), use_cache=True, logits_to_keep=1, **{_compat.cache_kwarg_name(model): cache})
    held = cache_bytes(cache)
    return {
        "kv_bytes": held,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "bytes_per_token": held / (seq_len * batch_size),
        "cache_class": type(cache).__name__,
    }
