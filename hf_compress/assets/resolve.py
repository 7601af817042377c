"""Turn what a user typed (a reference name, a tiny architecture, a folder, a Hub id) into a model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .reference_models import REFERENCE_MODELS, load_reference_model
from .tiny_models import TINY_ARCHITECTURES, tiny_model


def load_model(
    name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from any of the names hf_compress accepts.

    - a reference model name (``"smollm2-135m"``, ``"gemma3-270m"``), loaded offline;
    - ``"tiny-<arch>"`` (e.g. ``"tiny-llama"``), a seeded random tiny model;
    - a local folder saved with ``save_pretrained``;
    - otherwise a Hub id, passed to ``from_pretrained`` (the only case that may reach the network).

    Example:
        >>> model, tokenizer = load_model("tiny-qwen3")
    """
    name = str(name_or_path)
    if name in REFERENCE_MODELS:
        return load_reference_model(name, dtype=dtype)
    if name.startswith("tiny-") and name[len("tiny-"):] in TINY_ARCHITECTURES:
        model, tokenizer = tiny_model(name[len("tiny-"):])
        return model.to(dtype), tokenizer
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} is a file; pass the folder that holds config.json and the weights.")
    if not path.exists() and name.count("/") != 1:
        raise ValueError(
            f"{name!r} is neither a reference model ({', '.join(REFERENCE_MODELS)}), a tiny model "
            f"(tiny-{'/tiny-'.join(TINY_ARCHITECTURES)}), an existing folder, nor a Hub id (owner/name)."
        )
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer
