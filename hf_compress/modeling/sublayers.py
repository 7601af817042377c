"""Whole sub-blocks removed from a decoder block: its attention, its MLP, or both (BlockPruner, SLEB's search).

A removed sub-block is replaced by a parameter-free module that adds nothing to the residual stream, so the block
computes ``h + 0`` in its place (the norm in front of it still runs; it is a few hundred multiply-adds per token).
Architectures whose norms sit after the sub-block (Gemma 3's ``post_attention_layernorm``) map the zeros to zeros.

**The KV cache.** A removed attention still writes one placeholder key/value per token to its cache layer: a single
head of one channel, zeros. Every cache layer then keeps its sequence length, sliding window and static allocation
exactly as the model's own code expects (``Cache.get_seq_length()`` reads layer 0, the causal mask reads the first
layer of each attention type), at 1/(heads × head_dim) of a real layer's memory.

In a slim checkpoint (``formats.slim``) a removed sub-block is a width of 0: ``key_value_heads = 0`` for the
attention, ``intermediate_size = 0`` for the MLP. **Marker.** A removed sub-block saves one byte under the name of its
first weight matrix (e.g. ``self_attn.q_proj.weight``): stock transformers, loading the checkpoint without
hf_compress, finds that weight with a shape no projection has and refuses the checkpoint, instead of filling the
missing sub-block with random weights. hf_compress's loaders skip the marker
(``formats.slim.skip_markers_while_loading``).

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, _ = tiny_model("llama")
    >>> remove_sublayers(model.model.layers[1], attention=True)
    >>> removed_sublayers(model.model.layers[1])
    {'attention': True, 'mlp': False}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import _compat


__all__ = [
    "ATTENTION_NAMES",
    "MLP_NAME",
    "RemovedAttention",
    "RemovedMLP",
    "removed_sublayers",
    "remove_sublayers",
    "removed_sublayer_markers",
    "sublayer_name",
    "sublayers_switched_off",
]

ATTENTION_NAMES = ("self_attn", "attn", "attention")
MLP_NAME = "mlp"


class _RemovedSublayer(nn.Module):
    """A removed sub-block's state dict: only the marker (see the module docstring)."""

    def __init__(self, marker: str | None = None) -> None:
        super().__init__()
        self.marker = marker  # the removed module's first weight matrix, relative to it (e.g. "q_proj.weight")
        # Off while from_pretrained fills the model: the loader takes the state dict's keys for the model's tensors.
        self.saves_marker = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.marker is not None and self.saves_marker:
            destination[prefix + self.marker] = torch.zeros(1, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.marker is not None:
            state_dict.pop(prefix + self.marker, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RemovedAttention(_RemovedSublayer):
    """Stands in for a removed attention module: outputs zeros, writes a placeholder key/value to the cache."""

    def __init__(self, layer_idx: int | None = None, marker: str | None = None) -> None:
        super().__init__(marker)
        self.layer_idx = layer_idx  # renumbered by remove_blocks like any attention's; the cache slot it writes

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = next((kwargs[name] for name in _compat.CACHE_KWARGS if kwargs.get(name) is not None), None)
        if cache is not None and self.layer_idx is not None:
            batch, length = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, length, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class RemovedMLP(_RemovedSublayer):
    """Stands in for a removed MLP: outputs zeros (and ``None`` for the router scores a block such as gpt-oss's
    unpacks from its MLP, ``returns_pair``)."""

    def __init__(self, marker: str | None = None, returns_pair: bool = False) -> None:
        super().__init__(marker)
        self.returns_pair = returns_pair

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, None]:
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.returns_pair else zeros


def sublayer_name(block: nn.Module, kind: str) -> str:
    """The attribute holding a block's ``"attention"`` or ``"mlp"`` module.

    Raises:
        ValueError: the block has no such module (OPT keeps its FFN as ``fc1``/``fc2`` directly in the block).
    """
    if kind == "attention":
        name = next((name for name in ATTENTION_NAMES if isinstance(getattr(block, name, None), nn.Module)), None)
    elif kind == "mlp":
        name = MLP_NAME if isinstance(getattr(block, MLP_NAME, None), nn.Module) else None
    else:
        raise ValueError(f"kind must be 'attention' or 'mlp', got {kind!r}.")
    if name is None:
        children = ", ".join(child for child, _ in block.named_children())
        raise ValueError(
            f"removing a whole {kind} sub-block needs a block with a separate {kind} module "
            f"({' / '.join(ATTENTION_NAMES) if kind == 'attention' else MLP_NAME}); {type(block).__name__} has "
            f"{children}."
        )
    return name


def removed_sublayers(block: nn.Module) -> dict[str, bool]:
    """Which of the block's sub-blocks are removed."""
    attention = any(isinstance(getattr(block, name, None), RemovedAttention) for name in ATTENTION_NAMES)
    return {"attention": attention, "mlp": isinstance(getattr(block, MLP_NAME, None), RemovedMLP)}


def remove_sublayers(block: nn.Module, *, attention: bool = False, mlp: bool = False) -> None:
    """Replace the block's attention and/or MLP by modules that add nothing (their weights are freed)."""
    if attention:
        name = sublayer_name(block, "attention")
        original = getattr(block, name)
        if not isinstance(original, RemovedAttention):
            setattr(block, name, RemovedAttention(_layer_index(original), _first_matrix(original)))
    if mlp:
        name = sublayer_name(block, "mlp")
        original = getattr(block, name)
        if not isinstance(original, RemovedMLP):
            setattr(block, name, RemovedMLP(_first_matrix(original), _compat.block_unpacks_mlp_output(block)))


def removed_sublayer_markers(model: nn.Module, *, saved: bool) -> list[str]:
    """Switch the markers of the model's removed sub-blocks off (``saved=False``: a loader is about to fill the model,
    and the checkpoint's markers are keys to skip) or on again (``saved=True``: loaded); returns their state-dict
    keys."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, _RemovedSublayer) and module.marker is not None:
            module.saves_marker = saved
            keys.append(f"{name}.{module.marker}")
    return keys


@contextlib.contextmanager
def sublayers_switched_off(blocks: Sequence[nn.Module], units: Sequence[tuple[int, str]]) -> Iterator[None]:
    """Temporarily remove sub-blocks ``(block index, "attention" | "mlp")``, e.g. to score a removal; restored after.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, _ = tiny_model("qwen3")
        >>> with sublayers_switched_off(model.model.layers, [(0, "mlp")]):
        ...     removed_sublayers(model.model.layers[0])["mlp"]
        True
        >>> removed_sublayers(model.model.layers[0])["mlp"]
        False
    """
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for index, kind in units:
            block = blocks[index]
            name = sublayer_name(block, kind)
            saved.append((block, name, getattr(block, name)))
            remove_sublayers(block, attention=kind == "attention", mlp=kind == "mlp")
        yield
    finally:
        for block, name, module in reversed(saved):
            setattr(block, name, module)


def _first_matrix(module: nn.Module) -> str | None:
    return next((name for name, parameter in module.named_parameters() if parameter.dim() >= 2), None)


def _layer_index(module: nn.Module) -> int | None:
    index = getattr(module, "layer_idx", None)
    return index if isinstance(index, int) else None
