"""``hf_compress_routed``: a token-routed model saved as an ordinary HF folder + router weights + schedule.

The folder is what ``save_pretrained`` writes for the base architecture (same ``model_type``, same weight names),
plus the router's few hundred parameters in the same safetensors file (``<decoder>.token_router.*``) and the
schedule in ``config.json``::

    {"quant_method": "hf_compress_routed", "block_sparsity": [0.1, 0.35, ...], "mode": "router",
     "router_hidden_size": 64, "router_features": 2, "route_decode": false, "recipe": {...}}

After ``import hf_compress``, ``AutoModelForCausalLM.from_pretrained(folder)`` builds the architecture, installs
routing (so the router's weights stream in with the rest, checksummed like every hf_compress checkpoint), and
returns the routed model. Stock transformers without hf_compress does not refuse the folder: it warns "Unknown
quantization type, got hf_compress_routed", lists the router's tensors as UNEXPECTED and returns the dense base model,
which computes every token (the base's outputs, none of the routing's speed). Making it refuse would take storing a
base tensor in another shape, which every ``state_dict`` consumer (Trainer checkpoints, PEFT) would then meet.

Example:
    >>> import hf_compress  # doctest: +SKIP
    >>> save_routed(routed, tokenizer, "smollm2-routed-30")  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("smollm2-routed-30")  # same logits  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _compat
from ..formats.base import CompressedFormatConfig, CompressedFormatQuantizer, quant_method_of, register_format
from ..formats.integrity import CheckpointIntegrityError, CheckpointReader, seal_checkpoint
from ..modeling.layers import find_decoder_blocks
from ..utils.processes import main_process_only
from .layer import ROUTING_MODES, install_routing, routing_state
from .router import ROUTER_FEATURES_VERSION
from .schedule import RoutingSchedule


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = ["FORMAT_NAME", "RoutedFormatConfig", "RoutedFormatQuantizer", "attach_routed_format", "save_routed"]

FORMAT_NAME = "hf_compress_routed"


class RoutedFormatConfig(CompressedFormatConfig):
    """``quantization_config`` of a routed checkpoint: the schedule, the ranking mode and the router's size.

    ``router_features`` is the :data:`~hf_compress.routing.router.ROUTER_FEATURES_VERSION` the router was trained
    on; a folder without it predates the versioning (version 1).
    """

    QUANT_METHOD = FORMAT_NAME

    def __init__(
        self,
        block_sparsity: list[float] | None = None,
        mode: str = "router",
        router_hidden_size: int = 64,
        route_decode: bool = False,
        recipe: Mapping[str, Any] | None = None,
        router_features: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            block_sparsity=list(block_sparsity or []), mode=mode, router_hidden_size=int(router_hidden_size),
            route_decode=bool(route_decode), recipe=dict(recipe or {}), router_features=router_features, **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        # Attached to a live model, the routing state is the truth (the schedule or mode may have changed since).
        values = dict(self.__dict__)
        state = values.pop("_state", None)
        self.__dict__.pop("_state", None)
        try:
            result = super().to_dict()
        finally:
            if state is not None:
                self.__dict__["_state"] = state
        if state is not None:
            result.update(block_sparsity=list(state.schedule.block_sparsity), mode=state.mode,
                          route_decode=state.route_decode)
        return result


@register_format
class RoutedFormatQuantizer(CompressedFormatQuantizer):
    """Installs routing on the freshly built architecture; the router's weights then load with the others."""

    config_class = RoutedFormatConfig

    def check_checkpoint(self, model: PreTrainedModel, reader: CheckpointReader) -> None:
        config = self.quantization_config
        _, blocks = find_decoder_blocks(model)
        sparsity = config.block_sparsity
        if not isinstance(sparsity, list) or len(sparsity) != len(blocks):
            count = len(sparsity) if isinstance(sparsity, list) else type(sparsity).__name__
            raise CheckpointIntegrityError(
                f"config.json records a routing schedule for {count} blocks but the architecture has {len(blocks)}; "
                "the checkpoint is corrupted or was edited, re-download or re-save it."
            )
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1 for r in sparsity):
            raise CheckpointIntegrityError(f"config.json: block_sparsity entries must be numbers in [0, 1), got {sparsity!r}.")
        if config.mode not in ROUTING_MODES:
            raise CheckpointIntegrityError(f"config.json: routing mode must be one of {ROUTING_MODES}, got {config.mode!r}.")
        if config.mode == "router" and config.router_features != ROUTER_FEATURES_VERSION:
            raise CheckpointIntegrityError(
                f"this router was trained on router features version {config.router_features!r}; this hf_compress "
                f"computes version {ROUTER_FEATURES_VERSION} and would route wrongly with it. Retrain the router "
                "(train_token_router / hf-compress route), or load with the hf_compress release that saved it."
            )

    def prepare_model(self, model: PreTrainedModel) -> PreTrainedModel:
        config = self.quantization_config
        install_routing(
            model, RoutingSchedule(list(config.block_sparsity)), mode=config.mode,
            router_hidden_size=config.router_hidden_size, route_decode=config.route_decode,
        )
        return model

    def update_weight_conversions(self, weight_conversions: list, model: PreTrainedModel) -> list:
        return list(weight_conversions)  # every tensor is stored as the model holds it

    def postprocess_model(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        # An ordinary model from here on (Trainer, .to(dtype), PEFT); the schedule stays on the config so that
        # save_pretrained writes a routed checkpoint again.
        _compat.detach_quantizer(model)
        self.forget_integrity_record()
        model.config.quantization_config = self.quantization_config
        self.quantization_config.__dict__["_state"] = routing_state(model)
        return model


def attach_routed_format(model: PreTrainedModel, recipe: Mapping[str, Any] | None = None) -> RoutedFormatConfig:
    """Record the model's routing on its config, so ``save_pretrained`` writes a routed checkpoint."""
    state = routing_state(model)
    if state is None:
        raise ValueError("the model has no token routing; build one with search_schedule / train_token_router.")
    existing = getattr(model.config, "quantization_config", None)
    method = quant_method_of(existing)
    if existing is not None and method != FORMAT_NAME:
        from ..formats.slim import FORMAT_NAME as SLIM_FORMAT

        if method == SLIM_FORMAT:  # float weights, but blocks of their own widths, which this format cannot record
            raise ValueError("the model's blocks were narrowed by a structured prune (Týr: the hf_compress_slim format), "
                             "and a routed checkpoint cannot record their widths yet; route the dense model, or remove "
                             "whole blocks instead (block_removal), which a routed checkpoint stores.")
        raise ValueError(f"the model is already in the {method} format; token routing needs a float model.")
    config = RoutedFormatConfig(
        block_sparsity=state.schedule.block_sparsity, mode=state.mode,
        router_hidden_size=state.router.hidden.out_features, route_decode=state.route_decode,
        router_features=ROUTER_FEATURES_VERSION, recipe=recipe if recipe is not None else _recorded_recipe(model),
    )
    config.__dict__["_state"] = state
    model.config.quantization_config = config
    return config


def _recorded_recipe(model: PreTrainedModel) -> Mapping[str, Any] | None:
    """The recipe a routed model loaded from a folder carries (its ``quantization_config.recipe``), if any."""
    existing = getattr(model.config, "quantization_config", None)
    return existing.get("recipe") if isinstance(existing, Mapping) else getattr(existing, "recipe", None)


@main_process_only("save_dir")
def save_routed(
    model: PreTrainedModel,
    tokenizer: Any,
    save_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    recipe: Mapping[str, Any] | None = None,
    metrics: list | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Save a routed model (weights + router + schedule), its tokenizer and a model card, atomically.

    The card's recipe carries the per-block schedule and how it was found; ``metrics`` (measured
    ``MetricRecord``\\ s) fill its results table.

    Example:
        >>> save_routed(routed, tokenizer, "smollm2-routed-30")  # doctest: +SKIP
    """
    from ..hub import base_weights_of, build_model_card, write_model_card
    from ..utils import atomic_directory, check_save_dir

    target = check_save_dir(save_dir, overwrite)
    state = routing_state(model)
    if state is None:
        raise ValueError("the model has no token routing; build one with search_schedule / train_token_router.")
    # No recipe given (a routed folder loaded and saved again, e.g. by a recipe that adds heads): keep the one it
    # was saved with, so its sparsity and router settings stay on record.
    recipe = {"method": "token_router", **dict((recipe if recipe is not None else _recorded_recipe(model)) or {})}
    attach_routed_format(model, recipe=recipe)
    card_recipe = {
        **recipe, "mode": state.mode, "block_sparsity": [round(r, 4) for r in state.schedule.block_sparsity],
        "mean_block_sparsity": round(state.schedule.mean_sparsity, 4), "schedule_search": state.schedule.search,
        "router_parameters": sum(p.numel() for p in state.router.parameters()),
    }
    with atomic_directory(target, overwrite=overwrite) as staging:
        with _compat.quiet_weight_progress():
            model.save_pretrained(staging)
        seal_checkpoint(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        card = build_model_card(
            base_model=base_model, model_name=model_name or target.name, recipe=card_recipe, metrics=metrics or (),
            base_weights=base_weights_of(model.config),
        )
        write_model_card(staging, card)
    return target
