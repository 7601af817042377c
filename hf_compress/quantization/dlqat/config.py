"""``DLQATConfig``: the PEFT config of a DL-QAT adapter (``adapter_config.json``, ``"peft_type": "DLQAT"``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from peft.config import PeftConfig

from ...utils import check_bool, check_choice, check_float, check_int, check_int_sequence, check_str_list
from ..grid import check_grid_arguments, check_keep_sparsity
from .peft_type import DLQAT_PEFT_TYPE


__all__ = ["LORA_SPACES", "DLQATConfig"]

LORA_SPACES: tuple[str, ...] = ("quantization", "weight")


@dataclass
class DLQATConfig(PeftConfig):
    """Configuration of a DL-QAT adapter: a frozen low-bit grid, a magnitude per group, LoRA inside the grid.

    Every targeted linear layer ``W0`` gets a frozen min-max grid (``scale``, ``zero`` per group of
    ``group_size`` input channels) and two trainable parts:

    - a **group magnitude** ``alpha`` (one scalar per quantization group, initialised to 1);
    - a **LoRA** ``B @ A`` (rank ``r``) added **in quantization space**, before rounding::

          codes = clamp(round(W0 / scale + (lora_alpha / r) * B @ A) + zero, 0, 2**bits - 1)
          W_hat = alpha * scale * (codes - zero)

    ``round`` and ``clamp`` use the straight-through estimator. With ``B = 0`` and ``alpha = 1``
    (the default initialisation) the model is exactly the round-to-nearest (RTN) quantized model.
    ``merge_and_quantize()`` exports ``codes`` and ``alpha * scale`` as a real packed low-bit
    checkpoint.

    Args:
        bits: bit width of the weights, 2 to 8.
        group_size: input channels per quantization group; ``-1`` for one group per output channel.
            A size that does not divide a layer's ``in_features`` gives that layer a shorter last group
            (its own scale, computed on its real columns); a size at least ``in_features`` means
            per-channel for that layer.
        symmetric: symmetric grid (``zero = 2**(bits-1)``) instead of asymmetric min-max.
        r: LoRA rank (a positive integer).
        lora_alpha: LoRA scaling numerator, a positive finite number (the update is
            ``lora_alpha / r * B @ A``, in grid steps when ``lora_space="quantization"``).
        lora_space: ``"quantization"`` (default, ``round(W0/s + BA)``) or ``"weight"``
            (``round((W0 + BA)/s)``; an element-wise ``1/s`` rescaling of the update).
        use_magnitude / use_lora: train the group magnitudes / the LoRA. The ablations of the method
            are ``use_lora=False`` (magnitude only, PEQA-like), ``use_magnitude=False`` (LoRA only in
            quantization space) and both ``False`` (RTN, nothing trainable).
        init_weights: ``True``: ``B = 0``, ``alpha = 1`` (start exactly at RTN). ``False``: random ``B``
            and ``alpha`` near 1 (for tests: the adapter changes the output from the start).
        keep_sparsity: keep a pruned base's zeros fixed: the codes of the base's exact zeros are pinned to the
            zero-point (so ``W_hat`` is the fake-quantized weight times the fixed mask ``W0 != 0``, gradients
            reach only kept weights), and ``merge_and_quantize()`` exports sparse ``PackedLinear`` layers (mask
            + the codes of the kept weights). ``"auto"`` (default): per layer, when at least
            ``grid.SPARSITY_THRESHOLD`` (10%) of its base weights are exactly 0 (any N:M or unstructured pattern);
            ``True``: every layer with any exact zero; ``False``: never (the zeros fill in while training).
            The grid needs no change: its range always contains 0 (``[min(w, 0), max(w, 0)]``, or
            ``max|w|`` when symmetric), so a base's zeros never widen it: the grid fitted on the sparse weight
            *is* the grid of its kept weights.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in
            ``peft.LoraConfig`` (``"all-linear"`` targets every linear layer except the output head).

    Example:
        >>> from hf_compress.quantization import DLQATConfig
        >>> config = DLQATConfig(bits=3, group_size=128, r=16, target_modules="all-linear")
        >>> config.peft_type
        <PeftType.DLQAT: 'DLQAT'>
    """

    bits: int = field(default=4, metadata={"help": "Bit width of the quantized weights (2 to 8)."})
    group_size: int = field(
        default=128, metadata={"help": "Input channels per quantization group; -1 for per-channel."}
    )
    symmetric: bool = field(default=False, metadata={"help": "Symmetric grid instead of asymmetric min-max."})
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / r)."})
    lora_space: Literal["quantization", "weight"] = field(
        default="quantization",
        metadata={"help": "Where B @ A is added: inside the integer grid (default) or to the float weight."},
    )
    use_magnitude: bool = field(default=True, metadata={"help": "Train one magnitude per quantization group."})
    use_lora: bool = field(default=True, metadata={"help": "Train the LoRA update in quantization space."})
    init_weights: bool = field(
        default=True, metadata={"help": "Start at RTN (B = 0, magnitude 1); False: random, for tests."}
    )
    keep_sparsity: Union[bool, Literal["auto"]] = field(  # noqa: UP007 (PEFT reads the annotation at runtime)
        default="auto",
        metadata={"help": "Keep a pruned base's zeros fixed: 'auto' (layers >= 10% exact zeros), True or False."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or regex to adapt; 'all-linear' for every linear layer but the output head."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex to leave in full precision."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the decoder layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full (e.g. a classification head)."}
    )

    def __post_init__(self) -> None:
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            if self.target_modules.lower() != "all-linear":
                # PEFT matches a regex against the whole module name and would ignore layers_to_transform silently.
                raise ValueError(
                    "layers_to_transform cannot be used with a regex string as target_modules; pass a list of module "
                    "names (e.g. ['q_proj', 'v_proj']) or 'all-linear', or put the layer indices into the regex."
                )
            # None is DL-QAT's "all-linear" (DLQATModel applies layers_to_transform to those layers itself); peft 0.22
            # refuses any string target_modules beside layers_to_transform (0.21.2 did not).
            self.target_modules = None
        super().__post_init__()
        self.peft_type = DLQAT_PEFT_TYPE
        check_grid_arguments(self.bits, self.group_size)
        check_choice("lora_space", self.lora_space, LORA_SPACES)
        check_keep_sparsity(self.keep_sparsity)
        for name in ("symmetric", "use_magnitude", "use_lora", "init_weights", "inference_mode"):
            check_bool(name, getattr(self, name))
        self.r = check_int("r", self.r, minimum=1, hint="It is the LoRA rank (e.g. 16).")
        self.lora_alpha = check_float(
            "lora_alpha", self.lora_alpha, low=0.0, low_open=True,
            hint="It scales the LoRA update by lora_alpha / r (e.g. lora_alpha=r).",
        )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set, frozenset)):
                value = set(check_str_list(name, value, hint="Pass module names, a regex string or 'all-linear'."))
            elif value is not None and not isinstance(value, str):
                check_str_list(name, value, allow_none=True, hint="Pass module names, a regex string or 'all-linear'.")
            setattr(self, name, value)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            check_int("layers_to_transform", self.layers_to_transform, minimum=0)
        elif self.layers_to_transform is not None:
            self.layers_to_transform = check_int_sequence(
                "layers_to_transform", self.layers_to_transform, minimum=0,
                hint="Pass decoder layer indices (an int or a list of ints).",
            )
        if self.layers_pattern is not None and not isinstance(self.layers_pattern, str):
            self.layers_pattern = check_str_list("layers_pattern", self.layers_pattern)
        self.modules_to_save = check_str_list("modules_to_save", self.modules_to_save, allow_none=True)
        if self.layers_pattern and self.layers_to_transform is None:  # layer 0 is a layer
            raise ValueError("layers_pattern is only used together with layers_to_transform.")

    @property
    def scaling(self) -> float:
        """Factor of ``B @ A`` in the update (``lora_alpha / r``)."""
        return self.lora_alpha / self.r
