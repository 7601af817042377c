"""Seeded, randomly initialised tiny causal LMs of several architectures, for tests and examples.

They are built from configs (no download), small enough to run a forward pass in milliseconds, and
cover the module-naming families a generic method must handle: Llama-style (llama, mistral, qwen2,
qwen3, gemma3 with sliding-window layers) and GPT-2 (fused ``c_attn`` in ``Conv1D``) and OPT
(``fc1``/``fc2``, biases, learned positions).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .. import _compat
from ..utils import check_path, check_seed


TINY_VOCAB_SIZE = 256

# Shared sizes: 2 layers, hidden 64, 4 query heads of 16 dims, 2 KV heads (grouped-query attention where
# the architecture supports it), FFN 128.
_LLAMA_LIKE: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", **_LLAMA_LIKE),
    "mistral": dict(model_type="mistral", sliding_window=None, **_LLAMA_LIKE),
    "qwen2": dict(model_type="qwen2", **_LLAMA_LIKE),
    "qwen3": dict(model_type="qwen3", **_LLAMA_LIKE),
    "gemma3": dict(
        model_type="gemma3_text", sliding_window=32, layer_types=["sliding_attention", "full_attention"],
        **_LLAMA_LIKE,
    ),
    "gpt2": dict(model_type="gpt2", vocab_size=TINY_VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "opt": dict(
        model_type="opt", vocab_size=TINY_VOCAB_SIZE, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
    ),
}
TINY_ARCHITECTURES: tuple[str, ...] = tuple(TINY_CONFIGS)


def tiny_config(arch: str, **overrides: Any):
    """The ``PretrainedConfig`` of a tiny model (``overrides`` replace any field).

    Example:
        >>> tiny_config("qwen3", num_hidden_layers=3).num_hidden_layers
        3
    """
    if not isinstance(arch, str) or arch not in TINY_CONFIGS:
        raise ValueError(f"Unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}.")
    fields = {**TINY_CONFIGS[arch], **overrides}
    model_type = fields.pop("model_type")
    fields.setdefault("bos_token_id", 1)
    fields.setdefault("eos_token_id", 2)
    fields.setdefault("pad_token_id", 0)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(
    arch: str = "llama", seed: int = 0, save_dir: str | os.PathLike | None = None, **overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A seeded random tiny causal LM and a byte-level tokenizer that fits its vocabulary.

    With ``save_dir`` the model and tokenizer are saved there and re-loaded through
    ``from_pretrained``, so what you get is exactly what a user loading a checkpoint gets.

    Example:
        >>> model, tokenizer = tiny_model("gpt2", seed=1)
        >>> model(**tokenizer("hello", return_tensors="pt")).logits.shape[-1]
        256
    """
    check_seed("seed", seed)
    check_path("save_dir", save_dir, allow_none=True)
    config = tiny_config(arch, **overrides)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    model.generation_config.pad_token_id = config.pad_token_id
    tokenizer = tiny_tokenizer()
    if save_dir is not None:
        with _compat.quiet_weight_progress():
            model.save_pretrained(save_dir)
            tokenizer.save_pretrained(save_dir)
            model = AutoModelForCausalLM.from_pretrained(save_dir, **_compat.LOAD_WITHOUT_HUB_KERNELS).eval()
        tokenizer = type(tokenizer).from_pretrained(save_dir)
    return model, tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with 256 ids (id = byte value; 0 pad, 1 bos, 2 eos), built offline.

    Example:
        >>> tiny_tokenizer()("ab")["input_ids"]
        [97, 98]
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps each byte to a printable unicode character; give each its byte value as id.
    ordered = sorted(byte_to_unicode, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(ordered)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=ordered[0]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left")
    # Registered as special tokens, as a saved and reloaded copy has them: the characters of bytes 0-2 in text
    # ("ā" in "Tōkyō ā") then map to pad/bos/eos here too. Set as plain attributes, they were bytes in memory and
    # special tokens after a reload, and a saved tiny model scored other ids than the one that was measured.
    tokenizer.add_special_tokens({"pad_token": ordered[0], "bos_token": ordered[1], "eos_token": ordered[2]})
    return tokenizer


def _byte_of(char: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + k.
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
