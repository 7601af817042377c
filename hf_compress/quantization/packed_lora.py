"""LoRA over packed low-bit layers: fine-tune a packed checkpoint with peft and ``Trainer`` (QLoRA-style).

Once ``hf_compress`` is imported, peft's LoRA adapts :class:`PackedLinear` layers like ``nn.Linear`` ones, in
``get_peft_model``, ``PeftModel.from_pretrained`` and ``load_adapter``, and ``target_modules="all-linear"``
includes them. The codes stay packed and frozen: the forward adds the adapters to the packed layer's output, and the
backward dequantizes each layer again instead of keeping its float weight (``packed_linear._DequantizedMatmul``).

The adapter's tensors have the same names and shapes as on the float model, so an adapter trained on the packed
model loads onto the float one, and the other way round.

What is refused, with the reason, before any layer is changed: LoRA variants other than
:data:`BASE_FREE_VARIANTS` (DoRA and the like) and initialisations other than :data:`SUPPORTED_INITIALIZATIONS`
(PiSSA, OLoRA, LoftQ, ... rewrite or decompose the base weight, which here is frozen codes); ``modules_to_save`` naming
a packed layer (a trainable full copy of codes); and merging, which would re-quantize the merged weight.
``model.dequantize()`` first gives float layers that merge as usual; the model's base weights stay frozen.

Example:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.quantization import quantize_rtn
    >>> model = quantize_rtn(tiny_model("llama")[0], bits=4, group_size=32)
    >>> peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    >>> type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__
    'PackedLoraLinear'
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers.pytorch_utils import Conv1D

from .. import _compat
from .packed_linear import PackedLinear


__all__ = ["BASE_FREE_VARIANTS", "PackedLoraLinear", "SUPPORTED_INITIALIZATIONS"]

SUPPORTED_INITIALIZATIONS: tuple[Any, ...] = (True, False, "gaussian", "orthogonal", "eva")
"""``LoraConfig.init_lora_weights`` values that leave the base weight alone (strings in any case); the others rewrite
or decompose it."""

BASE_FREE_VARIANTS: tuple[str, ...] = ("ALoraLinearVariant",)
"""peft LoRA variants (class names) whose forward adds to the base layer's output without reading its weight:
aLoRA only masks the positions the adapter acts on."""

_MERGE_HINT = ("LoRA cannot be merged into packed low-bit codes without re-quantizing the merged weight. Call "
               "`model.dequantize()` first (its packed layers become float ones), then merge; or keep the adapter "
               "separate (it loads onto the packed model and onto the float one alike).")


class PackedLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` with a :class:`PackedLinear` as its base layer.

    The forward, mixed-batch ``adapter_names``, dropout, rsLoRA and ``lora_bias`` are peft's own; only merging and the
    base-weight-dependent options differ (see the module docstring).

    Example:
        >>> from peft import LoraConfig
        >>> from hf_compress.quantization.grid import QuantizationGrid
        >>> w = torch.randn(8, 16)
        >>> grid = QuantizationGrid.fit(w, bits=4, group_size=8)
        >>> packed = PackedLinear.from_codes(grid.quantize(w), grid.scale, grid.zero, bits=4, group_size=8)
        >>> layer = PackedLoraLinear(packed, "default", config=LoraConfig(r=2), r=2, lora_alpha=4)
        >>> x = torch.randn(3, 16)
        >>> bool(torch.equal(layer(x), packed(x)))  # lora_B starts at zero
        True
    """

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # peft warns "proceed at your own risk" for each layer type it does not list
            warnings.filterwarnings("ignore", message=r"Unsupported layer type .*PackedLinear", category=UserWarning)
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def fan_in_fan_out(self) -> bool:
        # A packed layer computes x @ W.T with W [out, in], even where it stands for GPT-2's Conv1D; once
        # dequantize() has rebuilt the Conv1D ([in, out]), peft must transpose again (merging, DoRA's weight norm).
        return isinstance(self.get_base_layer(), Conv1D)

    @fan_in_fan_out.setter
    def fan_in_fan_out(self, value: bool) -> None:
        pass  # peft sets the config's value; the base layer decides (above)

    @classmethod
    def check_config(cls, config: Any, saved: Sequence[str] = ()) -> None:
        """Raise ``ValueError`` if ``config`` asks for what a packed layer cannot take.

        ``saved``: the packed layers ``config.modules_to_save`` names. Run before peft changes any layer
        (``_compat.register_lora_layer``): peft checks each layer only as it adapts it, so a refusal at the first
        packed layer would leave the layers before it (embeddings, layers kept in float) already adapted.
        """
        if saved:
            raise ValueError(f"modules_to_save names packed low-bit layers ({', '.join(saved[:3])}"
                             f"{', ...' if len(saved) > 3 else ''}): peft would train a full copy of each, and a "
                             "packed layer has no float weight to train or save. Target them with LoRA instead "
                             "(target_modules), or call `model.dequantize()` first to train them in full.")
        probe = PackedLinear(8, 8, bits=4, group_size=8, bias=True)  # with a bias: lora_bias=True warns without one
        with torch.random.fork_rng(devices=[]):  # the probe's init must not move the seed the real adapters draw from
            cls(probe, "probe", config=config, r=8, lora_alpha=8)

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Any:
        # peft resolves the variant on every adapter added to the layer, before initialising it: check each one here.
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if not isinstance(self.get_base_layer(), PackedLinear):  # dequantize() replaced the codes by a float layer
            return variant
        init = config.init_lora_weights
        if not any(init is allowed or (isinstance(init, str) and isinstance(allowed, str) and init.lower() == allowed)
                   for allowed in SUPPORTED_INITIALIZATIONS):
            raise ValueError(f"LoRA on a packed low-bit layer supports init_lora_weights in {SUPPORTED_INITIALIZATIONS}, "
                             f"got {init!r}: it rewrites or decomposes the base weight, which here is frozen packed "
                             "codes. Use the default (init_lora_weights=True).")
        if variant is not None and type(variant).__name__ not in BASE_FREE_VARIANTS:
            raise ValueError(f"LoRA on a packed low-bit layer supports plain LoRA and aLoRA only, not "
                             f"{type(variant).__name__} (DoRA and the other variants read, rescale or decompose the "
                             "base weight, or are not checked on packed layers). Train it on the float model, or drop "
                             "the variant (e.g. use_dora=False).")
        return variant

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if isinstance(base, PackedLinear):
            raise ValueError(_MERGE_HINT)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


def _packed_weights(layer: torch.nn.Module) -> int:
    return layer.in_features * layer.out_features if isinstance(layer, PackedLinear) else 0


_compat.register_lora_layer(PackedLinear, PackedLoraLinear, check_config=PackedLoraLinear.check_config)
# The codes are buffers: without this, print_trainable_parameters() shows a packed model 3x smaller than it is.
_compat.register_weight_counter(_packed_weights)
