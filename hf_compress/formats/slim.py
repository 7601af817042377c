"""``hf_compress_slim``: checkpoints of structurally pruned models whose blocks have different widths.

A stock ``LlamaConfig`` (and its peers) has one ``num_key_value_heads`` and one ``intermediate_size``
for every layer, so a model whose layers lost different numbers of heads and FFN channels cannot be
described by it. The slim format keeps the model's own ``model_type`` and modeling code and records
the per-layer widths in ``config.json``'s ``quantization_config``::

    {"quant_method": "hf_compress_slim", "layers": [{"key_value_heads": 2, "intermediate_size": 1152}, ...]}

``from_pretrained`` (after ``import hf_compress``) builds the architecture, shrinks every block to its
recorded widths before the weights stream in (``SlimFormatQuantizer``), and loads the smaller tensors as
they are. The model that comes back is an ordinary transformers model, just smaller: ``generate``,
``Trainer`` and PEFT treat it as unquantized; it keeps the widths on its config so that its own
``save_pretrained`` writes a slim checkpoint again.

**Slim and sparse/packed at once.** ``config.json`` has one ``quantization_config``, so a slim model saved
sparse (``pruning.storage.save_pruned``) or packed (``formats.packed``) stores its widths inside that format's
config, under ``slim`` (``{"layers": [...], "recipe": {...}}``: this format's fields, :func:`slim_record`).
Those formats check and apply the widths before anything else (:func:`apply_slim_record`), and a model
loaded from a sparse one keeps a ``SlimFormatConfig`` afterwards (:func:`keep_slim_widths`), as if loaded
from a slim checkpoint.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.modeling.structure import block_structure, shrink_block
    >>> model, _ = tiny_model("llama")
    >>> shrink_block(block_structure(model.model.layers[1]), kept_ffn=torch.arange(32))
    >>> attach_slim_format(model).layers[1]["intermediate_size"]
    32
    >>> model.save_pretrained("slim")  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("slim")  # same logits  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch  # noqa: F401  (doctest namespace)

from .. import _compat
from .base import CompressedFormatConfig, CompressedFormatQuantizer, quant_method_of, register_format
from .integrity import CheckpointIntegrityError, CheckpointReader, seal_checkpoint
from ..modeling.layers import find_decoder_blocks
from ..modeling.structure import apply_layer_widths, block_structure, layer_widths
from ..modeling.sublayers import removed_sublayer_markers, removed_sublayers
from ..utils.processes import main_process_only


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = [
    "FORMAT_NAME", "SlimFormatConfig", "SlimFormatQuantizer", "apply_slim_record", "attach_slim_format",
    "check_slim_widths", "keep_slim_widths", "measurable_widths", "needs_slim_format", "recorded_slim_record",
    "save_slim", "skip_markers_while_loading", "slim_record", "sync_slim_format",
]

FORMAT_NAME = "hf_compress_slim"


class SlimFormatConfig(CompressedFormatConfig):
    """``quantization_config`` of a slim checkpoint: ``layers`` (per-block widths) and ``recipe``."""

    QUANT_METHOD = FORMAT_NAME

    def __init__(
        self, layers: Sequence[Mapping[str, int]] = (), recipe: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(layers=[dict(layer) for layer in layers], recipe=dict(recipe or {}), **kwargs)


@register_format
class SlimFormatQuantizer(CompressedFormatQuantizer):
    """Shrinks the freshly built architecture to the recorded widths; the weights then load unchanged."""

    config_class = SlimFormatConfig

    def check_checkpoint(self, model: PreTrainedModel, reader: CheckpointReader) -> None:
        """One entry of non-negative integer widths per block, none above the architecture's."""
        check_slim_widths(model, self.quantization_config.layers)

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        apply_layer_widths(model, self.quantization_config.layers)
        skip_markers_while_loading(model)
        return model

    def update_weight_conversions(self, weight_conversions: list, model: PreTrainedModel) -> list:
        return list(weight_conversions)  # the stored tensors already have the slim shapes

    def postprocess_model(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        # Detach the quantizer (the model computes like any other: Trainer, .to(dtype), PEFT) but keep the
        # widths on the config: save_pretrained must write them, or the checkpoint would not load again.
        _compat.detach_quantizer(model)
        self.forget_integrity_record()
        model.config.quantization_config = self.quantization_config
        removed_sublayer_markers(model, saved=True)  # loaded: its next save writes them (skip_markers_while_loading)
        return model


def check_slim_widths(model: PreTrainedModel, layers: Any) -> None:
    """Refuse recorded widths that do not fit the freshly built architecture (``CheckpointIntegrityError``)."""
    _, blocks = find_decoder_blocks(model)
    if not isinstance(layers, list) or len(layers) != len(blocks):
        count = len(layers) if isinstance(layers, list) else type(layers).__name__
        raise CheckpointIntegrityError(
            f"config.json records slim widths for {count} blocks but the architecture has {len(blocks)}; "
            "the checkpoint is corrupted or was edited, re-download or re-save it."
        )
    for index, (block, width) in enumerate(zip(blocks, layers)):
        structure = block_structure(block)
        limits = {"key_value_heads": structure.attention.num_units, "intermediate_size": structure.ffn.num_units}
        if not isinstance(width, dict) or set(width) != set(limits):
            raise CheckpointIntegrityError(f"config.json: slim widths of block {index} must be {sorted(limits)}, got {width!r}.")
        for key, limit in limits.items():
            value = width[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise CheckpointIntegrityError(
                    f"config.json: block {index} {key} = {value!r} is outside [0, {limit}] (the architecture's width)."
                )


def slim_record(model: PreTrainedModel) -> dict[str, Any] | None:
    """``{"layers": widths, "recipe": ...}`` of a slim model, to store inside another format's config; ``None``
    when the stock config describes the model's widths.

    Read from the ``SlimFormatConfig`` the model carries (loaded from a slim checkpoint, or after ``save_slim`` /
    ``attach_slim_format``), or from a sparse/packed config's ``slim`` entry; else measured on the model's
    ``nn.Linear`` layers (a model whose layers are already replaced, e.g. packed, must carry one of the configs).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> slim_record(tiny_model("llama")[0]) is None
        True
    """
    recorded = recorded_slim_record(model.config)
    if recorded is not None:
        return recorded
    # Widths that cannot be read (GPT-2's fused c_attn, or replaced layers) need no record: see measurable_widths.
    return {"layers": layer_widths(model), "recipe": {}} if needs_slim_format(model) else None


def recorded_slim_record(config: Any) -> dict[str, Any] | None:
    """The slim record a config carries (a slim checkpoint's ``quantization_config``, or the ``slim`` entry of a
    sparse/packed one), without a model to measure; ``None`` when it carries none.

    Example:
        >>> from hf_compress.assets import tiny_config
        >>> recorded_slim_record(tiny_config("llama")) is None
        True
    """
    existing = getattr(config, "quantization_config", None)
    if isinstance(existing, Mapping):
        method, fields = existing.get("quant_method"), dict(existing)
    else:
        method, fields = getattr(existing, "quant_method", None), dict(getattr(existing, "__dict__", {}))
    if method == FORMAT_NAME:
        return {"layers": [dict(layer) for layer in fields.get("layers", [])], "recipe": dict(fields.get("recipe") or {})}
    if isinstance(fields.get("slim"), Mapping):
        return {"layers": [dict(layer) for layer in fields["slim"]["layers"]], "recipe": dict(fields["slim"].get("recipe") or {})}
    return None


def apply_slim_record(model: PreTrainedModel, record: Mapping[str, Any] | None) -> None:
    """Check the ``slim`` entry of a sparse/packed checkpoint's config and shrink the fresh skeleton to it."""
    if record is None:
        return
    if not isinstance(record, Mapping) or "layers" not in record:
        raise CheckpointIntegrityError(f"config.json: quantization_config.slim must hold 'layers', got {record!r}.")
    check_slim_widths(model, record["layers"])
    apply_layer_widths(model, record["layers"])
    skip_markers_while_loading(model)


def skip_markers_while_loading(model: PreTrainedModel) -> None:
    """Before the weights stream into a skeleton with removed sub-blocks: their markers (``modeling.sublayers``) are
    checkpoint keys to skip quietly, not tensors of the model; the format's post-processing switches them on again
    (``removed_sublayer_markers(model, saved=True)``), so the loaded model's next save writes them."""
    markers = removed_sublayer_markers(model, saved=False)
    if markers:
        _compat.ignore_unexpected_keys(model, [rf"{re.escape(key)}$" for key in markers])


def keep_slim_widths(model: PreTrainedModel, record: Mapping[str, Any] | None) -> None:
    """Leave a ``SlimFormatConfig`` on a loaded model (as the slim format does), so a re-save stays slim."""
    if record is not None:
        model.config.quantization_config = SlimFormatConfig(layers=record["layers"], recipe=record.get("recipe"))


def attach_slim_format(model: PreTrainedModel, recipe: Mapping[str, Any] | None = None) -> SlimFormatConfig:
    """Record the model's current per-block widths on its config, so ``save_pretrained`` writes a slim checkpoint.

    Returns the ``SlimFormatConfig`` now at ``model.config.quantization_config``.
    """
    existing = getattr(model.config, "quantization_config", None)
    if existing is not None and not isinstance(existing, SlimFormatConfig):
        method = quant_method_of(existing)
        if method != FORMAT_NAME:
            raise ValueError(f"the model is quantized ({method}); slim checkpoints need float weights.")
    if recipe is None and isinstance(existing, SlimFormatConfig):
        recipe = existing.recipe
    config = SlimFormatConfig(layers=layer_widths(model), recipe=recipe)
    model.config.quantization_config = config
    return config


def sync_slim_format(model: PreTrainedModel, recipe: Mapping[str, Any] | None = None) -> SlimFormatConfig | None:
    """Make the model's config describe its widths as they are now, so ``save_pretrained`` / ``push_to_hub`` write a
    checkpoint that loads back: a ``SlimFormatConfig`` where the stock config cannot describe them, and no slim record
    where it can (one left from loading or an earlier prune would name blocks or widths the model no longer has).

    Returns the ``SlimFormatConfig`` now on the config, or ``None``.
    """
    if needs_slim_format(model):
        return attach_slim_format(model, recipe=recipe)
    if isinstance(getattr(model.config, "quantization_config", None), SlimFormatConfig):
        del model.config.quantization_config
    return None


def measurable_widths(model: PreTrainedModel) -> list[dict[str, int]] | None:
    """:func:`layer_widths`, or ``None`` where they cannot be read (GPT-2's fused ``c_attn``) and no sub-block is
    removed: such a model can only have lost whole blocks, which its config (``num_hidden_layers``) describes.

    Raises:
        ValueError: a sub-block is removed where the widths cannot be recorded (it would reload with random weights).
    """
    try:
        return layer_widths(model)
    except ValueError as err:
        _, blocks = find_decoder_blocks(model)
        if any(any(removed_sublayers(block).values()) for block in blocks):
            raise ValueError(f"{type(model).__name__} lost a sub-block, which a checkpoint cannot record ({err}). "
                             "Remove whole blocks instead (ShortGPT or SLEB).") from None
        return None


def needs_slim_format(model: PreTrainedModel) -> bool:
    """Whether the per-block widths differ from what the model's config alone describes."""
    widths = measurable_widths(model)
    if widths is None:
        return False
    config = model.config.get_text_config()  # a multimodal model's widths are its text config's
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    channels = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    expected = {"key_value_heads": kv_heads, "intermediate_size": channels}
    return any(width != expected for width in widths)


@main_process_only("save_dir")
def save_slim(
    model: PreTrainedModel,
    tokenizer: Any,
    save_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    recipe: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Save a structurally pruned model (slim format when its widths need it), tokenizer and model card.

    Written atomically (staged next to ``save_dir``, then moved; a non-empty ``save_dir`` needs
    ``overwrite=True`` and keeps the files the save does not write). The card's recipe carries the per-block
    widths, so the allocation is visible on the Hub page.

    Example:
        >>> save_slim(model, tokenizer, "smollm2-tyr-30", recipe=config.to_dict())  # doctest: +SKIP
    """
    from ..hub import base_weights_of, build_model_card, write_model_card
    from ..hub.model_card import with_earlier_pruning
    from ..utils import atomic_directory, check_save_dir

    target = check_save_dir(save_dir, overwrite)
    recipe = dict(recipe or {"method": "structured"})
    sync_slim_format(model, recipe)
    widths = measurable_widths(model)
    card_recipe, earlier_methods = with_earlier_pruning({**recipe, "layers": widths} if widths is not None else recipe,
                                                        model.config)
    with atomic_directory(target, overwrite=overwrite) as staging:
        with _compat.quiet_weight_progress():  # a second of bookkeeping: no "Writing model shards" bar
            model.save_pretrained(staging)
        if isinstance(getattr(model.config, "quantization_config", None), SlimFormatConfig):
            seal_checkpoint(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        card = build_model_card(
            base_model=base_model, model_name=model_name or target.name, recipe=card_recipe,
            base_weights=base_weights_of(model.config), extra_tags=earlier_methods,
        )
        write_model_card(staging, card)
    return target
