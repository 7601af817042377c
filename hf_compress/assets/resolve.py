"""Turn what a user typed (a reference name, a tiny architecture, a folder, a Hub id) into a model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .. import _compat
from ..utils import DTYPE_NAMES, InvalidArgumentTypeError, check_bool, check_path, closest_name
from ..utils.model_types import MODEL_TYPE_MODULES
from .reference_models import REFERENCE_MODELS, load_reference_model
from .tiny_models import TINY_ARCHITECTURES, tiny_model


def tiny_architecture(name: str) -> str | None:
    """The architecture of a ``"tiny-<arch>"`` name that :func:`load_model` builds, else ``None``.

    Example:
        >>> tiny_architecture("tiny-llama"), tiny_architecture("tiny-nope"), tiny_architecture("org/tiny-llama")
        ('llama', None, None)
    """
    arch = name.removeprefix("tiny-")
    return arch if name.startswith("tiny-") and arch in TINY_ARCHITECTURES else None


def is_builtin_model(name: str) -> bool:
    """Whether :func:`load_model` builds ``name`` itself (a reference model or ``tiny-<arch>``), reading no folder or
    Hub repo of that name.

    Example:
        >>> is_builtin_model("smollm2-135m"), is_builtin_model("tiny-gpt2"), is_builtin_model("models/base")
        (True, True, False)
    """
    return name in REFERENCE_MODELS or tiny_architecture(name) is not None


def load_model(
    name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, *, with_tokenizer: bool = True,
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer from any of the names hf_compress accepts.

    - a reference model name (``"smollm2-135m"``, ``"gemma3-270m"``), loaded offline;
    - ``"tiny-<arch>"`` (e.g. ``"tiny-llama"``), a seeded random tiny model;
    - a local folder saved with ``save_pretrained``;
    - otherwise a Hub id, passed to ``from_pretrained`` (the only case that may reach the network).

    ``with_tokenizer=False`` loads the model alone (the tokenizer returned is ``None``): a draft model that shares its
    target's tokenizer needs none of its own.

    ``dtype`` is a ``torch.dtype`` or its name (``"bfloat16"``; ``"auto"``: the checkpoint's own, float32 for a tiny
    model). Other keywords (``device_map``, ``revision``, ``attn_implementation``, ...) go to ``from_pretrained`` for
    a reference model, a folder or a Hub id; a tiny model is built in memory and takes none.

    Example:
        >>> model, tokenizer = load_model("tiny-qwen3")
        >>> load_model("tiny-llama", "bfloat16", with_tokenizer=False)[0].dtype
        torch.bfloat16
    """
    check_path("name_or_path", name_or_path, hint="Pass a reference model name, tiny-<arch>, a folder or a Hub id.")
    dtype = _resolve_dtype(dtype)
    check_bool("with_tokenizer", with_tokenizer)
    name = str(name_or_path)
    if "dtype" in from_pretrained_kwargs or "torch_dtype" in from_pretrained_kwargs:
        raise TypeError("pass the dtype as load_model's own dtype argument, once.")
    if name in REFERENCE_MODELS:
        model, tokenizer = load_reference_model(name, dtype=dtype, **from_pretrained_kwargs)
        return model, tokenizer if with_tokenizer else None
    arch = tiny_architecture(name)
    if arch is not None:
        if from_pretrained_kwargs:
            raise ValueError(
                f"{name} is built in memory, not loaded: it takes no {', '.join(sorted(from_pretrained_kwargs))}. "
                "Move it with model.to(device) instead, or save it and load the folder."
            )
        model, tokenizer = tiny_model(arch)
        return _cast_as_loaded(model, torch.float32 if dtype == "auto" else dtype), tokenizer if with_tokenizer else None
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} is a file; pass the folder that holds config.json and the weights.")
    if path.is_dir():
        _check_folder(name, path)
    else:
        check_folder_exists(name, "an existing folder saved with save_pretrained, a reference model "
                                  f"({', '.join(REFERENCE_MODELS)}), tiny-<arch> or a Hub id (owner/name)")
        check_model_name_form(name)
        _check_hub_id(name)
    config = AutoConfig.from_pretrained(path if path.is_dir() else name)
    # hf_compress's heads and arbiter folders go on to from_pretrained, which refuses them saying what they are and
    # how to decode with them.
    if config.model_type not in MODEL_TYPE_MODULES:
        check_causal_lm_config(config, name)
        if with_tokenizer and path.is_dir() and not any(any(path.glob(pattern)) for pattern in _TOKENIZER_FILES):
            raise FileNotFoundError(  # before the weights load; AutoTokenizer would blame sentencepiece or tiktoken
                f"{name}: no tokenizer files in this folder (model.save_pretrained does not write them); save the "
                "tokenizer there too: tokenizer.save_pretrained(folder)."
            )
    with _compat.quiet_weight_progress():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path if path.is_dir() else name, dtype=dtype,
                **{**_compat.LOAD_WITHOUT_HUB_KERNELS, **from_pretrained_kwargs},
            ).eval()
        except Exception as err:
            if type(err).__name__ == "SafetensorError":  # the Rust error names no file
                raise ValueError(f"{name}: a safetensors file could not be read ({err}); re-download it or "
                                 "save the model again.") from err
            raise
    if not with_tokenizer:
        return model, None
    return model, AutoTokenizer.from_pretrained(path if path.is_dir() else name)


