"""Whole structures of a decoder block: attention head groups and FFN channels, counted and sliced.

Structural pruning removes *units* instead of single weights:

- an **attention unit** is one key/value head together with the query heads that share it
  (grouped-query attention: ``num_attention_heads // num_key_value_heads`` query heads per unit;
  with multi-head attention a unit is one head). Removing it drops its rows of ``q/k/v_proj`` (and
  their biases) and its columns of ``o_proj``; every layer keeps the model's query-per-key ratio, so
  the stock attention code (``view(..., -1, head_dim)``, ``repeat_kv``) runs unchanged;
- an **FFN unit** is one intermediate channel: its rows of ``gate_proj``/``up_proj`` (``fc1``) and its
  column of ``down_proj`` (``fc2``).

``block_structure`` finds these modules by the names transformers uses (Llama, Mistral, Qwen2/3,
Gemma 3, OPT, ...), ``shrink_block`` slices them in place, and ``layer_widths`` /
``apply_layer_widths`` record and rebuild the per-layer sizes (what ``hf_compress_slim`` checkpoints
store). ``remove_blocks`` deletes whole decoder blocks (the ShortGPT-style baseline).

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, _ = tiny_model("qwen3")
    >>> structure = block_structure(model.model.layers[0])
    >>> structure.attention.num_units, structure.ffn.num_units
    (2, 128)
    >>> shrink_block(structure, kept_attention=torch.tensor([1]), kept_ffn=torch.arange(64))
    >>> layer_widths(model)[0]
    {'key_value_heads': 1, 'intermediate_size': 64}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..utils.logging import get_logger
from .layers import built_on_meta, find_decoder_blocks
from .sublayers import ATTENTION_NAMES, remove_sublayers, removed_sublayers


__all__ = [
    "AttentionStructure",
    "BlockStructure",
    "FeedForwardStructure",
    "apply_layer_widths",
    "attention_structure",
    "block_structure",
    "check_units_removable",
    "decoder_parameter_count",
    "feed_forward_structure",
    "layer_widths",
    "remove_blocks",
    "shrink_block",
    "unit_channels",
]

_OUTPUT_NAMES = ("o_proj", "out_proj", "dense")
_FFN_LAYOUTS = (  # (module holding the FFN or "" for the block itself, input projections, output projection)
    ("mlp", ("gate_proj", "up_proj"), "down_proj"),
    ("mlp", ("up_proj",), "down_proj"),
    ("mlp", ("fc1",), "fc2"),
    ("", ("fc1",), "fc2"),
)

logger = get_logger(__name__)


@dataclass
class AttentionStructure:
    """The projections of one attention module, grouped into key/value-head units."""

    module: nn.Module
    path: str
    """Name of the attention module inside the block (``"self_attn"``)."""
    output_name: str
    """Name of the output projection inside the attention module (``"o_proj"``, OPT: ``"out_proj"``)."""
    head_dim: int
    heads_per_unit: int

    @property
    def q(self) -> nn.Linear:
        return self.module.q_proj

    @property
    def k(self) -> nn.Linear:
        return self.module.k_proj

    @property
    def v(self) -> nn.Linear:
        return self.module.v_proj

    @property
    def output(self) -> nn.Linear:
        return getattr(self.module, self.output_name)

    @property
    def num_units(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def unit_size(self) -> int:
        """Input channels of the output projection per unit (``heads_per_unit * head_dim``)."""
        return self.heads_per_unit * self.head_dim

    def unit_parameters(self) -> int:
        """Parameters one unit holds (q/k/v rows and biases, output-projection columns)."""
        per_row = self.q.in_features
        rows = self.unit_size + 2 * self.head_dim
        biases = sum(self.unit_size if m is self.q else self.head_dim for m in (self.q, self.k, self.v)
                     if m.bias is not None)
        return rows * per_row + self.unit_size * self.output.out_features + biases

    def output_index(self, kept_units: torch.Tensor) -> torch.Tensor:
        """Input channels of the output projection (= rows of ``q_proj``) that ``kept_units`` keep."""
        return unit_channels(kept_units, self.unit_size)


@dataclass
class FeedForwardStructure:
    """The projections of one FFN, as intermediate channels."""

    module: nn.Module
    path: str
    """Name of the module holding the FFN inside the block (``"mlp"``; ``""`` when the block holds it)."""
    input_names: tuple[str, ...]
    output_name: str

    @property
    def inputs(self) -> list[nn.Linear]:
        return [getattr(self.module, name) for name in self.input_names]

    @property
    def output(self) -> nn.Linear:
        return getattr(self.module, self.output_name)

    @property
    def num_units(self) -> int:
        return self.output.in_features

    def unit_parameters(self) -> int:
        params = sum(m.in_features + (1 if m.bias is not None else 0) for m in self.inputs)
        return params + self.output.out_features


@dataclass
class BlockStructure:
    """The prunable structures of one decoder block."""

    attention: AttentionStructure
    ffn: FeedForwardStructure

    @property
    def output_layer_names(self) -> dict[str, str]:
        """Names, relative to the block, of the two layers a structural pruner re-fits, by unit type."""
        return {
            "attention": f"{self.attention.path}.{self.attention.output_name}",
            "ffn": ".".join(p for p in (self.ffn.path, self.ffn.output_name) if p),
        }


def block_structure(block: nn.Module) -> BlockStructure:
    """Find the attention and FFN projections of a decoder block.

    Raises:
        ValueError: the block has no separate ``q_proj``/``k_proj``/``v_proj`` ``nn.Linear`` layers (e.g.
            GPT-2's fused ``c_attn``) or no recognised FFN layout, with what was found.
    """
    attention = attention_structure(block)
    ffn = feed_forward_structure(block)
    return BlockStructure(attention, ffn)


def attention_structure(block: nn.Module) -> AttentionStructure:
    """The attention projections of a decoder block (separate q/k/v ``nn.Linear`` layers), grouped by head."""
    for path in ATTENTION_NAMES:
        module = getattr(block, path, None)
        if module is None:
            continue
        projections = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        output_name = next((name for name in _OUTPUT_NAMES if isinstance(getattr(module, name, None), nn.Linear)),
                           None)
        if all(isinstance(p, nn.Linear) for p in projections) and output_name is not None:
            head_dim = getattr(module, "head_dim", None)
            if not isinstance(head_dim, int) or head_dim < 1:
                raise ValueError(f"{type(module).__name__} has no integer head_dim attribute; cannot group heads.")
            q, k, v = projections
            if k.out_features % head_dim or q.out_features % k.out_features or v.out_features != k.out_features:
                raise ValueError(
                    f"{type(module).__name__}: q/k/v widths {q.out_features}/{k.out_features}/{v.out_features} "
                    f"do not form groups of head_dim {head_dim}."
                )
            return AttentionStructure(module, path, output_name, head_dim, q.out_features // k.out_features)
    children = ", ".join(name for name, _ in block.named_children())
    raise ValueError(
        f"structural pruning needs an attention module with separate q_proj/k_proj/v_proj nn.Linear layers; "
        f"{type(block).__name__} has none (children: {children}). Fused projections such as GPT-2's Conv1D "
        "c_attn are not supported."
    )


def feed_forward_structure(block: nn.Module) -> FeedForwardStructure:
    """The feed-forward projections of a decoder block (gated or plain), by hidden unit."""
    for path, inputs, output in _FFN_LAYOUTS:
        module = getattr(block, path, None) if path else block
        if module is None:
            continue
        layers = [getattr(module, name, None) for name in (*inputs, output)]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return FeedForwardStructure(module, path, inputs, output)
    raise ValueError(
        f"structural pruning needs an FFN of nn.Linear layers (gate_proj/up_proj/down_proj or fc1/fc2); "
        f"{type(block).__name__} has none."
    )


# --------------------------------------------------------------------------------------------------
# Slicing
# --------------------------------------------------------------------------------------------------


def shrink_block(
    structure: BlockStructure,
    kept_attention: torch.Tensor | None = None,
    kept_ffn: torch.Tensor | None = None,
    attention_output_weight: torch.Tensor | None = None,
    ffn_output_weight: torch.Tensor | None = None,
) -> None:
    """Physically remove the units not listed in ``kept_attention`` / ``kept_ffn`` (sorted unit indices).

    The kept rows of the input projections are copied unchanged. The output projections get
    ``*_output_weight`` (``[out_features, kept input channels]``, e.g. a re-fitted weight) when given,
    else their kept columns. ``None`` leaves that structure as it is. Works on meta tensors too.
    """
    if kept_attention is not None:
        _check_units(kept_attention, structure.attention.num_units, "attention")
        attention = structure.attention
        rows = attention.output_index(kept_attention)
        kv_rows = unit_channels(kept_attention, attention.head_dim)
        module = attention.module
        module.q_proj = _sliced(attention.q, rows=rows)
        module.k_proj = _sliced(attention.k, rows=kv_rows)
        module.v_proj = _sliced(attention.v, rows=kv_rows)
        setattr(module, attention.output_name, _sliced(attention.output, columns=rows,
                                                       weight=attention_output_weight))
        units = int(kept_attention.numel())
        # Attributes some attention classes read in forward (OPT's num_heads); Llama-style ones infer it.
        for name, value in (("num_heads", units * attention.heads_per_unit), ("num_key_value_heads", units)):
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, value)
    if kept_ffn is not None:
        _check_units(kept_ffn, structure.ffn.num_units, "FFN")
        ffn = structure.ffn
        for name, layer in zip(ffn.input_names, ffn.inputs, strict=True):
            setattr(ffn.module, name, _sliced(layer, rows=kept_ffn))
        setattr(ffn.module, ffn.output_name, _sliced(ffn.output, columns=kept_ffn, weight=ffn_output_weight))


def check_units_removable(model: nn.Module, structures: Sequence[BlockStructure]) -> None:
    """Check that removing a unit is what zeroing it is, on this architecture.

    A forward of a few random tokens records the inputs of one block of each kind; a float32 copy of that block then
    runs twice: with its first attention unit and first FFN channel zeroed at the output projections, and with them
    sliced off (``shrink_block``: every other unit moves down one place). The model itself is not changed.

    The two differ when an architecture ties its heads or channels together outside q/k/v/o and the FFN's linear
    layers (StableLM's per-head norms would pair each kept head with another head's norm; OLMo-2's query norm and
    BitNet's sub-norms span every head; DiffLlama pairs heads) or reads the head count from its config (XGLM): the
    slimmed model would compute another function, or fail at its first forward.

    Raises:
        ValueError: the two differ or the sliced block fails, naming the architecture.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, _ = tiny_model("llama")
        >>> check_units_removable(model, [block_structure(b) for b in model.model.layers])
    """
    import copy

    blocks = find_decoder_blocks(model)[1]
    kinds: dict[tuple, int] = {}  # one block per kind: its modules and weight shapes
    for index, block in enumerate(blocks):
        kind = tuple((name, type(module).__name__) for name, module in block.named_modules())
        kinds.setdefault(kind + tuple((n, tuple(p.shape)) for n, p in block.named_parameters()), index)
    recorded: dict[int, tuple] = {}

    def record(index: int):
        def hook(module, args, kwargs):
            recorded[index] = _float32((args, kwargs))
        return hook

    hooks = [blocks[index].register_forward_pre_hook(record(index), with_kwargs=True) for index in kinds.values()]
    parameter = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(parameter.device)
    modes = {module: module.training for module in model.modules()}  # dropout would make every forward differ
    try:
        with torch.no_grad():
            model.eval()(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    for index in kinds.values():
        structure = structures[index]
        attention_units, ffn_units = structure.attention.num_units, structure.ffn.num_units
        block = copy.deepcopy(blocks[index]).float().eval()
        copied = block_structure(block)
        args, kwargs = recorded[index]
        device = copied.attention.output.weight.device
        with torch.no_grad():
            # The zeroed columns are the very ones the slicing below drops: nothing to put back in between.
            if attention_units > 1:
                columns = copied.attention.output_index(torch.zeros(1, dtype=torch.long, device=device))
                copied.attention.output.weight[:, columns] = 0
            if ffn_units > 1:
                copied.ffn.output.weight[:, 0] = 0
            zeroed = _first_tensor(block(*args, **kwargs))
            try:
                shrink_block(copied,
                             kept_attention=torch.arange(1, attention_units, device=device) if attention_units > 1 else None,
                             kept_ffn=torch.arange(1, ffn_units, device=device) if ffn_units > 1 else None)
                sliced = _first_tensor(block(*args, **kwargs))
            except Exception as error:  # noqa: BLE001 - whatever the slimmed forward raises, the answer is the same
                reason = f"its block {index} fails ({type(error).__name__}: {error})"
            else:
                difference = float((sliced - zeroed).abs().max())
                reason = None if difference <= 1e-3 * (1 + float(zeroed.abs().max())) else (
                    f"its block {index} computes another function than with those units zeroed (outputs differ by "
                    f"{difference:.3g})")
        del block, copied
        if reason is not None:
            raise ValueError(
                f"{type(model).__name__}: with a key/value-head group and an FFN channel removed, {reason}. This "
                "architecture ties heads or channels together outside the q/k/v/o and FFN linear layers (per-head or "
                "full-width norms, paired heads, head counts read from the config), so they cannot be removed."
            )


def _float32(value: Any) -> Any:
    """``value`` with every floating-point tensor in it (through tuples, lists and dicts) cast to float32."""
    if torch.is_tensor(value):
        return value.detach().float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(item) for item in value)
    if isinstance(value, dict):
        return {key: _float32(item) for key, item in value.items()}
    return value


def _first_tensor(output: Any) -> torch.Tensor:
    return output if torch.is_tensor(output) else output[0]


def _check_units(kept: torch.Tensor, total: int, what: str) -> None:
    kept = kept.cpu()
    if kept.ndim != 1 or kept.numel() < 1:
        raise ValueError(f"keep at least one {what} unit (got {kept.numel()}).")
    if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
        raise ValueError(f"kept {what} units must be sorted and unique.")
    if int(kept[-1]) >= total or int(kept[0]) < 0:
        raise ValueError(f"kept {what} units must lie in [0, {total}).")


def unit_channels(units: torch.Tensor, size: int) -> torch.Tensor:
    """Channel indices covered by ``units`` of ``size`` consecutive channels each (``[2, 0]``, 3 → 6,7,8,0,1,2)."""
    return (units.long()[:, None] * size + torch.arange(size, device=units.device)).reshape(-1)


def _sliced(
    layer: nn.Linear,
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> nn.Linear:
    """A new ``nn.Linear`` holding the selected rows (outputs) / columns (inputs) of ``layer``."""
    source = layer.weight
    out_features = layer.out_features if rows is None else int(rows.numel())
    in_features = layer.in_features if columns is None else int(columns.numel())
    new = nn.Linear(in_features, out_features, bias=layer.bias is not None, device=source.device,
                    dtype=source.dtype)
    if weight is None:
        weight = source.detach()
        if rows is not None:
            weight = weight.index_select(0, rows.to(source.device))
        if columns is not None:
            weight = weight.index_select(1, columns.to(source.device))
    elif tuple(weight.shape) != (out_features, in_features):
        raise ValueError(f"replacement weight has shape {list(weight.shape)}, expected "
                         f"{[out_features, in_features]}.")
    new.weight = nn.Parameter(weight.to(device=source.device, dtype=source.dtype).contiguous(),
                              requires_grad=source.requires_grad)
    if layer.bias is not None:
        bias = layer.bias.detach()
        if rows is not None:
            bias = bias.index_select(0, rows.to(bias.device))
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=layer.bias.requires_grad)
    new.train(layer.training)
    return new


# --------------------------------------------------------------------------------------------------
# Per-layer widths (what a slim checkpoint records)
# --------------------------------------------------------------------------------------------------


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """``[{"key_value_heads": ..., "intermediate_size": ...}]`` per decoder block, as the model is now (0 = that
    sub-block is removed, ``modeling.sublayers``)."""
    _, blocks = find_decoder_blocks(model)
    widths = []
    for block in blocks:
        removed = removed_sublayers(block)
        widths.append({"key_value_heads": 0 if removed["attention"] else attention_structure(block).num_units,
                       "intermediate_size": 0 if removed["mlp"] else feed_forward_structure(block).num_units})
    return widths


def apply_layer_widths(model: nn.Module, widths: Sequence[dict[str, Any]]) -> None:
    """Shrink every block to the recorded widths, keeping the first units (the loader's empty skeleton); a width of
    0 removes that sub-block (``modeling.sublayers``).

    Raises:
        ValueError: the number of blocks differs, or a width exceeds what the architecture has.
    """
    _, blocks = find_decoder_blocks(model)
    if len(widths) != len(blocks):
        raise ValueError(f"the checkpoint records widths for {len(widths)} blocks; the model has {len(blocks)}.")
    for index, (block, width) in enumerate(zip(blocks, widths, strict=True)):
        structure = block_structure(block)
        kv_heads, channels = int(width["key_value_heads"]), int(width["intermediate_size"])
        if kv_heads > structure.attention.num_units or channels > structure.ffn.num_units:
            raise ValueError(
                f"block {index}: recorded widths {width} exceed the architecture's "
                f"({structure.attention.num_units} key/value heads, {structure.ffn.num_units} channels)."
            )
        shrink_block(
            structure,
            # device="cpu": from_pretrained calls this under a meta-device context
            kept_attention=torch.arange(kv_heads, device="cpu") if 0 < kv_heads < structure.attention.num_units else None,
            kept_ffn=torch.arange(channels, device="cpu") if 0 < channels < structure.ffn.num_units else None,
        )
        remove_sublayers(block, attention=kv_heads == 0, mlp=channels == 0)


def decoder_parameter_count(model: nn.Module) -> int:
    """Parameters inside the decoder blocks (what structural sparsity is a fraction of)."""
    _, blocks = find_decoder_blocks(model)
    return sum(p.numel() for block in blocks for p in block.parameters())


# --------------------------------------------------------------------------------------------------
# Whole blocks
# --------------------------------------------------------------------------------------------------


LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")
"""Config fields that list layers by index (Qwen-MoE's dense layers, Llama 4's MoE layers): renumbered when blocks
are removed, not filtered as per-layer lists."""

FIRST_DENSE_FIELDS = ("first_k_dense_replace", "num_dense_layers")
"""Config fields that make the first k blocks dense (DeepSeek, GLM-4-MoE; AFMoE, LFM2-MoE): k counts the kept ones."""

UNMOVABLE_LAYER_PATTERNS = ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "moe_layer_freq")
"""Config fields that place MoE layers by index arithmetic with no per-layer override: which blocks are MoE could
not be kept once blocks move, so removing blocks from such a model is refused."""


def _renumbered_layer_index_fields(config: Any, kept: list[int]) -> dict[str, Any]:
    """The config fields that pick a layer's kind by its index, rewritten for the ``kept`` blocks (in order), so each
    block is rebuilt at its new index as the kind it is; refuses a pattern that cannot follow.

    A block built at another index from such a field would be the other kind (an MLP where a mixture of experts
    was): its weights would not load, and ``from_pretrained`` initialises them at random with only a load report.
    """
    new_index = {old: new for new, old in enumerate(kept)}
    fields: dict[str, Any] = {}
    for field in UNMOVABLE_LAYER_PATTERNS:
        value = getattr(config, field, None)
        if value is not None and not (field in ("moe_layer_interval", "moe_layer_freq") and value == 1):
            raise ValueError(f"this model places its mixture-of-experts layers by index ({field}={value}), so removing "
                             "blocks would rebuild some as the other kind; remove blocks from a model without it.")
    for field in LAYER_INDEX_LISTS:
        value = getattr(config, field, None)
        if isinstance(value, (list, tuple)):
            fields[field] = type(value)(new_index[i] for i in value if i in new_index)
    step = getattr(config, "decoder_sparse_step", None)
    if isinstance(step, int) and step > 1 and (getattr(config, "num_experts", 0) or 0) > 0:
        # Qwen-MoE: a layer is MoE when (index + 1) % step == 0 and it is not in mlp_only_layers. Moved blocks keep
        # their kind with step 1 and every dense one listed.
        if not hasattr(config, "mlp_only_layers"):
            raise ValueError(f"this model places its mixture-of-experts layers every {step} blocks "
                             "(decoder_sparse_step), so removing blocks would rebuild some as the other kind.")
        dense = set(getattr(config, "mlp_only_layers") or [])
        fields["decoder_sparse_step"] = 1
        fields["mlp_only_layers"] = [new_index[i] for i in kept if i in dense or (i + 1) % step != 0]
    for field in FIRST_DENSE_FIELDS:  # the kept dense blocks are still the first ones: only their count changes
        first_dense = getattr(config, field, None)
        if isinstance(first_dense, int) and first_dense > 0:
            fields[field] = sum(1 for i in kept if i < first_dense)
    return fields


def _text_config_without_blocks(text_config: Any, kept: list[int], num_blocks: int) -> dict[str, Any]:
    """The text config fields that change when only the ``kept`` blocks remain (nothing is written here)."""
    updates = _renumbered_layer_index_fields(text_config, kept)
    # Every per-layer list follows (layer_types, SmolLM3's no_rope_layers, ...).
    for field, value in list(vars(text_config).items()):
        if (field not in LAYER_INDEX_LISTS and "layer" in field and isinstance(value, (list, tuple))
                and len(value) == num_blocks):
            updates[field] = type(value)(value[i] for i in kept)
    updates["num_hidden_layers"] = len(kept)
    return updates


def _apply_config_updates(text_config: Any, updates: dict[str, Any]) -> None:
    # Written around the validating __setattr__ (layer_types and num_hidden_layers are checked against each other),
    # except the layer count, which goes through it: some configs name it otherwise (GPT-Neo's num_layers).
    text_config.__dict__.update({k: v for k, v in updates.items() if k != "num_hidden_layers"})
    if "num_hidden_layers" in updates:
        text_config.num_hidden_layers = updates["num_hidden_layers"]


def _positional_attributes(model: nn.Module, updates: dict[str, Any], kept: list[int]) -> list[tuple[int, str, str]]:
    """Compare each kept block as the architecture builds it at its old index (the config as it is) and at its new one
    (with ``updates``), on the ``meta`` device. Returns ``(new index, module path, attribute)`` of the integers that
    are the block's own index (to renumber); raises when anything else differs.
    """
    import copy

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # under PEFT
    config = base.config
    moved = copy.deepcopy(config)
    _apply_config_updates(moved.get_text_config(), updates)

    def as_reloaded(config: Any) -> Any:
        # The config as a reload reads it back (GPT-Neo derives attention_layers from attention_types again).
        return type(config).from_dict(config.to_dict())

    try:  # both with eager attention: the comparison is of the blocks, not of an implementation's attention classes
        before = built_on_meta(type(base), as_reloaded(config))
        after = built_on_meta(type(base), as_reloaded(moved))
    except Exception as error:  # noqa: BLE001 - a constructor meta tensors do not suit: nothing to compare with
        logger.warning("could not rebuild %s on the meta device to check that the kept blocks reload as they are "
                       "(%s: %s); the removal goes on unchecked", type(base).__name__, type(error).__name__, error)
        return []
    old_blocks, new_blocks = find_decoder_blocks(before)[1], find_decoder_blocks(after)[1]
    own_indices, differences, unmoved = [], [], False
    for new_index, old_index in enumerate(kept):
        old_modules = dict(old_blocks[old_index].named_modules())
        new_modules = dict(new_blocks[new_index].named_modules())
        kinds = {path: type(module).__name__ for path, module in old_modules.items()}
        rebuilt = {path: type(module).__name__ for path, module in new_modules.items()}
        found = len(differences)
        if kinds != rebuilt:
            differences.append(f"block {old_index} would reload as {rebuilt['']} at index {new_index} "
                               f"({', '.join(sorted(set(rebuilt.values()) - set(kinds.values())) or 'other parts')})")
            continue
        for path, module in old_modules.items():
            old_values, new_values = _scalar_attributes(module), _scalar_attributes(new_modules[path])
            for attribute in sorted(old_values.keys() | new_values.keys()):
                old_value, new_value = old_values.get(attribute), new_values.get(attribute)
                if old_value == new_value:
                    continue
                if old_value == old_index and new_value == new_index and type(old_value) is int:
                    own_indices.append((new_index, path, attribute))
                else:
                    where = f"{path}.{attribute}" if path else attribute
                    differences.append(f"block {old_index}'s {where} would be {new_value!r} at index {new_index}, "
                                       f"not {old_value!r}")
        shapes = {key: tuple(p.shape) for key, p in old_blocks[old_index].named_parameters()}
        if shapes != {key: tuple(p.shape) for key, p in new_blocks[new_index].named_parameters()}:
            differences.append(f"block {old_index}'s weights would take other shapes at index {new_index}")
        unmoved |= old_index == new_index and len(differences) > found
    if differences:
        listed = f"{'; '.join(differences[:3])}{'; ...' if len(differences) > 3 else ''}"
        if unmoved:  # a block that keeps its index changes too: it reads the depth itself (MiniMax)
            raise ValueError(
                f"{type(base).__name__} builds its blocks from the number of blocks: {listed}. Any removal would make "
                "the saved model reload as another model; use a method that keeps every block."
            )
        raise ValueError(
            f"{type(base).__name__} builds its blocks from their position, and removing these blocks moves others: "
            f"{listed}. The saved model would reload as another model. Remove blocks from the end only (they then "
            "keep their indices), or use a method that keeps every block."
        )
    return own_indices


def _scalar_attributes(module: nn.Module) -> dict[str, Any]:
    """The plain values a module set on itself when built (its settings), not its tensors or submodules."""
    return {key: value for key, value in vars(module).items()
            if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str))}


def remove_blocks(model: nn.Module, indices: Sequence[int]) -> None:
    """Delete decoder blocks in place and renumber what remains, so caches and ``config`` stay consistent.

    Every submodule's ``layer_idx`` is renumbered (the cache index an attention layer writes to); the text config's
    ``num_hidden_layers`` and its per-layer lists (``layer_types``, ``no_rope_layers``, ...) follow, on the text config
    of a multimodal model too, and so do the fields that pick a block's kind by its index (Qwen-MoE's
    ``mlp_only_layers`` / ``decoder_sparse_step``, Llama 4's ``moe_layers``, DeepSeek's ``first_k_dense_replace``,
    AFMoE's ``num_dense_layers``):
    each block reloads as the kind it is. Index arithmetic that cannot follow (``moe_layer_start_index``, ...) is
    refused.

    Before anything changes, the architecture is built twice on the ``meta`` device (no memory): from the config as it
    is and as it will be. Each kept block must come out at its new index as it was built at its old one; an index a
    block keeps for itself (GPT-Neo's ``layer_id``) is renumbered like ``layer_idx``, and anything else that depends
    on the position (DiffLlama's ``lambda_init``, RecurrentGemma's cycle of ``block_types``) is refused: the saved
    model would reload as another one.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, _ = tiny_model("llama")
        >>> remove_blocks(model, [0])
        >>> model.config.num_hidden_layers, model.model.layers[0].self_attn.layer_idx
        (1, 0)
    """
    name, blocks = find_decoder_blocks(model)
    drop = sorted({int(i) for i in indices})
    if any(i < 0 or i >= len(blocks) for i in drop):
        raise ValueError(f"block indices must lie in [0, {len(blocks)}), got {drop}.")
    if len(drop) >= len(blocks):
        raise ValueError("cannot remove every decoder block.")
    kept = [i for i in range(len(blocks)) if i not in drop]
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None  # the one block discovery reads
    if drop and getattr(text_config, "scale_attn_by_inverse_layer_idx", False) and kept != list(range(len(kept))):
        # GPT-2 divides each layer's attention scores by its index + 1, fixed when the layer is built: a renumbered
        # block would compute otherwise once reloaded.
        raise ValueError("this model scales attention by the inverse layer index (scale_attn_by_inverse_layer_idx), "
                         "so blocks cannot move: remove blocks from the end only.")
    updates = _text_config_without_blocks(text_config, kept, len(blocks)) if drop and text_config else {}
    own_indices = _positional_attributes(model, updates, kept) if drop and text_config else []
    new_blocks = nn.ModuleList([blocks[i] for i in kept])
    for new_index, block in enumerate(new_blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    for new_index, path, attribute in own_indices:
        setattr(new_blocks[new_index].get_submodule(path), attribute, new_index)
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, new_blocks)
    if text_config is not None:
        _apply_config_updates(text_config, updates)
    record = getattr(config, "quantization_config", None)
    if record is not None:
        from ..formats.slim import SlimFormatConfig, sync_slim_format  # formats build on modeling: imported here

        if isinstance(record, SlimFormatConfig):
            sync_slim_format(model)  # a loaded record lists the blocks as they were; save_pretrained writes it
