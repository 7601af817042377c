"""The DL-QAT tuner layer: a linear layer whose weight is fake-quantized through a trainable grid.

For the active adapter the forward pass builds (see ``DLQATConfig`` for the formula)::

    W_hat = columns(alpha * scale) * (round_clamp_ste(W0 / scale + s * B @ A, zero) - zero)

and computes ``x @ W_hat.T + bias``. ``W0`` (the base layer's weight), ``scale`` and ``zero`` are
frozen; ``A``, ``B`` and ``alpha`` train. The arithmetic runs in float32 whatever the base dtype, and
its result is cast to the input's dtype for the matmul. ``scale``/``zero`` are recomputed from ``W0``
whenever the adapter is created or loaded (and when a cast such as ``model.to(torch.bfloat16)`` changes W0), so
they are not stored in the adapter. What is stored is
a four-number *fingerprint* of ``W0``, so an adapter loaded onto a different base model is refused.

On a pruned base (``DLQATConfig.keep_sparsity``) the codes of ``W0``'s exact zeros are pinned to the
zero-point: their weights stay exactly 0 whatever A, B and alpha become, and ``merge_and_quantize()`` exports
the mask with the codes (``PackedLinear``'s sparse form). The mask is ``W0 != 0`` of the frozen base, so it is
never stored in the adapter either.

A DL-QAT adapter *replaces* the weight rather than adding to it, so only one adapter can be active at
a time (``set_adapter`` switches between several loaded ones); ``disable_adapter()`` gives the
full-precision base layer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hf_compress.quantization import DLQATConfig
    >>> layer = DLQATLinear(nn.Linear(16, 4), "default", DLQATConfig(bits=4, group_size=8, r=2))
    >>> x = torch.randn(3, 16)
    >>> rtn = layer.get_base_layer()(x)  # full precision
    >>> bool(torch.allclose(layer(x), x @ layer.quantized_weight("default").T + layer.base_layer.bias))
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ... import _compat
from ...modeling.identity import fingerprints_match, weight_fingerprint
from ...modeling.layers import in_features, is_linear, out_features, set_weight_matrix, weight_matrix
from ..grid import QuantizationGrid, group_index, keeps_sparsity, round_clamp_ste
from .config import DLQATConfig


BufferDict = _compat.peft_buffer_dict()


__all__ = ["DLQATLayer", "DLQATLinear", "LayerQuantization"]


@dataclass(frozen=True)
class LayerQuantization:
    """The per-adapter settings a layer needs at run time (taken from its ``DLQATConfig``)."""

    bits: int
    group_size: int
    symmetric: bool
    lora_space: str
    scaling: float
    use_lora: bool
    use_magnitude: bool

    @classmethod
    def from_config(cls, config: DLQATConfig) -> LayerQuantization:
        return cls(
            bits=config.bits,
            group_size=config.group_size,
            symmetric=config.symmetric,
            lora_space=config.lora_space,
            scaling=config.scaling if config.use_lora else 0.0,
            use_lora=config.use_lora,
            use_magnitude=config.use_magnitude,
        )


class DLQATLayer(BaseTunerLayer):
    """State of DL-QAT adapters on one linear layer (``nn.Linear`` or transformers ``Conv1D``)."""

    adapter_layer_names = ("dlqat_A", "dlqat_B", "dlqat_magnitude")
    other_param_names = ("dlqat_scale", "dlqat_zero", "dlqat_fingerprint", "dlqat_settings", "dlqat_sparse",
                         "dlqat_grid_dtype")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.dlqat_A = nn.ParameterDict({})
        self.dlqat_B = nn.ParameterDict({})
        self.dlqat_magnitude = nn.ParameterDict({})
        # The grid is a function of W0 and the config: recomputed on load, never saved.
        self.dlqat_scale = BufferDict({}, persistent=False)
        self.dlqat_zero = BufferDict({}, persistent=False)
        self.dlqat_fingerprint = BufferDict({}, persistent=True)
        self.dlqat_settings: dict[str, LayerQuantization] = {}
        self.dlqat_sparse: dict[str, bool] = {}  # per adapter: the base's zeros stay fixed (keep_sparsity)
        self.dlqat_grid_dtype: dict[str, torch.dtype] = {}  # per adapter: the dtype of the W0 its grid was fitted on
        self._fingerprints_checked: dict[str, tuple[torch.Tensor, int | None]] = {}  # adapter -> (tensor, version)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._weight_before_merge: torch.Tensor | None = None
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not is_linear(base):
            raise TypeError(
                f"DL-QAT adapts nn.Linear and transformers Conv1D layers, not {type(base).__name__}; "
                "remove it from target_modules."
            )
        self.in_features, self.out_features = in_features(base), out_features(base)

    def update_layer(self, adapter_name: str, config: DLQATConfig, **kwargs: Any) -> None:
        """Add (or re-initialise) the adapter ``adapter_name`` with ``config``."""
        settings = LayerQuantization.from_config(config)
        w0 = self.base_weight()  # the unmerged W0, also while another adapter is merged into the layer
        grid = QuantizationGrid.fit(w0, config.bits, config.group_size, config.symmetric)
        self.dlqat_settings[adapter_name] = settings
        self.dlqat_sparse[adapter_name] = keeps_sparsity(w0, config.keep_sparsity)
        if config.use_lora:
            self.dlqat_A[adapter_name] = nn.Parameter(torch.empty(config.r, self.in_features, device=w0.device))
            self.dlqat_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, config.r, device=w0.device))
        if config.use_magnitude:
            self.dlqat_magnitude[adapter_name] = nn.Parameter(torch.ones_like(grid.scale))
        self.reset_dlqat_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        # Added after that move on purpose: PEFT also casts adapter tensors to the base layer's dtype, but
        # the frozen grid must stay float32 (a bf16-rounded scale would shift codes off the min-max grid).
        # It was fitted on W0's device, so it is already where the layer runs.
        self.dlqat_scale[adapter_name] = grid.scale
        self.dlqat_zero[adapter_name] = grid.zero
        self.dlqat_grid_dtype[adapter_name] = w0.dtype
        self.dlqat_fingerprint[adapter_name] = weight_fingerprint(w0)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_dlqat_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        with torch.no_grad():
            if adapter_name in self.dlqat_A:
                nn.init.kaiming_uniform_(self.dlqat_A[adapter_name], a=math.sqrt(5))
                if init_weights:
                    nn.init.zeros_(self.dlqat_B[adapter_name])
                else:
                    nn.init.normal_(self.dlqat_B[adapter_name], std=1.0)
            if adapter_name in self.dlqat_magnitude:
                magnitude = self.dlqat_magnitude[adapter_name]
                magnitude.fill_(1.0)
                if not init_weights:
                    magnitude.add_(0.1 * torch.randn_like(magnitude))

    # ----------------------------------------------------------------------------------------------
    # The quantized weight
    # ----------------------------------------------------------------------------------------------

    def base_weight(self) -> torch.Tensor:
        """``W0`` as ``[out, in]``: the base layer's weight, or the one set aside while an adapter is merged into it
        (the grid, the sparsity mask and the codes are functions of ``W0``, never of a merged ``W_hat``)."""
        if self._weight_before_merge is not None:
            return self._weight_before_merge
        return weight_matrix(self.get_base_layer())

    def _check_fingerprint(self, adapter: str) -> None:
        """Refuse, at its first use, an adapter whose weights were fitted to another base model's ``W0``.

        ``PeftModel.from_pretrained`` checks every layer as it loads (``DLQATModel``), but transformers' own adapter
        loading (``model.load_adapter()``, ``from_pretrained`` of an adapter folder) writes the weights itself: the
        check runs here too, once per loaded fingerprint (the buffer's identity and version say whether it is new).
        """
        if torch.compiler.is_compiling():  # not traceable (dynamo refuses is_inference()); eager calls check
            return
        stored = self.dlqat_fingerprint[adapter]
        version = None if stored.is_inference() else stored._version
        checked = self._fingerprints_checked.get(adapter)
        if checked is not None and checked[0] is stored and checked[1] == version:
            return
        w0 = self.base_weight()
        if not w0.is_meta and not fingerprints_match(stored, weight_fingerprint(w0)):
            raise ValueError(
                f"This DL-QAT adapter ({adapter!r}) was trained on a different base model: the weights of this "
                f"{type(self.get_base_layer()).__name__} ({self.out_features} x {self.in_features}) do not match the ones "
                "it was fitted to. Load it onto the base model named in its adapter_config.json (base_model_name_or_path)."
            )
        self._fingerprints_checked[adapter] = (stored, version)

    def _codes(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, zero_columns, scale_per_group, index)``: the integer codes (STE-differentiable), the
        zero-points per column, the trained scale ``alpha * s`` per group, and each column's group."""
        settings = self.dlqat_settings[adapter]
        self._check_fingerprint(adapter)
        w0 = self.base_weight().float()
        index = group_index(self.in_features, settings.group_size, w0.device)
        scale = self.dlqat_scale[adapter]
        scale_columns = scale.index_select(1, index)
        if settings.use_lora:
            delta = settings.scaling * (self.dlqat_B[adapter].float() @ self.dlqat_A[adapter].float())
            if settings.lora_space == "quantization":
                values = w0 / scale_columns + delta
            else:
                values = (w0 + delta) / scale_columns
        else:
            values = w0 / scale_columns
        if settings.use_magnitude:
            scale = scale * self.dlqat_magnitude[adapter].float()
        zero_columns = self.dlqat_zero[adapter].index_select(1, index)
        codes = round_clamp_ste(values, zero_columns, 2**settings.bits - 1)
        if self.dlqat_sparse.get(adapter, False):
            # Pinned to the zero-point, a pruned weight dequantizes to exactly 0 (and gets no gradient).
            codes = torch.where(w0 != 0, codes, zero_columns)
        return codes, zero_columns, scale, index

    def sparsity_mask(self, adapter: str) -> torch.Tensor | None:
        """The fixed ``[out, in]`` mask of kept weights (``W0 != 0``) when ``adapter`` keeps the sparsity, else ``None``."""
        if not self.dlqat_sparse.get(adapter, False):
            return None
        return self.base_weight() != 0

    def quantized_weight(self, adapter: str) -> torch.Tensor:
        """The fake-quantized ``[out, in]`` float32 weight of ``adapter`` (differentiable in A, B, alpha)."""
        codes, zero_columns, scale, index = self._codes(adapter)
        return scale.index_select(1, index) * (codes - zero_columns)

    @torch.no_grad()
    def export_codes(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, scales, zeros)`` of the merged adapter: integer codes ``[out, in]``, ``alpha * scale``
        and the zero-points per group. ``scales * (codes - zeros)`` is exactly ``quantized_weight``."""
        codes, _, scale, _ = self._codes(adapter)
        return codes, scale, self.dlqat_zero[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``W_hat - W0`` in the base layer's ``[out, in]`` layout."""
        return self.quantized_weight(adapter) - self.base_weight().float()

    def _single_active_adapter(self) -> str | None:
        active = [name for name in self.active_adapters if name in self.dlqat_settings]
        if len(active) > 1:
            raise ValueError(
                f"DL-QAT adapters replace the layer's weight, so only one can be active; got {active}. "
                "Activate one with model.set_adapter(name)."
            )
        return active[0] if active else None

    # ----------------------------------------------------------------------------------------------
    # Merging (PEFT semantics: the base weight becomes the fake-quantized one, unmerge restores W0)
    # ----------------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged_adapters:
            raise ValueError(
                "A DL-QAT adapter replaces the weight: merge exactly one adapter (unmerge first to switch)."
            )
        (adapter,) = adapter_names
        if adapter not in self.dlqat_settings:
            return
        base = self.get_base_layer()
        merged = self.quantized_weight(adapter).detach()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights of adapter {adapter!r}.")
        self._weight_before_merge = weight_matrix(base).clone()
        set_weight_matrix(base, merged)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            return
        set_weight_matrix(self.get_base_layer(), self._weight_before_merge)
        self._weight_before_merge = None
        self.merged_adapters.clear()


class DLQATLinear(nn.Module, DLQATLayer):
    """A DL-QAT adapted ``nn.Linear`` / ``Conv1D`` (the module PEFT puts in place of the base layer)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DLQATConfig, **kwargs: Any) -> None:
        super().__init__()
        DLQATLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _apply(self, fn, recurse: bool = True):
        # model.half() / .to(torch.bfloat16) must not round the frozen grid (see update_layer): it follows the device
        # only. The float32 values are kept aside and put back on whatever device the cast moved them to.
        # A cast that changes W0 itself (fp32 -> bf16 rounds it) refits the grid on the cast W0, in float32: the grid
        # is a function of W0, so the adapter then behaves as it will once saved and loaded onto a base of that dtype.
        # The dtype W0 had when each grid was fitted, not the one it has now: a head tied to the input embedding sees
        # its weight cast already, by the embedding's own _apply earlier in the same model.to(...).
        grids = [(store, key, value) for store in (self.dlqat_scale, self.dlqat_zero) for key, value in store.items()]
        result = super()._apply(fn, recurse)
        if self._weight_before_merge is not None:  # W0 set aside while merged follows the model like its weight
            self._weight_before_merge = fn(self._weight_before_merge)
        for store, key, before in grids:
            if store[key].dtype != before.dtype:
                store[key] = before.to(store[key].device)
        w0 = self.base_weight()
        refit = [adapter for adapter, dtype in self.dlqat_grid_dtype.items() if dtype != w0.dtype]
        if refit:
            for adapter in refit:
                settings = self.dlqat_settings[adapter]
                grid = QuantizationGrid.fit(w0, settings.bits, settings.group_size, settings.symmetric)
                self.dlqat_scale[adapter], self.dlqat_zero[adapter] = grid.scale, grid.zero
                self.dlqat_grid_dtype[adapter] = w0.dtype
            if self.merged:  # the merged W_hat came from the old grid: merge again on the refitted one
                with torch.no_grad():
                    set_weight_matrix(self.get_base_layer(), self.quantized_weight(self.merged_adapters[0]))
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter = self._single_active_adapter()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        if torch.is_grad_enabled():
            # Recomputed in the backward pass: autograd would otherwise keep weight-sized intermediates of the fake
            # quantization (about 13 bytes per weight) for every layer until the backward pass reaches it, several
            # times the model while training. Only x is kept; the recomputation is elementwise over the weight.
            return torch.utils.checkpoint.checkpoint(self._quantized_linear, x, adapter, use_reentrant=False)
        return self._quantized_linear(x, adapter)

    def _quantized_linear(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        weight = self.quantized_weight(adapter).to(x.dtype)
        bias = self.get_base_layer().bias
        return nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))

    def __repr__(self) -> str:
        return "dlqat." + super().__repr__()
