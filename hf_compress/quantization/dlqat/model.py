"""``DLQATModel``: the PEFT tuner that injects DL-QAT layers, checks adapters on load, and exports.

Users meet it through PEFT: ``get_peft_model(base, DLQATConfig(...))`` returns a ``PeftModel`` whose
``base_model`` is a ``DLQATModel``. Everything LoRA users know works the same way:
``print_trainable_parameters``, ``save_pretrained``, ``PeftModel.from_pretrained``, ``load_adapter``,
``set_adapter``, ``disable_adapter()``, ``merge_and_unload()`` (a float model on the quantized grid) and
``push_to_hub``. It adds ``merge_and_quantize()``, which returns the base transformers model with
real packed low-bit ``PackedLinear`` layers (``hf_compress_packed`` format): sparse ones (mask + the codes
of the kept weights) for the layers whose pruned zeros the adapter kept (``DLQATConfig.keep_sparsity``).

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.quantization import DLQATConfig
    >>> base, _ = tiny_model("llama")
    >>> model = get_peft_model(base, DLQATConfig(bits=3, group_size=32, r=4))
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> fake_quant = model(ids).logits
    >>> packed = model.merge_and_quantize()
    >>> bool(torch.allclose(packed(ids).logits, fake_quant, atol=1e-5))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from transformers.pytorch_utils import Conv1D

from ... import _compat
from ...modeling import replace_module
from ...modeling.layers import check_not_offloaded, computes_linear, is_linear
from ...utils import get_logger, progress_bar
from ...formats.packed import PackedFormatConfig, attach_packed_format, check_not_packed
from ...formats.slim import slim_record
from ...hub.model_card import hub_model_id
from ...modeling.fused_experts import warn_fused_experts_untouched
from ...routing.layer import check_not_routed
from ..packed_linear import PackedLinear
from ..rtn import ROUTED_HINT
from .config import DLQATConfig
from ...modeling.identity import fingerprints_match
from .layer import DLQATLayer, DLQATLinear


__all__ = ["DLQATModel"]

logger = get_logger(__name__)


class DLQATModel(BaseTuner):
    """PEFT tuner for DL-QAT (weight-decomposed low-rank quantization-aware training, arXiv 2504.09223).

    Args:
        model: the transformers model to adapt.
        config: the ``DLQATConfig``.
        adapter_name: name of the adapter (``"default"``).
    """

    prefix: str = "dlqat_"
    tuner_layer_cls = DLQATLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: DLQATConfig, model_config: dict) -> DLQATConfig:
        # Quantizing only q/v (LoRA's default targets) would leave most of the model in full precision.
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        if peft_config.layers_to_transform is not None and _is_all_linear(peft_config.target_modules):
            # PEFT expands "all-linear" to full module names, which it matches without looking at
            # layers_to_transform (on a model with fewer than 20 linear layers): name the layers by their last
            # component instead, which PEFT matches together with the layer index.
            peft_config.target_modules = _linear_leaf_names(self.model)
        return peft_config

    def _create_and_replace(
        self,
        dlqat_config: DLQATConfig,
        adapter_name: str,
        target: torch.nn.Module,
        target_name: str,
        parent: torch.nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, DLQATLinear):
            target.update_layer(adapter_name, dlqat_config)
            return
        if isinstance(target, BaseTunerLayer):
            # Wrapping only its base layer would silently drop the other method's adapter.
            raise ValueError(
                f"{current_key} already carries an adapter of another PEFT method ({type(target).__module__}."
                f"{type(target).__name__}); DL-QAT "
                "quantizes the base weight and cannot be stacked on it. Merge that adapter into the model first "
                "(model = peft_model.merge_and_unload()), then apply DL-QAT to the merged model."
            )
        if not is_linear(target):  # peft's LoRA adapts embeddings and convolutions too: say why this one does not
            raise TypeError(
                f"DL-QAT quantizes nn.Linear and transformers Conv1D layers; {current_key} "
                f"({type(target).__name__}) is neither: remove it from target_modules (or use exclude_modules)."
            )
        if not computes_linear(target):
            # A router that subclasses nn.Linear (Phi-MoE, Llama 4) returns routing decisions, not x·Wᵀ: the adapter's
            # forward would break the model. It stays as it is, as peft leaves any module it cannot adapt.
            logger.warning("DL-QAT leaves %s (%s) unadapted: it computes something other than a linear map",
                           current_key, type(target).__name__)
            return
        new_module = DLQATLinear(target, adapter_name, dlqat_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a second adapter is not trainable until set_adapter
        _compat.replace_tuner_module(self, parent, target_name, new_module, target)

    def _pre_injection_hook(self, model: torch.nn.Module, config: DLQATConfig, adapter_name: str) -> None:
        # W0 is read at once (the grid is fitted to it, merging writes it): offloaded weights are on 'meta'.
        check_not_offloaded(model, "DL-QAT")
        # "all-linear" skips packed layers: peft would only say that no target module matched.
        check_not_packed(model, "put the DL-QAT adapter on the float model instead")
        check_not_routed(model, ROUTED_HINT)
        warn_fused_experts_untouched(model, "DL-QAT")  # its grid and adapter wrap nn.Linear layers
        # A slim model's widths are measured on its nn.Linear layers, which the injection is about to wrap.
        if getattr(self, "_slim_widths", None) is None:
            self._slim_widths = slim_record(model)

    def _post_injection_hook(self, model: torch.nn.Module, config: DLQATConfig, adapter_name: str) -> None:
        group = config.group_size
        ragged = sorted({
            m.in_features for m in model.modules()
            if isinstance(m, DLQATLayer) and adapter_name in m.dlqat_settings and group != -1
            and group < m.in_features and m.in_features % group
        })
        if ragged:
            logger.info(
                "group_size %d does not divide in_features %s: the last group of each row is shorter and gets "
                "its own scale (e.g. %d = %d x %d + %d).", group, ragged, ragged[0], ragged[0] // group, group,
                ragged[0] % group,
            )

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: torch.nn.Module, config: DLQATConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_fingerprints(model, adapter_name, remapped)
        return remapped

    # ----------------------------------------------------------------------------------------------
    # Merging into a head tied to the input embedding
    # ----------------------------------------------------------------------------------------------

    def _tied_layers(self, adapter_names: list[str] | None) -> list[tuple[str, DLQATLayer]]:
        """The DL-QAT layers of ``adapter_names`` (default: the active ones) whose base weight is the input embedding's."""
        embedding = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        shared = getattr(embedding, "weight", None)
        if shared is None:
            return []
        adapters = set(adapter_names or self.active_adapters)
        return [
            (name, m) for name, m in self.model.named_modules()
            if isinstance(m, DLQATLayer) and adapters & m.dlqat_settings.keys() and m.get_base_layer().weight is shared
        ]

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft calls this around every forward and generate with their keywords: ``adapter_names=`` (one adapter
        per row, as LoRA does) is refused, since the DL-QAT layers would run every row with the active adapter."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "DL-QAT runs one adapter per forward, not one per row: adapter_names= would be ignored and every row "
                "run with the active adapter. Call set_adapter(name) and run each adapter's rows apart."
            )
        yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        tied = self._tied_layers(adapter_names)
        if tied:
            raise ValueError(
                f"{tied[0][0]} shares its weight with the input embedding (tie_word_embeddings): merging the DL-QAT "
                "adapter into it would quantize the embedding too. Use merge_and_unload() or merge_and_quantize() "
                "(both untie the head), or load the base model with tie_word_embeddings=False."
            )
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> torch.nn.Module:
        for name, layer in self._tied_layers(adapter_names):  # the head gets its own copy: the embedding stays W0
            base = layer.get_base_layer()
            base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=base.weight.requires_grad)
            logger.info("%s no longer shares the input embedding's weight, so that merging leaves the embedding as is", name)
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        _untie_diverged_embeddings(model)
        return model

    # ----------------------------------------------------------------------------------------------
    # Export
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge_and_quantize(
        self, adapter_name: str | None = None, progressbar: bool = False
    ) -> torch.nn.Module:
        """Fold the adapter into integer codes and return the base model with packed ``PackedLinear`` layers.

        Every DL-QAT layer becomes a ``PackedLinear`` holding ``codes = clamp(round(W0/s + BA) + z)`` packed
        to ``bits`` bits, ``scales = alpha * s`` and the zero-points; its outputs equal the fake-quantized
        layer's up to float rounding. Other adapters are dropped, like ``merge_and_unload``: use the
        returned model, not this one. ``save_pretrained`` on it writes an ``hf_compress_packed`` checkpoint
        that ``AutoModelForCausalLM.from_pretrained`` loads after ``import hf_compress``.

        Args:
            adapter_name: the adapter to export; defaults to the active one.
            progressbar: show a progress bar over the layers.
        """
        adapter = adapter_name or self._the_active_adapter()
        if adapter not in self.peft_config:
            raise ValueError(f"No adapter named {adapter!r}; loaded adapters: {sorted(self.peft_config)}.")
        config = self.peft_config[adapter]
        if not isinstance(config, DLQATConfig):
            raise TypeError(f"adapter {adapter!r} is not a DL-QAT adapter.")
        check_not_packed(self.model, "put the DL-QAT adapter on the float model instead (all layers at once)")
        check_not_routed(self.model, ROUTED_HINT)
        layers = [(name, m) for name, m in self.model.named_modules() if isinstance(m, DLQATLayer)]
        broken = next((f"{name}.{tensor}" for name, layer in layers for tensor in _non_finite(layer, adapter)), None)
        if broken is not None:  # before any layer is packed: a refused model stays as it came
            raise ValueError(f"{broken} is not finite (NaN or inf): the adapter diverged or the base model is broken; "
                             "retrain with a lower learning rate (or check the base model) before exporting.")
        names = []
        layers.reverse()  # popped in model order, so each replaced layer (its float W0) is freed before the next is packed
        for _ in progress_bar(range(len(layers)), desc="Packing DL-QAT layers", disable=not progressbar):
            name, layer = layers.pop()
            if layer.merged:
                layer.unmerge()
            base = layer.get_base_layer()
            if adapter not in layer.dlqat_settings:  # not targeted by this adapter: back to the plain layer
                replace_module(self.model, name, base)
                continue
            codes, scales, zeros = layer.export_codes(adapter)
            dtype = base.weight.dtype
            packed = PackedLinear.from_codes(
                codes, scales, zeros, config.bits, config.group_size, bias=base.bias,
                dtype=dtype if dtype.is_floating_point else torch.float32,  # the model's own (as quantize_rtn)
                mask=layer.sparsity_mask(adapter),
            )
            packed.replaces_conv1d = isinstance(base, Conv1D)
            replace_module(self.model, name, packed)  # built on the codes' device, the layer's own
            names.append(name)
        _unwrap_auxiliary_modules(self.model, adapter)
        _untie_diverged_embeddings(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        recipe = {"method": "dlqat", "adapter": config.to_dict()}
        recipe["adapter"] = {k: v for k, v in recipe["adapter"].items() if _json_scalar(v)}
        # The checkpoint names its base model by Hub id only, never by a local path (None without one).
        recipe["adapter"]["base_model_name_or_path"] = hub_model_id(config.base_model_name_or_path)
        format_config = PackedFormatConfig(config.bits, config.group_size, config.symmetric, names, recipe,
                                           slim=getattr(self, "_slim_widths", None) or slim_record(self.model))
        logger.info("packed %d layers to %d bits (group size %s)", len(names), config.bits, config.group_size)
        return attach_packed_format(self.model, format_config)

    def _the_active_adapter(self) -> str:
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(f"Pass adapter_name: {len(active)} adapters are active ({active}).")
        return active[0]


def _is_all_linear(target_modules: Any) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == "all-linear"


def _linear_leaf_names(model: torch.nn.Module) -> set[str]:
    """Last name components of the model's linear layers but the output head, as "all-linear" picks them (an adapted
    layer counts as its base layer)."""
    tuner_layers = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        inside_tuner = any(name.startswith(prefix + ".") for prefix in tuner_layers)
        is_head = head is not None and (module is head or (isinstance(module, BaseTunerLayer) and module.get_base_layer() is head))
        if name and not inside_tuner and not is_head and (isinstance(module, BaseTunerLayer) or is_linear(module)):
            names.add(name.rsplit(".", 1)[-1])
    return names


def _json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _check_fingerprints(model: torch.nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter trained on another base model (its grid would not match these weights)."""
    mismatched = []
    for name, module in model.named_modules():
        if not isinstance(module, DLQATLayer) or adapter_name not in module.dlqat_fingerprint:
            continue
        key = f"{name}.dlqat_fingerprint.{adapter_name}"
        saved = state_dict.get(key)
        if saved is None:
            saved = state_dict.get(key.removeprefix("base_model.model."))
        if saved is not None and not fingerprints_match(saved, module.dlqat_fingerprint[adapter_name]):
            mismatched.append(name.removeprefix("base_model.model."))
    if mismatched:
        raise ValueError(
            f"This DL-QAT adapter was trained on a different base model: the weights of {len(mismatched)} "
            f"layer(s) (e.g. {mismatched[0]}) do not match the ones it was fitted to. Load it onto the base "
            "model named in its adapter_config.json (base_model_name_or_path)."
        )


def _non_finite(layer: DLQATLayer, adapter: str) -> list[str]:
    """Names of the tensors ``adapter``'s export reads from ``layer`` (its own and the base weight) holding NaN or inf."""
    tensors = [*layer.named_parameters(), *layer.named_buffers()]
    return [name for name, tensor in tensors
            if (adapter in name.split(".") or name.startswith("base_layer.")) and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())]


def _unwrap_auxiliary_modules(model: torch.nn.Module, adapter: str) -> None:
    """Replace peft's auxiliary wrappers (``modules_to_save``, trainable tokens) by the modules ``adapter`` trained,
    as ``merge_and_unload`` does: a wrapper left in place would save under its own keys, which no model loads."""
    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    for name, wrapper in wrappers:
        if isinstance(wrapper, ModulesToSaveWrapper):
            trained = wrapper.modules_to_save
            module = trained[adapter] if adapter in trained else wrapper.original_module
        else:
            module = wrapper.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=[adapter])
        replace_module(model, name, module)


def _untie_diverged_embeddings(model: torch.nn.Module) -> None:
    """Set ``tie_word_embeddings=False`` once the output layer no longer shares the input embedding's weight (a packed
    or separately trained head): transformers would otherwise tie a packed layer to the embedding at load."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config()) if getattr(c, "tie_word_embeddings", False)}
    if not configs:
        return
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    weight = getattr(output, "weight", None)
    if output is None or (isinstance(weight, torch.nn.Parameter) and weight is getattr(embedding, "weight", None)):
        return
    for config in configs.values():
        config.tie_word_embeddings = False
    logger.info("the output layer no longer shares the input embedding's weight: tie_word_embeddings=False")

