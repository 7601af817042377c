"""The one place where hf_compress relies on private or unstable APIs of transformers, peft and accelerate.

Every reach into another library's internals goes through a function here, so that when a release moves
something (transformers 5.24 renamed generate's ``past_key_values`` model kwarg to ``cache``) there is one
file to read and one file to fix. Each entry says which versions it was checked on; where the newest
release has a public API it is used first and the private path is only the fallback for older releases.
:func:`check_assumptions` re-checks every assumption against the installed versions and returns what no
longer holds (``tests/test_compat.py`` fails on any), and ``tests/test_compat.py`` also greps the rest of
the package for the private names listed in :data:`PRIVATE_NAMES`.

This module must stay cheap to import (``import hf_compress`` imports it): only the standard library at
the top, everything else inside the functions.

Checked on: transformers 5.23.0, 5.24.0 and 5.25.0 (with kernels 0.19.1, the first release of its new
requirement on the package index), peft 0.21.2 and 0.22.0, accelerate 1.15.0 and 1.16.0, torch 2.13.0 and 2.14.1
(the pinned set is ``constraints.txt``).

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, _ = tiny_model("llama")
    >>> cache_kwarg_name(model) in ("cache", "past_key_values")
    True
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.metadata
import inspect
import re
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel


__all__ = [
    "MINIMUM_VERSIONS",
    "PRIVATE_NAMES",
    "VersionTooOldError",
    "accelerate_hook",
    "accelerate_repoint_forward",
    "accept_in_text_generation_pipeline",
    "attach_quantizer",
    "attention_implementation",
    "auto_model_types",
    "cache_from_model_kwargs",
    "cache_mask_sizes",
    "cache_kwarg_name",
    "cache_layer_types",
    "cache_of_output",
    "check_assumptions",
    "check_minimum_versions",
    "checkpoint_files_of_preprocess",
    "checkpoint_keys_of",
    "detach_quantizer",
    "eager_attention_forward",
    "extend_peft_type",
    "has_peft_adapters",
    "hub_default_ignore_patterns",
    "ignore_unexpected_keys",
    "is_attention_registered",
    "is_lora_parameter_wrapper",
    "lora_dropout_of",
    "lora_linear_factors",
    "dora_adapters",
    "forward_pre_hooks_restored",
    "mask_function_of",
    "model_conversions",
    "model_names_of_checkpoint_keys",
    "pad_token_tensor",
    "peft_buffer_dict",
    "quantizer_of",
    "quiet_weight_progress",
    "register_lora_layer",
    "register_quantization_format",
    "registered_quantization_config",
    "replace_tuner_module",
    "set_attention_implementation",
    "set_hub_name",
    "set_model_conversions",
    "sliding_window_cache_layer",
    "running_forward",
    "forward_replaced",
    "apply_expert_gate",
    "block_unpacks_mlp_output",
    "merged_checkpoint_key",
    "streamer_of_calling_generate",
    "third_party_warnings_silenced",
    "tied_weight_keys",
    "with_cache_field",
]


# ----------------------------------------------------------------------------------------------------
# Versions
# ----------------------------------------------------------------------------------------------------

MINIMUM_VERSIONS: dict[str, str] = {
    "transformers": "5.23.0",
    "peft": "0.21.2",
    "accelerate": "1.15.0",
}
"""The oldest release of each library the whole test suite was run with (also ``pyproject.toml``'s lower bounds)."""

_INSTALL_HINT = 'pip install -U "{name}>={minimum}"  (or, in a clone of hf_compress: pip install -c constraints.txt -e .)'


class VersionTooOldError(ImportError):
    """An installed dependency is older than the oldest release hf_compress was tested with."""


def _release(version: str) -> tuple[int, ...]:
    # Only the numeric release part: "5.24.0.dev0" → (5, 24, 0). Pre-releases count as their release.
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check_minimum_versions(minimum: dict[str, str] | None = None) -> None:
    """Raise one clear :class:`VersionTooOldError` if an installed library is older than the tested minimum.

    Reads package metadata only (no import), so ``import hf_compress`` stays cheap. A library that is not
    installed at all is left to the normal ``ImportError`` of its first use.

    Example:
        >>> check_minimum_versions({"pip": "0.1"})
    """
    too_old = []
    for name, required in (minimum or MINIMUM_VERSIONS).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if _release(installed) < _release(required):
            too_old.append((name, installed, required))
    if too_old:
        lines = [f"{name} {installed} is installed, hf_compress needs {name}>={required}" for name, installed, required in too_old]
        hint = _INSTALL_HINT.format(name=too_old[0][0], minimum=too_old[0][2]) if len(too_old) == 1 else (
            "pip install -U " + " ".join(f'"{n}>={r}"' for n, _, r in too_old)
        )
        raise VersionTooOldError("; ".join(lines) + f". Upgrade with: {hint}")


# ----------------------------------------------------------------------------------------------------
# Hub kernels (transformers 5.25 turns them on by default in from_pretrained)
# ----------------------------------------------------------------------------------------------------

LOAD_WITHOUT_HUB_KERNELS: dict[str, Any] = {"use_kernels": False}
"""``from_pretrained`` keywords of the library's own loaders. transformers 5.25 loads with ``use_kernels=True``
unless told otherwise; switching a model between ``train()`` and ``eval()`` then kernelizes it again for its current
device, and on CUDA that fetches kernels from the Hub (``kernels-community/rotary`` for SmolLM2): an offline
``Trainer`` run on a GPU fails there (found on a lent H200, 2026-12-04). The library downloads nothing at run time, and its methods
replace modules whose forward a kernel would swap out. Checked on: transformers 5.23.0 (default off) and 5.25.0."""


# ----------------------------------------------------------------------------------------------------
# generate() and the model's cache keyword (transformers 5.24 renamed `past_key_values` to `cache`)
# ----------------------------------------------------------------------------------------------------

CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values", "cache_params")
"""The names a model kwarg holding the KV cache has had: ``cache`` (transformers ≥ 5.24), ``past_key_values``, and
``cache_params`` (the Mamba family's forwards in 5.23.0; 5.24.0 renamed it ``cache``)."""

BLOCK_CACHE_KWARGS: tuple[str, ...] = (*CACHE_KWARGS, "layer_past")
"""The names a decoder block's cache argument has: those, or ``layer_past`` (GPT-NeoX, GPT-Neo, BigCode in 5.25)."""


def _transformers_uses_cache_kwarg() -> bool:
    from transformers.generation import utils as generation_utils

    return "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ())


def cache_kwarg_name(model: PreTrainedModel) -> str:
    """The keyword under which ``model.forward`` takes its KV cache: ``"cache"`` (5.24+), ``"past_key_values"`` or
    ``"cache_params"`` (Mamba's family in 5.23).

    Read from the forward signature, so remote-code models that still take ``past_key_values`` under a newer
    transformers work too; a forward with neither (``**kwargs`` only) gets the installed transformers' name.
    Checked on transformers 5.23.0 (``past_key_values``) and 5.24.0 (``cache``; the old name is deprecated).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> cache_kwarg_name(tiny_model("llama")[0]) in CACHE_KWARGS
        True
    """
    parameters = inspect.signature(model.forward).parameters
    for name in CACHE_KWARGS:
        if name in parameters:
            return name
    return "cache" if _transformers_uses_cache_kwarg() else "past_key_values"


def cache_from_model_kwargs(model_kwargs: dict[str, Any]) -> Any:
    """The cache that ``generate()`` handed a ``custom_generate`` callable, under either name (or ``None``)."""
    for name in CACHE_KWARGS:
        if model_kwargs.get(name) is not None:
            return model_kwargs[name]
    return None


def cache_of_output(output: Any) -> Any:
    """The cache a model forward returned: ``output.cache`` (5.24+) or ``output.past_key_values``, without
    touching the deprecated alias (which warns on 5.24)."""
    fields = output.keys() if hasattr(output, "keys") else ()
    for name in CACHE_KWARGS:
        if name in fields:
            return output[name]
    return None


def with_cache_field(output_cls: type, cache: Any) -> dict[str, Any]:
    """``{field: cache}`` for a ``GenerateDecoderOnlyOutput``-like dataclass, under the field name it has."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(output_cls)}
    for name in CACHE_KWARGS:
        if name in names:
            return {name: cache}
    raise TypeError(f"{output_cls.__name__} has no cache field ({' or '.join(CACHE_KWARGS)}).")


def cache_mask_sizes(cache: Any, query_length: int, layer_idx: int) -> tuple[int, int]:
    """``(kv_length, kv_offset)`` of the keys layer ``layer_idx`` attends to once ``query_length`` tokens are added.

    Used by the token router (``routing/layer.py``) to build its own masks: key column j is cache position
    ``kv_offset + j``. ``Cache.get_mask_sizes`` has changed its first argument across releases (a
    ``cache_position`` tensor in 4.x, ``query_length`` here); checked on transformers 5.24.0 and 5.25.0
    (dynamic full and sliding-window layers; tests/test_routing.py decodes against a masked reference).
    """
    return cache.get_mask_sizes(query_length, layer_idx)


def cache_layer_types(text_config: PretrainedConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """``(layer_types, per-layer kwargs)`` with which ``DynamicCache(config=...)`` builds its layers (``"full_attention"``,
    ``"sliding_attention"``, recurrent kinds; a sliding layer's kwargs carry its window).

    ``transformers.cache_utils.get_layer_types_and_kwargs`` is not exported from ``transformers``; checked on
    transformers 5.23.0, 5.24.0 and 5.25.0.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(text_config)


def sliding_window_cache_layer(**kwargs: Any) -> Any:
    """transformers' ``DynamicSlidingWindowLayer(**kwargs)``, the layer ``DynamicCache`` builds for a sliding-window
    attention layer (not exported from ``transformers``; checked on 5.23.0–5.25.0)."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    return DynamicSlidingWindowLayer(**kwargs)


def auto_model_types() -> dict[str, frozenset[str]]:
    """The ``model_type`` names transformers' Auto classes map, by head: ``"base"`` (``AutoModel``),
    ``"causal_lm"``, ``"image_text_to_text"`` and ``"masked_lm"``.

    Read from ``transformers.models.auto.modeling_auto``'s ``MODEL_*_MAPPING_NAMES`` tables, which the package does
    not export; checked on transformers 5.23.0–5.25.0.

    Example:
        >>> "llama" in auto_model_types()["causal_lm"]
        True
    """
    from transformers.models.auto import modeling_auto

    return {
        "base": frozenset(modeling_auto.MODEL_MAPPING_NAMES),
        "causal_lm": frozenset(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        "image_text_to_text": frozenset(modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES),
        "masked_lm": frozenset(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    }


RECURRENT_ROLLBACK_RELEASE = "5.25.0"
"""The first transformers whose recurrent cache layers (Mamba, linear attention, short convolutions) can be cropped
back: ``activate_past_recording(recurrent_states_to_keep=n)`` records their states of the last ``n`` tokens. 5.23 and
5.24 take no argument there, and such a layer with a recurrent state reports ``is_croppable`` False."""


def records_recurrent_states(layers: Any) -> bool:
    """Whether every one of these cache layers takes ``activate_past_recording(recurrent_states_to_keep=...)``.

    Read from the layers' own signatures (a named parameter or ``**kwargs``). Checked on transformers 5.23.0 and
    5.24.0 (no argument: False) and 5.25.0 (True).
    """
    for layer in layers:
        method = getattr(layer, "activate_past_recording", None)
        if method is None:  # nothing to record (Cache.activate_past_recording skips such layers too)
            continue
        parameters = inspect.signature(method).parameters.values()
        if not any(p.name == "recurrent_states_to_keep" or p.kind is p.VAR_KEYWORD for p in parameters):
            return False
    return True


def cache_layer_is_croppable(layer: Any) -> bool:
    """Whether ``crop()`` can put a cache layer back as it was (the layer's own ``is_croppable``).

    transformers 5.24 marks quantized layers (``BaseQuantizedLayer``) as not croppable; 5.23 lets them inherit
    ``DynamicLayer``'s True, though their crop fails on the compressed states. Checked on 5.23.0, 5.24.0 and 5.25.0.
    """
    if getattr(layer, "is_croppable", True) is False:
        return False
    from transformers import cache_utils

    quantized = getattr(cache_utils, "BaseQuantizedLayer", None)
    return quantized is None or not isinstance(layer, quantized)


def activate_past_recording(cache: Any, recurrent_states_to_keep: int | None = None) -> None:
    """Have ``cache`` keep what cropping it back needs: sliding-window layers their full states and, given
    ``recurrent_states_to_keep``, recurrent layers their states of that many last tokens.

    The argument exists from transformers 5.25 on (:data:`RECURRENT_ROLLBACK_RELEASE`); it is passed only when given,
    so a cache without recurrent layers records the same way on every supported release. Callers check the
    recurrent layers with :func:`records_recurrent_states` first.
    """
    if recurrent_states_to_keep is None:
        cache.activate_past_recording()
    else:
        cache.activate_past_recording(recurrent_states_to_keep=recurrent_states_to_keep)


def streamer_of_calling_generate() -> Any:
    """The ``streamer`` given to the ``generate()`` that called the current ``custom_generate`` callable.

    transformers puts the prompt into the streamer but does not forward it to ``custom_generate`` callables
    (``streamer`` is one of ``_sample``'s own parameters, so ``_extract_generation_mode_kwargs`` drops it),
    so it is read from the nearest calling frame whose function is ``generate``. Checked on 5.23.0, 5.24.0
    and 5.25.0 (``tests/test_speculative.py`` streams through a strategy).
    """
    return argument_of_calling_generate("streamer")


def argument_of_calling_generate(name: str) -> Any:
    """The argument ``name`` (``streamer``, ``assistant_model``, ``synced_gpus``, ...) of the ``generate()`` that
    called the current ``custom_generate`` callable, or ``None``. A saved folder's ``generate.py`` reads
    ``custom_generate`` itself this way, to find the repo or folder it was loaded from.

    transformers passes a ``custom_generate`` callable only the keyword arguments its signature adds to
    ``_sample``'s, so ``generate``'s own parameters are read from the nearest calling frame named ``generate``.
    """
    frame = inspect.currentframe()
    try:
        caller = frame.f_back if frame is not None else None
        for _ in range(10):  # the strategy's __call__, then generate() (maybe under a decorator's wrapper)
            if caller is None:
                return None
            if caller.f_code.co_name == "generate" and name in caller.f_locals:
                return caller.f_locals[name]
            caller = caller.f_back
        return None
    finally:
        del frame


def generate_syncs_gpus(model: Any) -> bool:
    """Whether the calling ``generate()`` synchronises GPUs: ``synced_gpus`` as given, or, left unset, on for a model
    sharded by DeepSpeed ZeRO-3 or FSDP over several processes. transformers decides it but passes it to a
    ``custom_generate`` callable in neither case, which must then not decode on its own (the ranks would hang).
    """
    given = argument_of_calling_generate("synced_gpus")
    if given is not None:
        return bool(given)
    import torch
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.integrations.fsdp import is_fsdp_managed_module

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() < 2:
        return False
    return bool(is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model))


def pad_token_tensor(generation_config: Any) -> torch.Tensor | None:
    """The pad token as a tensor, as ``generate()`` prepared it on the config (``_pad_token_tensor``)."""
    return getattr(generation_config, "_pad_token_tensor", None)


# ----------------------------------------------------------------------------------------------------
# Progress bars of transformers' own weight loading and saving
# ----------------------------------------------------------------------------------------------------

QUIET_PROGRESS_BARS: tuple[str, ...] = ("Loading weights", "Writing model shards")
"""``desc`` of the tqdm bars ``from_pretrained`` / ``save_pretrained`` draw per call (transformers 5.x)."""


@contextlib.contextmanager
def quiet_weight_progress() -> Iterator[None]:
    """Inside, ``from_pretrained`` and ``save_pretrained`` draw no "Loading weights" / "Writing model shards" bars.

    For hf_compress's own loads and saves (a reference model from its cache, a reload after saving, a
    checkpoint written by a pruner): a second of bookkeeping, not work a user waits for. Download and upload
    bars, and every other bar, are left alone. transformers' switch (``disable_progress_bar``) is global and
    also silences huggingface_hub; this uses ``transformers.utils.logging.set_tqdm_hook`` (which returns the
    previous hook, restored on exit) and only for the bars named in :data:`QUIET_PROGRESS_BARS`. Not
    thread-safe (the hook is process-wide). Checked on transformers 5.23.0, 5.24.0 and 5.25.0.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> with quiet_weight_progress():
        ...     model, _ = tiny_model("llama")
    """
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    empty = getattr(hf_logging, "EmptyTqdm", None)
    if set_hook is None or empty is None:  # an older or newer transformers without the hook: bars stay
        yield
        return
    previous = None

    def hook(factory: Any, args: tuple, kwargs: dict) -> Any:
        if kwargs.get("desc") in QUIET_PROGRESS_BARS:
            return empty(*args, **kwargs)
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


# ----------------------------------------------------------------------------------------------------
# Attention implementations (query capture for SparK)
# ----------------------------------------------------------------------------------------------------


def is_attention_registered(name: str) -> bool:
    """Whether ``name`` is a registered attention implementation (built-in or registered at run time)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    valid = getattr(ALL_ATTENTION_FUNCTIONS, "valid_keys", None)
    if valid is not None:  # public since transformers 5.x
        return name in valid()
    return name in ALL_ATTENTION_FUNCTIONS._global_mapping


def mask_function_of(name: str) -> Any:
    """The attention-mask builder registered for implementation ``name`` (``None`` when it has none)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name)


def attention_implementation(config: PretrainedConfig) -> str | dict | None:
    """The attention implementation a model config carries (``config._attn_implementation``)."""
    return config._attn_implementation


def set_attention_implementation(config: PretrainedConfig, name: str) -> None:
    """Switch the attention implementation on the config object the attention modules read.

    ``model.set_attn_implementation`` would need the model; the caches are built from ``model.config``
    alone, and the modules read ``self.config._attn_implementation`` at every forward, so the config's
    setter is enough. Checked on transformers 5.23.0, 5.24.0 and 5.25.0.
    """
    config._attn_implementation = name


def eager_attention_forward(module: torch.nn.Module | None = None) -> Any:
    """The eager attention function ``module``'s ``forward`` calls for ``attn_implementation="eager"``.

    transformers has no "eager" entry in ``ALL_ATTENTION_FUNCTIONS``: every modeling file defines its own
    ``eager_attention_forward`` (GPT-2's without grouped-query heads, Gemma 2's with a logit softcap, ...) and
    its attention classes call it by name. It is looked up in the globals of the module's (undecorated)
    ``forward``; without a module, or where none is found, Llama's reference implementation is returned.
    """
    if module is not None:
        forward = inspect.unwrap(type(module).forward)
        own = getattr(forward, "__globals__", {}).get("eager_attention_forward")
        if callable(own):
            return own
    from transformers.models.llama.modeling_llama import eager_attention_forward as eager

    return eager


# ----------------------------------------------------------------------------------------------------
# Quantizers / checkpoint formats
# ----------------------------------------------------------------------------------------------------


def register_quantization_format(name: str, config_cls: type, quantizer_cls: type, replace: bool = True) -> None:
    """Register ``config_cls`` / ``quantizer_cls`` with transformers under ``quant_method`` ``name``.

    transformers' ``register_quantization_config`` / ``register_quantizer`` refuse a name that is taken; our
    own earlier entry (a lazy placeholder, or a class before a module reload) is replaced by dropping it
    from ``AUTO_QUANTIZATION_CONFIG_MAPPING`` / ``AUTO_QUANTIZER_MAPPING`` first. An entry of another
    library under the same name raises. Checked on transformers 5.23.0, 5.24.0 and 5.25.0.
    """
    auto = _quantizer_registry()
    for mapping, cls in ((auto.AUTO_QUANTIZATION_CONFIG_MAPPING, config_cls), (auto.AUTO_QUANTIZER_MAPPING, quantizer_cls)):
        existing = mapping.get(name)
        if existing is not None and existing is not cls:
            ours = getattr(existing, "hf_compress_format", None) == name or (
                (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
            )
            if not ours or not replace:
                raise ValueError(
                    f"quant_method {name!r} is already registered with transformers by "
                    f"{existing.__module__}.{existing.__qualname__}."
                )
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(name, None)
    auto.AUTO_QUANTIZER_MAPPING.pop(name, None)
    auto.register_quantization_config(name)(config_cls)
    auto.register_quantizer(name)(quantizer_cls)


def _quantizer_registry():
    # importlib, not `from transformers.quantizers import auto`: this also runs while `transformers.quantizers`
    # is still initialising (hf_compress.formats registers right after `auto` itself finished loading).
    return importlib.import_module("transformers.quantizers.auto")


def registered_quantization_config(name: str) -> type | None:
    """The config class transformers has under ``quant_method`` ``name``, if any."""
    return _quantizer_registry().AUTO_QUANTIZATION_CONFIG_MAPPING.get(name)


def model_conversions(model: PreTrainedModel) -> list:
    """The checkpoint conversions transformers applies to ``model`` on load and reverts on save.

    The ones used at load are kept in ``model._weight_conversions``; a model built in memory has none
    there, and gets the architecture's mapping (``get_model_conversion_mapping``). Checked on 5.23.0, 5.24.0
    and 5.25.0.
    """
    used = getattr(model, "_weight_conversions", None)
    if used is not None:
        return list(used)
    from transformers.conversion_mapping import get_model_conversion_mapping

    return list(get_model_conversion_mapping(model, add_legacy=False))


def checkpoint_keys_of(model: PreTrainedModel, names: list[str]) -> dict[str, str]:
    """Model tensor name -> the key ``save_pretrained`` writes it under (the architecture's renamings reverted), for
    tensors written outside ``save_pretrained`` that no converter transforms (the sparse format's encoded weights,
    written shard by shard). Uses ``transformers.core_model_loading.revert_weight_conversion``, save_pretrained's own
    step, on empty placeholders. Checked on 5.25.0, and that 5.23.0's save_pretrained calls the same function.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> checkpoint_keys_of(tiny_model("llama")[0], ["model.layers.0.mlp.up_proj.weight_bitmask"])
        {'model.layers.0.mlp.up_proj.weight_bitmask': 'model.layers.0.mlp.up_proj.weight_bitmask'}
    """
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    placeholders = {name: torch.empty(0, device="cpu") for name in names}
    name_of = {id(tensor): name for name, tensor in placeholders.items()}
    reverted = revert_weight_conversion(model, dict(placeholders))
    keys = {name_of.get(id(tensor)): key for key, tensor in reverted.items()}
    if len(reverted) != len(names) or set(keys) != set(names):  # a converter merged or split one: not a renaming
        raise ValueError("save_pretrained transforms some of these tensors with an operation, not a renaming; they "
                         f"cannot be written apart from it: {sorted(set(names) - set(keys))[:3]}")
    return keys


def model_names_of_checkpoint_keys(model: PreTrainedModel, keys: Iterator[str] | list[str]) -> dict[str, str]:
    """Model tensor name → checkpoint key, for the keys ``from_pretrained`` renames as it loads them (a multimodal
    model saves ``language_model.model.*`` for its ``model.language_model.*``).

    Only the architecture's renamings apply (legacy ones included, as loading accepts them); converters that merge
    or split tensors map no single key to a single name. Checked on 5.23.0, 5.24.0 and 5.25.0.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
    names: dict[str, str] = {}
    for key in keys:
        name = key
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        names.setdefault(name, key)
    return names


def merged_checkpoint_key(model: PreTrainedModel, name: str) -> str | None:
    """The checkpoint key pattern (``*`` for an expert index) of one of the tensors the model's conversions merge into
    tensor ``name`` when it loads (MoE experts saved one per expert, fused on load), or ``None`` when no converter
    makes ``name``. Checked on 5.23.0, 5.24.0 and 5.25.0.
    """
    from transformers.core_model_loading import WeightConverter

    for converter in model_conversions(model):
        if not isinstance(converter, WeightConverter):
            continue
        try:
            reverse = converter.reverse_transform()  # the direction save_pretrained takes: model name -> stored keys
        except (ValueError, NotImplementedError):
            continue
        key, matched = reverse.rename_source_key(name)
        if matched is not None:
            return key
    return None


def apply_expert_gate(experts: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """An experts module's gating of its ``gate_up_proj`` output (``act(gate) * up``, or the model's own: gpt-oss
    interleaves and clamps), as transformers' experts implementations apply it (``_apply_gate``, which
    ``use_experts_implementation`` gives every experts class). Checked on 5.23.0, 5.24.0 and 5.25.0.
    """
    return experts._apply_gate(gate_up)


_UNPACKED_MLP_CALL = re.compile(r"^\s*\w+\s*,\s*\w+\s*=\s*self\.mlp\(", re.MULTILINE)


def block_unpacks_mlp_output(block: nn.Module) -> bool:
    """Whether a decoder layer's forward unpacks two values from its ``mlp`` (gpt-oss: ``hidden_states, _ =
    self.mlp(hidden_states)``, the router scores second), read from the source of the layer's ``forward``: a module
    standing in for a removed MLP must return as many. Checked on 5.23.0, 5.24.0 and 5.25.0 (gpt-oss, Zaya).
    """
    try:
        source = inspect.getsource(inspect.unwrap(type(block).forward))
    except (OSError, TypeError):  # no source (built dynamically): the usual single tensor
        return False
    return _UNPACKED_MLP_CALL.search(source) is not None


def set_model_conversions(model: PreTrainedModel, conversions: list) -> None:
    """Replace the conversions ``save_pretrained`` reverts (only if the model records any)."""
    if getattr(model, "_weight_conversions", None) is not None:
        model._weight_conversions = list(conversions)


def quantizer_of(model: nn.Module) -> Any:
    """The ``HfQuantizer`` attached to a loaded model (``model.hf_quantizer``), or ``None``."""
    return getattr(model, "hf_quantizer", None)


def attach_quantizer(model: PreTrainedModel, quantizer: Any, method: str) -> None:
    """Mark ``model`` as quantized by ``quantizer``, as ``from_pretrained`` does for a quantized checkpoint."""
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = method


def detach_quantizer(model: PreTrainedModel) -> None:
    """Make a loaded model an ordinary one again: no quantizer, not quantized (the config is left alone).

    transformers refuses to save or train a model it believes quantized; these three attributes are what it
    reads (``hf_quantizer``, ``is_quantized``, ``quantization_method``). Checked on 5.23.0, 5.24.0 and 5.25.0.
    """
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None


def checkpoint_files_of_preprocess(kwargs: dict[str, Any]) -> list[str] | None:
    """The checkpoint files ``from_pretrained`` passes to ``HfQuantizer.preprocess_model`` (``None`` when
    loading from a state dict). Checked on 5.23.0, 5.24.0 and 5.25.0 (keyword ``checkpoint_files``)."""
    files = kwargs.get("checkpoint_files")
    return list(files) if files else None


def ignore_unexpected_keys(model: PreTrainedModel, patterns: list[str]) -> None:
    """Let ``from_pretrained`` skip checkpoint keys matching ``patterns`` (regexes) without reporting them.

    transformers reads ``model._keys_to_ignore_on_load_unexpected`` (a set after ``post_init``, a list or
    ``None`` on older classes). Checked on 5.23.0, 5.24.0 and 5.25.0.
    """
    existing = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    model._keys_to_ignore_on_load_unexpected = set(existing) | set(patterns)


def tied_weight_keys(model: nn.Module) -> dict[str, str]:
    """``{tied key: source key}`` of weights transformers ties after loading (e.g. ``lm_head.weight`` to the
    embeddings), which a checkpoint therefore need not store. ``model.all_tied_weights_keys``, set in
    ``post_init``; checked on 5.23.0, 5.24.0 and 5.25.0."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def hub_default_ignore_patterns() -> list[str]:
    """What ``upload_folder`` never uploads (``.git/``, ``.cache/huggingface/``): huggingface_hub's private
    ``utils._paths.DEFAULT_IGNORE_PATTERNS``, checked on huggingface_hub 2.4."""
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    return list(DEFAULT_IGNORE_PATTERNS)


def set_hub_name(config: PretrainedConfig, name: str) -> None:
    """Record the Hub id a model came from (``config._name_or_path``, what ``model.name_or_path`` returns)."""
    config._name_or_path = name


# ----------------------------------------------------------------------------------------------------
# peft
# ----------------------------------------------------------------------------------------------------


def extend_peft_type(name: str) -> Any:
    """Return ``PeftType[name]``, adding the member (value ``name``) if peft does not define it (idempotent).

    ``peft.utils.register_peft_method`` only accepts names that are members of the closed ``PeftType``
    enum, which has no public way to grow. The member is added the way ``enum`` itself stores members, so
    ``PeftType.DLQAT``, ``PeftType("DLQAT")``, iteration, pickling and ``== "DLQAT"`` all behave as for a
    built-in member. Checked on peft 0.21.2.
    """
    from peft.utils import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # EnumType.__setattr__ refuses to rebind members; this name is new, so set it on the class directly.
    type.__setattr__(PeftType, name, member)
    return member


_LORA_LAYERS: dict[type, Callable[..., nn.Module]] = {}
"""Layer types peft's LoRA does not know, and the factory that wraps each (``register_lora_layer``)."""
_LORA_CONFIG_CHECKS: dict[type, Callable[[Any], None]] = {}


def register_lora_layer(base_cls: type, factory: Callable[..., nn.Module],
                        check_config: Callable[..., None] | None = None) -> None:
    """Let peft's LoRA adapt layers of type ``base_cls`` with ``factory(target, adapter_name, config=..., **kwargs)``.

    This holds in ``get_peft_model``, ``PeftModel.from_pretrained`` and ``load_adapter`` alike, and
    ``target_modules="all-linear"`` counts these layers as linear. ``check_config(lora_config, saved=names)`` raises
    for a config such layers cannot take; it runs before peft changes any layer, when the config targets one of them
    (``target_modules``, peft's default targets for the model type included) or names one in ``modules_to_save``
    (``names``: those layers, which peft would wrap in a trainable copy). peft's own
    route, ``LoraConfig._register_custom_module``, is kept on one config object: a config read back from a saved
    ``adapter_config.json`` lacks it, so a saved adapter would not load again. Here peft's new-adapter check
    (``LoraModel._check_new_adapter_config``), layer dispatch (``LoraModel._create_new_module``) and all-linear
    expansion (``tuners_utils._maybe_include_all_linear_layers``) are wrapped once, trying the registered types
    first; every other layer takes peft's own path unchanged. Checked on peft 0.21.2 and 0.22.0.
    """
    from peft.tuners import tuners_utils
    from peft.tuners.lora import model as lora_model

    _LORA_LAYERS[base_cls] = factory
    if check_config is not None:
        _LORA_CONFIG_CHECKS[base_cls] = check_config
    check_new = lora_model.LoraModel._check_new_adapter_config
    if not getattr(check_new, "_hf_compress_wraps", None):
        def _check_new_adapter_config(self: Any, config: Any) -> None:
            check_new(self, config)
            targeting = _with_default_targets(self, config)
            for layer_cls, check in _LORA_CONFIG_CHECKS.items():
                names = [name for name, _ in _layers_of_type(self.model, layer_cls)]
                saved = [name for name in names if _lora_would_save(config, name)]
                if saved or any(_lora_would_target(self, targeting, name) for name in names):
                    check(config, saved=saved)

        _check_new_adapter_config._hf_compress_wraps = check_new
        lora_model.LoraModel._check_new_adapter_config = _check_new_adapter_config
    create = lora_model.LoraModel.__dict__["_create_new_module"].__func__
    if not getattr(create, "_hf_compress_wraps", None):
        def _create_new_module(lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
            base = target.get_base_layer() if isinstance(target, tuners_utils.BaseTunerLayer) else target
            for layer_cls, make in _LORA_LAYERS.items():
                if isinstance(base, layer_cls):
                    return make(target, adapter_name, config=lora_config, **kwargs)
            return create(lora_config, adapter_name, target, **kwargs)

        _create_new_module._hf_compress_wraps = create
        lora_model.LoraModel._create_new_module = staticmethod(_create_new_module)
    include = tuners_utils._maybe_include_all_linear_layers
    if not getattr(include, "_hf_compress_wraps", None):
        def _maybe_include_all_linear_layers(peft_config: Any, model: nn.Module) -> Any:
            targets = getattr(peft_config, "target_modules", None)
            all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
            peft_config = include(peft_config, model)
            if all_linear and getattr(peft_config, "peft_type", None) == "LORA":  # PeftType is a str enum
                peft_config.target_modules = set(peft_config.target_modules) | _registered_lora_targets(model)
            return peft_config

        _maybe_include_all_linear_layers._hf_compress_wraps = include
        tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers


def _registered_lora_targets(model: nn.Module) -> set[str]:
    """Names of ``model``'s layers of a registered type, as peft's all-linear rule picks ``nn.Linear``: not the output
    embeddings."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, layer in _layers_of_type(model, tuple(_LORA_LAYERS)) if layer is not output}


def _layers_of_type(model: nn.Module, layer_types: type | tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of ``model``'s layers of ``layer_types``, an adapted one under its adapter layer's name (what
    a config's ``target_modules`` matches), not the ``base_layer`` inside it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, layer_types) and not name.endswith(".base_layer"):
            yield name, base


def _with_default_targets(tuner: Any, config: Any) -> Any:
    """``config`` with peft's default ``target_modules`` for the model type filled in (a copy), as peft fills them in
    only after the new-adapter check; ``config`` itself where it names its targets or peft knows no default."""
    if getattr(config, "target_modules", None) is not None:
        return config
    # _prepare_adapter_config: the hook every peft tuner implements (DL-QAT too); check_assumptions checks its signature.
    try:
        return tuner._prepare_adapter_config(copy.copy(config), tuner.get_model_config(tuner.model))
    except ValueError:  # no default for this model type: peft refuses the config itself right after this check
        return config


def _lora_would_target(tuner: Any, config: Any, name: str) -> bool:
    targets = getattr(config, "target_modules", None)
    if targets is None:  # target_parameters only: no layer is wrapped
        return False
    if isinstance(targets, str) and targets.lower() == "all-linear":  # not expanded yet: every registered layer
        return True
    return bool(tuner._check_target_module_exists(config, name))  # an excluded module is falsy


def _lora_would_save(config: Any, name: str) -> bool:
    """Whether peft would wrap layer ``name`` in a trainable copy for ``config.modules_to_save``: the name or its
    last dotted parts (peft 0.22's rule; 0.21 matched any suffix, so "proj" also took "q_proj" there)."""
    return any(name == saved or name.endswith("." + saved) for saved in getattr(config, "modules_to_save", None) or ())


_WEIGHT_COUNTERS: list[Callable[[nn.Module], int]] = []
"""Counts of the weights a layer holds outside its parameters (``register_weight_counter``)."""


def register_weight_counter(count: Callable[[nn.Module], int]) -> None:
    """Count, in ``num_parameters()`` and peft's ``get_nb_trainable_parameters()`` / ``print_trainable_parameters()``,
    the weights ``count(layer)`` says a layer holds outside its parameters (packed codes are buffers), as frozen.

    Both count parameters only, so a packed model looked three times smaller than it is and its adapters' trainable
    share three times larger; both count bitsandbytes' 4-bit weights in full (by their class). The two methods are
    wrapped once; models without such layers count as before. Checked on transformers 5.23–5.25, peft 0.21.2 / 0.22.0.
    """
    from peft import PeftModel
    from transformers import PreTrainedModel

    _WEIGHT_COUNTERS.append(count)
    num_parameters = PreTrainedModel.num_parameters
    if not getattr(num_parameters, "_hf_compress_wraps", None):
        @functools.wraps(num_parameters)
        def _num_parameters(self: Any, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
            total = num_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
            return total if only_trainable else total + _weights_outside_parameters(self)

        _num_parameters._hf_compress_wraps = num_parameters
        PreTrainedModel.num_parameters = _num_parameters
    nb_trainable = PeftModel.get_nb_trainable_parameters
    if not getattr(nb_trainable, "_hf_compress_wraps", None):
        @functools.wraps(nb_trainable)
        def _get_nb_trainable_parameters(self: Any) -> tuple[int, int]:
            trainable, total = nb_trainable(self)
            return trainable, total + _weights_outside_parameters(self)

        _get_nb_trainable_parameters._hf_compress_wraps = nb_trainable
        PeftModel.get_nb_trainable_parameters = _get_nb_trainable_parameters


def _weights_outside_parameters(model: nn.Module) -> int:
    return sum(count(module) for module in model.modules() for count in _WEIGHT_COUNTERS)


def peft_buffer_dict() -> type:
    """peft's ``BufferDict`` (a ``ModuleDict`` of buffers, what LoRA-like layers keep per adapter)."""
    from peft.tuners._buffer_dict import BufferDict

    return BufferDict


def has_peft_adapters(model: nn.Module) -> bool:
    """Whether transformers' own PEFT integration has adapters loaded into ``model`` (``load_adapter``)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def replace_tuner_module(tuner: Any, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
    """Put ``new_module`` in place of ``child`` (``parent.<child_name>``) as peft's own tuners do in
    ``_create_and_replace``: ``BaseTuner._replace_module`` moves it to the child's device and keeps the base layer's
    state. Checked on peft 0.21.2 and 0.22.0."""
    tuner._replace_module(parent, child_name, new_module, child)


def lora_dropout_of(module: nn.Module, adapter_name: str) -> nn.Module:
    """The dropout a peft LoRA layer applies to its input for ``adapter_name`` (``lora_dropout[adapter_name]``;
    ``nn.Identity`` at ``lora_dropout=0``). Checked on peft 0.21.2 and 0.22.0."""
    return module.lora_dropout[adapter_name]


def is_lora_parameter_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is peft's ``ParamWrapper``: LoRA on a bare parameter (a fused 3-D experts weight), which
    adapts the weight itself, not a layer's output. Checked on peft 0.21.2 and 0.22.0."""
    from peft.tuners import lora

    wrapper = getattr(lora, "ParamWrapper", None)
    return wrapper is not None and isinstance(module, wrapper)


def lora_linear_factors(module: nn.Module, adapter_names: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """``(A, B, ranks)`` of a peft LoRA linear layer's adapters stacked in ``adapter_names`` order: ``A`` is
    ``[sum(ranks), in]`` (every adapter's ``lora_A`` weight), ``B`` is ``[out, sum(ranks)]`` (every ``lora_B``
    weight times its scaling), so ``x @ A.T @ B.T`` is the sum of the adapters' updates.

    An adapter the layer does not hold (adapters may target different modules) gets rank 0: rows routed to it
    see the base layer there, as on peft's per-row path. ``None`` when ``module`` is not a plain LoRA ``Linear``
    (a LoRA variant such as DoRA, an embedding or convolution layer): the caller then keeps peft's own forward.
    Reads the layer's ``lora_A`` / ``lora_B`` / ``scaling`` / ``lora_variant`` attributes; checked on peft 0.21.2.
    """
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or any(name in getattr(module, "lora_variant", {}) for name in adapter_names):
        return None
    import torch

    held = [name for name in adapter_names if name in module.lora_A]
    if any(module.lora_B[name].bias is not None for name in held):  # lora_bias=True: an update B·A·x cannot hold it
        return None
    ranks = [module.lora_A[name].weight.shape[0] if name in held else 0 for name in adapter_names]
    if not held:  # none of these adapters here: rank 0 everywhere, the layer needs no update
        device = module.get_base_layer().weight.device
        return torch.zeros(0, module.in_features, device=device), torch.zeros(module.out_features, 0, device=device), ranks
    a = torch.cat([module.lora_A[name].weight for name in held], dim=0)
    b = torch.cat([module.lora_B[name].weight * module.scaling[name] for name in held], dim=1)
    return a, b, ranks


def dora_adapters(model: nn.Module, adapter_names: list[str]) -> list[str]:
    """The adapters of ``adapter_names`` that are DoRA in some layer (peft refuses them on its per-row
    ``adapter_names=`` path). Reads LoRA layers' ``use_dora`` mapping; checked on peft 0.21.2."""
    found = {name for module in model.modules() for name, used in (getattr(module, "use_dora", None) or {}).items()
             if used and name in adapter_names}
    return [name for name in adapter_names if name in found]


def auxiliary_adapters(model: nn.Module, adapter_names: list[str]) -> list[str]:
    """The adapters of ``adapter_names`` that a peft training wrapper holds (``modules_to_save``, trainable
    tokens): a whole module or token rows of their own, not a ``B·A·x`` update. Reads
    ``AuxiliaryTrainingWrapper._get_available_adapters()``; checked on peft 0.21.2."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    found = {name for module in model.modules() if isinstance(module, AuxiliaryTrainingWrapper)
             for name in module._get_available_adapters()}
    return [name for name in adapter_names if name in found]


@contextlib.contextmanager
def forward_pre_hooks_restored(model: nn.Module) -> Iterator[None]:
    """Inside, forward pre-hooks may be added to ``model``'s modules; on leaving, even by an error, any hook
    added inside is removed.

    peft 0.21.2 registers ``adapter_names`` pre-hooks for one call and removes them without ``try/finally``:
    an error inside that call leaves them injecting the old adapter names into every later forward.
    """
    before = {id(module): set(module._forward_pre_hooks) for module in model.modules()}
    try:
        yield
    finally:
        for module in model.modules():
            for key in set(module._forward_pre_hooks) - before.get(id(module), set()):
                module._forward_pre_hooks.pop(key)
                module._forward_pre_hooks_with_kwargs.pop(key, None)


THIRD_PARTY_WARNINGS: tuple[tuple[str, type], ...] = (
    # peft 0.21.2's PeftModel.__init__ reads `model.is_gradient_checkpointing`, deprecated in transformers 5.24.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)
"""``(message regex, category)`` of warnings other libraries raise inside calls hf_compress makes, that no argument
of ours avoids; :func:`third_party_warnings_silenced` ignores exactly these (``pyproject.toml`` does so in tests)."""


@contextlib.contextmanager
def third_party_warnings_silenced() -> Iterator[None]:
    """Ignore the warnings of :data:`THIRD_PARTY_WARNINGS` inside (e.g. around ``get_peft_model``); nothing else.

    Example:
        >>> import warnings
        >>> with third_party_warnings_silenced():
        ...     warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning)
    """
    import warnings

    with warnings.catch_warnings():
        for message, category in THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


PEFT_ADAPTER_LOAD_HOOK = "_remap_adapter_state_dict_for_load"
"""``BaseTuner`` classmethod peft calls with an adapter's state dict on load; DL-QAT overrides it to check
the weights' fingerprints. Checked on peft 0.21.2."""


def accept_in_text_generation_pipeline(class_name: str) -> None:
    """Let ``transformers.pipeline("text-generation", model=...)`` take a model whose class is ``class_name``
    without logging "The model '<class_name>' is not supported for text-generation" (idempotent).

    ``Pipeline.check_model_type`` compares the model's class name with the task's causal-LM classes plus the
    PEFT wrappers listed for the task in ``transformers.pipelines.base.SUPPORTED_PEFT_TASKS`` (how
    ``PeftModelForCausalLM`` passes); the name is added to that list, which nothing else reads. The pipeline
    itself is unchanged: it still calls the model's own ``generate``. Checked on transformers 5.25.0.
    """
    from transformers.pipelines import base

    supported = getattr(base, "SUPPORTED_PEFT_TASKS", None)
    if not isinstance(supported, dict):  # a release without the list: the pipeline only logs its error line
        return
    names = supported.setdefault("text-generation", [])
    if class_name not in names:
        names.append(class_name)


# ----------------------------------------------------------------------------------------------------
# accelerate
# ----------------------------------------------------------------------------------------------------


def accelerate_hook(module: nn.Module) -> Any:
    """The accelerate hook attached to ``module`` (``module._hf_hook``), or ``None``.

    Offloaded modules carry an ``AlignDevicesHook`` whose ``pre_forward``/``post_forward`` load and offload
    the weights and whose ``weights_map`` holds the stored copies; hf_compress calls those to edit weights
    in place (``modeling.layers.onloaded``). Checked on accelerate 1.15.0.
    """
    return getattr(module, "_hf_hook", None)


def accelerate_repoint_forward(module: nn.Module, current: Any, new: Any) -> None:
    """Make an accelerate-hooked ``module`` run ``new`` (a function taking the module first) where it ran ``current``.

    ``add_hook_to_module`` saves the module's bound forward as ``module._old_forward`` and calls that one, so a later
    change of the module's class (the token router's routed blocks) does not reach a hooked module.
    ``remove_hook_from_module`` leaves that saved forward behind as the instance's ``forward``: repointed too, or an
    unhooked block would keep running the forward of a class it no longer has (or never had). Nothing happens when
    neither is ``current`` bound to ``module`` (no hook, or another wrapper). Checked on accelerate 1.16.0.
    """
    for name in ("_old_forward", "forward"):
        saved = module.__dict__.get(name)
        if getattr(saved, "__self__", None) is module and getattr(saved, "__func__", None) is current:
            setattr(module, name, types.MethodType(new, module))


def _forward_slot(module: nn.Module) -> str:
    """The instance attribute holding the forward ``module`` computes with: ``_old_forward`` under an accelerate hook
    (called by the hook's wrapper between loading and offloading the weights), else ``forward``."""
    return "_old_forward" if accelerate_hook(module) is not None and "_old_forward" in module.__dict__ else "forward"


def running_forward(module: nn.Module) -> Any:
    """The bound forward ``module`` computes with now: for an accelerate-hooked module, the one its hook calls between
    loading and offloading the weights (``module._old_forward``); else an instance ``forward`` or the class's."""
    return module.__dict__.get(_forward_slot(module)) or type(module).forward.__get__(module)


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward: Any) -> Iterator[None]:
    """Inside, ``module`` computes ``forward(*args, **kwargs)`` instead; an accelerate-hooked module keeps its hook
    (which loads and offloads the weights around the call): ``_old_forward`` is replaced, not the hook's wrapper.
    Checked on accelerate 1.16.0."""
    name = _forward_slot(module)
    had, previous = name in module.__dict__, module.__dict__.get(name)
    module.__dict__[name] = forward
    try:
        yield
    finally:
        if had:
            module.__dict__[name] = previous
        else:
            module.__dict__.pop(name, None)


# ----------------------------------------------------------------------------------------------------
# Assumptions, checked against the installed versions
# ----------------------------------------------------------------------------------------------------

PRIVATE_NAMES: tuple[str, ...] = (
    "_global_mapping",
    "_attn_implementation",
    "_pad_token_tensor",
    "_weight_conversions",
    "AUTO_QUANTIZER_MAPPING",
    "AUTO_QUANTIZATION_CONFIG_MAPPING",
    "_hf_hook",
    "_old_forward",
    "_buffer_dict",
    "_member_map_",
    "_value2member_map_",
    "_name_or_path",
    "f_back",
    "f_locals",
    "hf_quantizer",
    "_hf_peft_config_loaded",
    "_keys_to_ignore_on_load_unexpected",
    "conversion_mapping",
    "modeling_llama",
    "__globals__",
    "_forward_pre_hooks",
    "_get_available_adapters",
    "SUPPORTED_PEFT_TASKS",
    "_apply_gate",
    "_replace_module",
    "get_layer_types_and_kwargs",
    "DynamicSlidingWindowLayer",
    "MODEL_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "ParamWrapper",
    "_create_new_module",
    "_maybe_include_all_linear_layers",
    "_check_new_adapter_config",
    "_check_target_module_exists",
)
"""Private or unstable names of other libraries that only this module may use (``tests/test_compat.py``)."""


def check_assumptions() -> list[str]:
    """Re-check every assumption above against the installed libraries; returns what no longer holds.

    An empty list means every private path this module takes still exists with the expected shape.

    Example:
        >>> check_assumptions()
        []
    """
    problems: list[str] = []

    def expect(condition: bool, what: str) -> None:
        if not condition:
            problems.append(what)

    def expect_that(check: Any, what: str) -> None:
        """``expect(check(), what)`` for a probe that raises when what it checks has gone (an attribute, a keyword)."""
        try:
            holds = bool(check())
        except (AttributeError, KeyError, TypeError, ValueError, OSError):
            holds = False
        expect(holds, what)

    def source(obj: Any) -> str:  # "" for what is gone or has no Python source
        try:
            return inspect.getsource(obj) if obj is not None else ""
        except (TypeError, OSError):
            return ""

    def source_of(owner: Any, name: str) -> str:
        member = getattr(owner, name, None)
        return source(getattr(member, "fget", member))  # a property: its getter

    def calls(owner: Any, name: str, caller: Any = None) -> bool:
        """``owner`` still has the hook ``name`` and ``caller`` (``owner``'s own source by default) calls it: an
        override of a renamed or no longer called hook would silently never run."""
        return hasattr(owner, name) and f".{name}(" in source(owner if caller is None else caller)

    try:
        from transformers import DynamicCache, GenerationConfig
        from transformers.generation import GenerateDecoderOnlyOutput
        from transformers.generation.utils import GenerationMixin
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.quantizers import auto
        from transformers.quantizers.base import HfQuantizer

        expect("streamer" in inspect.signature(GenerationMixin._sample).parameters
               and "streamer" in inspect.signature(GenerationMixin.generate).parameters,
               "transformers: generate()/_sample() no longer take `streamer` (streamer_of_calling_generate)")
        expect(GenerationMixin.generate.__name__ == "generate",
               "transformers: generate() is wrapped by a function of another name (streamer_of_calling_generate)")
        expect(isinstance(getattr(ALL_MASK_ATTENTION_FUNCTIONS, "_global_mapping", None), dict),
               "transformers: AttentionMaskInterface has no `_global_mapping` dict (mask_function_of)")
        expect(hasattr(ALL_ATTENTION_FUNCTIONS, "valid_keys") or hasattr(ALL_ATTENTION_FUNCTIONS, "_global_mapping"),
               "transformers: AttentionInterface has neither valid_keys() nor _global_mapping (is_attention_registered)")
        expect(isinstance(getattr(auto, "AUTO_QUANTIZER_MAPPING", None), dict)
               and isinstance(getattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING", None), dict),
               "transformers: quantizers.auto has no AUTO_QUANTIZER_MAPPING / AUTO_QUANTIZATION_CONFIG_MAPPING dicts")
        for hook in ("update_weight_conversions", "postprocess_model"):
            expect(hasattr(HfQuantizer, hook), f"transformers: HfQuantizer has no `{hook}` to override")
        for hook in ("_process_model_before_weight_loading", "_process_model_after_weight_loading",
                     "remove_quantization_config", "_dequantize"):
            expect(calls(HfQuantizer, hook), f"transformers: HfQuantizer no longer has or calls `{hook}` (formats/ "
                   "override it)")
        config = GenerationConfig()
        expect(hasattr(config, "_pad_token_tensor") or "_pad_token_tensor" in inspect.getsource(GenerationMixin),
               "transformers: generate() no longer prepares generation_config._pad_token_tensor (pad_token_tensor)")
        expect(any(name in {f.name for f in __import__("dataclasses").fields(GenerateDecoderOnlyOutput)} for name in CACHE_KWARGS),
               "transformers: GenerateDecoderOnlyOutput has no cache field (with_cache_field)")
        from transformers import PreTrainedModel

        expect("checkpoint_files=checkpoint_files" in inspect.getsource(PreTrainedModel.from_pretrained),
               "transformers: from_pretrained no longer passes checkpoint_files to preprocess_model "
               "(checkpoint_files_of_preprocess)")
        expect("_keys_to_ignore_on_load_unexpected" in inspect.getsource(PreTrainedModel),
               "transformers: PreTrainedModel no longer reads _keys_to_ignore_on_load_unexpected (ignore_unexpected_keys)")
        expect(hasattr(DynamicCache, "crop"), "transformers: DynamicCache has no crop() (speculative rollback)")
        from transformers.utils import logging as hf_logging

        expect(callable(getattr(hf_logging, "set_tqdm_hook", None)) and hasattr(hf_logging, "EmptyTqdm"),
               "transformers: utils.logging has no set_tqdm_hook / EmptyTqdm (quiet_weight_progress)")
        expect(callable(eager_attention_forward()), "transformers: Llama has no eager_attention_forward")
        from transformers.models.llama.modeling_llama import LlamaAttention

        expect(callable(inspect.unwrap(LlamaAttention.forward).__globals__.get("eager_attention_forward")),
               "transformers: attention forwards no longer call their modeling file's eager_attention_forward")
        from transformers.core_model_loading import WeightConverter
        from transformers.integrations import moe

        expect(hasattr(WeightConverter, "reverse_transform") and hasattr(WeightConverter, "rename_source_key"),
               "transformers: WeightConverter has no reverse_transform() / rename_source_key() (merged_checkpoint_key)")
        from transformers import core_model_loading

        expect(callable(getattr(core_model_loading, "revert_weight_conversion", None)),
               "transformers: core_model_loading has no revert_weight_conversion (checkpoint_keys_of)")
        flags = {"has_gate", "has_bias", "is_transposed", "has_post_expert_norm"}
        expect(flags <= set(inspect.signature(moe.use_experts_implementation).parameters)
               and "_apply_gate" in inspect.getsource(moe.use_experts_implementation),
               "transformers: use_experts_implementation no longer sets has_gate/has_bias/is_transposed/"
               "has_post_expert_norm and _apply_gate on experts classes (modeling.fused_experts, apply_expert_gate)")
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        expect(block_unpacks_mlp_output(GptOssDecoderLayer.__new__(GptOssDecoderLayer))
               and not block_unpacks_mlp_output(LlamaDecoderLayer.__new__(LlamaDecoderLayer)),
               "transformers: gpt-oss's decoder layer no longer unpacks (hidden states, router scores) from its MLP, "
               "or Llama's does (block_unpacks_mlp_output)")
        from transformers.conversion_mapping import get_model_conversion_mapping

        expect("add_legacy" in inspect.signature(get_model_conversion_mapping).parameters,
               "transformers: get_model_conversion_mapping() takes no add_legacy (model_conversions)")
        from transformers.pipelines import base as pipelines_base

        expect(isinstance(getattr(pipelines_base, "SUPPORTED_PEFT_TASKS", None), dict)
               and "SUPPORTED_PEFT_TASKS" in inspect.getsource(pipelines_base.Pipeline.check_model_type),
               "transformers: Pipeline.check_model_type no longer reads a SUPPORTED_PEFT_TASKS dict "
               "(accept_in_text_generation_pipeline)")
        from transformers import LlamaConfig, trainer
        from transformers.models.auto.auto_factory import _BaseAutoModelClass

        expect_that(lambda: [len(found) for found in cache_layer_types(LlamaConfig(num_hidden_layers=2))] == [2, 2]
                    and callable(getattr(sliding_window_cache_layer(sliding_window=4), "update", None)),
                   "transformers: cache_utils.get_layer_types_and_kwargs / DynamicSlidingWindowLayer(sliding_window=) "
                   "changed (cache_layer_types, sliding_window_cache_layer)")
        expect_that(lambda: "llama" in auto_model_types()["causal_lm"] and "bert" in auto_model_types()["masked_lm"],
                   "transformers: modeling_auto's MODEL_*_MAPPING_NAMES tables moved (auto_model_types)")
        # Hooks and attributes other modules override, as the libraries' own subclasses do: renamed, an override
        # would silently stop being called.
        expect(calls(PreTrainedModel, "_from_config", _BaseAutoModelClass),
               "transformers: Auto*.from_config no longer calls the model class's _from_config "
               "(utils/model_types.py refuses through it)")
        expect(calls(PreTrainedModel, "_init_weights"),
               "transformers: PreTrainedModel no longer initializes through _init_weights (speculative heads, arbiter)")
        expect("_keys_to_ignore_on_save" in source(trainer),
               "transformers: Trainer no longer reads _keys_to_ignore_on_save (experts/joint.py sets it)")
    except ImportError as error:
        problems.append(f"transformers: {error}")

    try:
        from peft.tuners.tuners_utils import BaseTuner
        from peft.utils import PeftType

        expect(all(hasattr(PeftType, attr) for attr in ("_member_map_", "_value2member_map_", "_member_names_")),
               "peft: PeftType is no longer a plain Enum (extend_peft_type)")
        from peft import PeftModel
        from peft.tuners import lora
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import save_and_load

        expect(calls(BaseTuner, PEFT_ADAPTER_LOAD_HOOK, save_and_load),
               f"peft: BaseTuner no longer has {PEFT_ADAPTER_LOAD_HOOK}, or loading no longer calls it (DL-QAT "
               "overrides it)")
        for hook in ("_prepare_adapter_config", "_create_and_replace", "_pre_injection_hook", "_post_injection_hook"):
            expect(calls(BaseTuner, hook), f"peft: BaseTuner no longer has or calls {hook} (DL-QAT overrides it)")
        expect_that(lambda: list(inspect.signature(BaseTuner._replace_module).parameters)
                    == ["self", "parent", "child_name", "new_module", "child"],
                   "peft: BaseTuner._replace_module(parent, child_name, new_module, child) changed (replace_tuner_module)")
        expect("._enable_peft_forward_hooks(" in source_of(PeftModel, "_enable_peft_forward_hooks"),
               "peft: PeftModel no longer enters its tuner's _enable_peft_forward_hooks (DL-QAT refuses adapter_names "
               "there)")
        expect("self._disable_adapters" in source_of(BaseTunerLayer, "disable_adapters")
               and "self._active_adapter" in source_of(BaseTunerLayer, "active_adapter"),
               "peft: BaseTunerLayer no longer keeps its state in _disable_adapters / _active_adapter (DLQATLayer "
               "sets them, as peft's own layers do)")
        expect(isinstance(getattr(lora, "ParamWrapper", None), type), "peft: lora.ParamWrapper is gone "
               "(is_lora_parameter_wrapper)")
        peft_buffer_dict()
        from peft.tuners import tuners_utils
        from peft.tuners.lora import LoraModel
        from peft.tuners.lora.layer import LoraLayer

        create = LoraModel.__dict__.get("_create_new_module")
        create = getattr(getattr(create, "__func__", None), "_hf_compress_wraps", None) or getattr(create, "__func__", None)
        expect_that(lambda: list(inspect.signature(create).parameters) == ["lora_config", "adapter_name", "target", "kwargs"]
                    and calls(LoraModel, "_create_new_module", LoraModel._create_and_replace),
                    "peft: LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs) changed or is no "
                    "longer called (register_lora_layer)")
        expect(callable(getattr(tuners_utils, "_maybe_include_all_linear_layers", None))
               and "_maybe_include_all_linear_layers(" in source(BaseTuner),
               "peft: BaseTuner no longer expands all-linear through tuners_utils._maybe_include_all_linear_layers "
               "(register_lora_layer)")
        check_new = getattr(LoraModel._check_new_adapter_config, "_hf_compress_wraps", LoraModel._check_new_adapter_config)
        expect_that(lambda: list(inspect.signature(check_new).parameters) == ["self", "config"]
                    and calls(BaseTuner, "_check_new_adapter_config", BaseTuner.inject_adapter)
                    and list(inspect.signature(BaseTuner._check_target_module_exists).parameters)
                    == ["peft_config", "key"],
                    "peft: inject_adapter no longer checks a new adapter through _check_new_adapter_config(config), or "
                    "_check_target_module_exists(peft_config, key) changed (register_lora_layer)")
        expect_that(lambda: list(inspect.signature(BaseTuner._prepare_adapter_config).parameters)
                    == ["self", "peft_config", "model_config"]
                    and list(inspect.signature(BaseTuner.get_model_config).parameters) == ["model"]
                    and source(BaseTuner.inject_adapter).index("._check_new_adapter_config(")
                    < source(BaseTuner.inject_adapter).index("._prepare_adapter_config("),
                    "peft: BaseTuner._prepare_adapter_config(peft_config, model_config) or get_model_config(model) "
                    "changed, or default targets are no longer filled in after the new-adapter check "
                    "(register_lora_layer)")
        from peft import PeftModel
        from transformers import PreTrainedModel

        counting = getattr(PreTrainedModel.num_parameters, "_hf_compress_wraps", PreTrainedModel.num_parameters)
        nb_trainable = getattr(PeftModel.get_nb_trainable_parameters, "_hf_compress_wraps",
                               PeftModel.get_nb_trainable_parameters)
        expect_that(lambda: list(inspect.signature(counting).parameters) == ["self", "only_trainable", "exclude_embeddings"]
                    and list(inspect.signature(nb_trainable).parameters) == ["self"]
                    and calls(PeftModel, "get_nb_trainable_parameters", PeftModel.print_trainable_parameters),
                    "transformers: num_parameters(only_trainable, exclude_embeddings) or peft: "
                    "get_nb_trainable_parameters() / print_trainable_parameters changed (register_weight_counter)")
        expect(calls(LoraLayer, "resolve_lora_variant", LoraLayer.update_layer),
               "peft: LoraLayer.update_layer no longer calls resolve_lora_variant (PackedLoraLinear checks there)")
        import torch

        expect_that(lambda: list(inspect.signature(torch.nn.Module._apply).parameters)[:3] == ["self", "fn", "recurse"]
                    and calls(torch.nn.Module, "_apply"),
                    "torch: nn.Module._apply(fn, recurse) changed or is no longer called (overridden to keep float32 "
                    "state through casts)")
        from peft import LoraConfig, inject_adapter_in_model

        probe = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"]),
                                        torch.nn.Sequential(torch.nn.Linear(4, 3)), adapter_name="probe")
        layer = probe[0]
        factors = lora_linear_factors(layer, ["probe"])
        expect(factors is not None and factors[0].shape == (2, 4) and factors[1].shape == (3, 2)
               and layer.scaling["probe"] == 2 and hasattr(layer, "lora_variant"),
               "peft: a LoRA Linear no longer keeps lora_A / lora_B / scaling / lora_variant per adapter "
               "(lora_linear_factors)")
        expect_that(lambda: isinstance(lora_dropout_of(layer, "probe"), torch.nn.Module),
                   "peft: a LoRA Linear no longer keeps lora_dropout per adapter (lora_dropout_of)")
        expect(calls(torch.nn.Module, "_save_to_state_dict") and calls(torch.nn.Module, "_load_from_state_dict"),
               "torch: nn.Module no longer saves and loads through _save_to_state_dict / _load_from_state_dict "
               "(PackedLinear and slim sub-layers override them)")
        expect(isinstance(getattr(layer, "use_dora", None), dict) and dora_adapters(probe, ["probe"]) == [],
               "peft: a LoRA layer no longer keeps use_dora per adapter (dora_adapters)")
        saved = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]),
                                        torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 3)),
                                        adapter_name="probe")
        expect(auxiliary_adapters(saved, ["probe", "other"]) == ["probe"],
               "peft: modules_to_save wrappers no longer list their adapters (auxiliary_adapters)")
        expect(isinstance(getattr(layer, "_forward_pre_hooks", None), dict)
               and isinstance(getattr(layer, "_forward_pre_hooks_with_kwargs", None), dict),
               "torch: modules no longer keep _forward_pre_hooks / _forward_pre_hooks_with_kwargs dicts "
               "(forward_pre_hooks_restored)")
    except ImportError as error:
        problems.append(f"peft: {error}")

    try:
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        expect("module._old_forward(" in inspect.getsource(add_hook_to_module),
               "accelerate: a hooked module no longer runs module._old_forward (accelerate_repoint_forward)")

        for attr in ("pre_forward", "post_forward"):
            expect(hasattr(AlignDevicesHook, attr), f"accelerate: AlignDevicesHook has no {attr} (accelerate_hook)")
        source = inspect.getsource(AlignDevicesHook.__init__)
        for attr in ("offload", "weights_map", "place_submodules", "execution_device"):
            expect(f"self.{attr}" in source, f"accelerate: AlignDevicesHook no longer sets `{attr}` (accelerate_hook)")
    except ImportError as error:
        problems.append(f"accelerate: {error}")
    return problems