_DTYPE_NAMES = ("auto", *DTYPE_NAMES)


def _cast_as_loaded(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """``model`` in ``dtype`` as ``from_pretrained(..., dtype=dtype)`` would give it: parameters and saved buffers
    cast, buffers that are not saved (rotary ``inv_freq``, computed in float32 by the module) left as they are.
    ``model.to(dtype)`` casts those too, and a bf16 rotary table moves the logits (by 2e-3 on a tiny Llama)."""
    if dtype == torch.float32:
        return model
    saved = set(model.state_dict())
    unsaved = {name: buffer for name, buffer in model.named_buffers() if name not in saved}
    model.to(dtype)
    for name, buffer in unsaved.items():
        owner, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[attribute] = buffer
    return model


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """``dtype`` as ``from_pretrained`` takes it: a ``torch.dtype``, or ``"auto"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPE_NAMES:
        return dtype if dtype == "auto" else getattr(torch, dtype)
    raise InvalidArgumentTypeError(
        f"dtype must be a torch.dtype (e.g. torch.bfloat16) or one of {', '.join(_DTYPE_NAMES)}, got {dtype!r}."
    )


def check_causal_lm_config(config: PretrainedConfig, name: str) -> None:
    """Refuse, in one line, a config ``AutoModelForCausalLM`` would reject noisily or load as something else.

    An encoder-decoder (T5, BART, ...) or an architecture without a causal-LM class would make transformers
    list every config class it knows; an encoder such as BERT would load, without its trained head, as
    ``BertLMHeadModel``, be pruned and saved as that. Encoder types with a causal variant pass when their
    config says ``is_decoder``.

    Example:
        >>> from transformers import AutoConfig
        >>> check_causal_lm_config(AutoConfig.for_model("t5"), "my-t5/")
        Traceback (most recent call last):
        ...
        ValueError: my-t5/: not a decoder-only causal LM (model_type t5, an encoder-decoder); hf_compress needs AutoModelForCausalLM models.
    """
    auto_types = _compat.auto_model_types()
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder"
    elif model_type not in auto_types["causal_lm"]:
        kind = "no causal-LM class in transformers"
    elif model_type in auto_types["masked_lm"] and not getattr(config, "is_decoder", False):
        architectures = ", ".join(getattr(config, "architectures", None) or ()) or "no is_decoder"
        kind = f"a bidirectional encoder: {architectures}"
    else:
        return
    raise ValueError(
        f"{name}: not a decoder-only causal LM (model_type {model_type}, {kind}); hf_compress needs "
        "AutoModelForCausalLM models."
    )


def check_model_name_form(name: str) -> None:
    """Refuse, reading nothing but the name (and whether such a folder exists), a name ``load_model`` can never
    resolve: not a reference model, ``tiny-<arch>``, a folder (existing, or written as a path) nor ``owner/name``.

    Example:
        >>> check_model_name_form("HuggingFaceTB/SmolLM2-135M")  # a Hub id: whether it exists is load_model's to say
        >>> check_model_name_form("tiny-lama")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: 'tiny-lama' is neither a reference model ...; did you mean 'tiny-llama'?
    """
    if is_builtin_model(name) or Path(name).expanduser().exists() or looks_like_a_path(name):
        return
    if name.count("/") != 1:
        known = [*REFERENCE_MODELS, *(f"tiny-{arch}" for arch in TINY_ARCHITECTURES)]
        close = closest_name(name.lower(), known)
        raise ValueError(
            f"{name!r} is neither a reference model ({', '.join(REFERENCE_MODELS)}), a tiny model "
            f"(tiny-{'/tiny-'.join(TINY_ARCHITECTURES)}), an existing folder, nor a Hub id (owner/name)"
            + (f"; did you mean {close!r}?" if close else ".")
        )


# What AutoTokenizer reads in one form or another (fast, sentencepiece, BPE, WordPiece, tiktoken tokenizers).
_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model", "*.tiktoken", "special_tokens_map.json")


def _adapter_base(path: Path) -> str:
    """`` for <base model>`` as the adapter's config names it, or nothing."""
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" for {base}" if isinstance(base, str) and base else ""


def check_folder_exists(name: str | os.PathLike, instead: str, folder: str = "folder") -> None:
    """Refuse a missing folder given by path (``./x``, ``a/b/c``, ...) before huggingface_hub takes it for a malformed
    Hub id ("Repo id must be in the form ..."). ``instead``: what to pass, for the message; ``folder``: what kind.

    Example:
        >>> check_folder_exists("./no/such/heads", "a folder saved by AmphistaHeads.save_pretrained or a Hub id")
        Traceback (most recent call last):
        ...
        FileNotFoundError: ./no/such/heads: no such folder; pass a folder saved by AmphistaHeads.save_pretrained or a Hub id.
    """
    name = os.fspath(name)
    if not Path(name).expanduser().exists() and looks_like_a_path(name):
        raise FileNotFoundError(f"{name}: no such {folder}; pass {instead}.")


def looks_like_a_path(name: str) -> bool:
    """``./x``, ``../x``, ``/x``, ``~/x``, ``x/`` or ``a/b/c``: a folder the user meant, not a Hub id.

    Example:
        >>> looks_like_a_path("experts/"), looks_like_a_path("owner/name")
        (True, False)
    """
    separators = ("/", os.sep) if os.sep != "/" else ("/",)
    return (
        name.startswith((".", "~", *separators))
        or name.endswith(separators)
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _check_folder(name: str, path: Path) -> None:
    """A saved model folder: ``config.json`` present, every safetensors file whole (a one-line error naming it)."""
    if not (path / "config.json").is_file():
        # Folders that are not models (hf_compress's, peft's): say which one this is and what takes it.
        from ..experts.folder import CONFIG_NAME as EXPERTS_CONFIG

        if (path / EXPERTS_CONFIG).is_file():
            what = ("it holds LoRA experts and their router, not a model: route with ExpertRouter.from_pretrained("
                    "folder, base_model=<its base model>) or hf-compress experts route --experts FOLDER")
        elif (path / "custom_generate" / "generate.py").is_file() or (path / "generate.py").is_file():
            what = ("it holds a decoding strategy, not a model: pass it to the model it decodes, as "
                    "model.generate(..., custom_generate=folder, trust_remote_code=True)")
        elif (path / "adapter_config.json").is_file():
            what = (f"it holds a PEFT adapter{_adapter_base(path)}, not a model: load the base model and "
                    "PeftModel.from_pretrained(base, folder), then merge it (merge_and_unload(); a DL-QAT adapter: "
                    "merge_and_quantize()) and save that model, or pass the base model")
        else:
            what = "pass the folder save_pretrained wrote (config.json and weights)"
        raise FileNotFoundError(f"{name}: no config.json in this folder; {what}.")
    from ..formats.integrity import CheckpointIntegrityError, read_header

    for weights in sorted(path.glob("*.safetensors")):
        try:
            read_header(weights)  # the header only: a truncated or damaged file fails here, in one line
        except CheckpointIntegrityError as err:
            raise ValueError(f"{weights}: {err}") from None


def _check_hub_id(name: str) -> None:
    """Fail at once, not after minutes of retries, when a Hub id cannot be fetched: offline or unreachable."""
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return  # from_pretrained serves it from the local cache, online or not
    if huggingface_hub.is_offline_mode():
        raise OSError(
            f"{name}: not a local folder and not in the Hugging Face cache, and offline mode is on "
            "(HF_HUB_OFFLINE=1); pass a local folder, or unset HF_HUB_OFFLINE to download it."
        )
    try:
        huggingface_hub.model_info(name, timeout=10)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise OSError(
            f"{name}: no such model on the Hugging Face Hub (or it is private: log in with `hf auth login`); "
            "check the id, or pass a local folder."
        ) from None
    except huggingface_hub.errors.HfHubHTTPError:
        return  # gated, rate-limited, ...: from_pretrained says what it needs
    except Exception as err:  # no network, DNS, proxy, timeout: transformers would retry for a minute
        if isinstance(err, (OSError, TimeoutError)) or _is_transport_error(err):
            raise OSError(
                f"{name}: the Hugging Face Hub is unreachable ({type(err).__name__}: {err}) and the model is not in "
                "the local cache; connect, or pass a local folder (HF_HUB_OFFLINE=1 uses the cache only)."
            ) from None
        raise


def _is_transport_error(err: Exception) -> bool:
    # huggingface_hub's HTTP client (httpx or its fork httpx2) raises TransportError subclasses for the network.
    return any(cls.__name__ in ("TransportError", "RequestError") for cls in type(err).__mro__)
