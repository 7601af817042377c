"""Weight quantization: DL-QAT as a PEFT method, the packed low-bit format, and RTN.

Example:
    >>> from peft import get_peft_model
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.quantization import DLQATConfig
    >>> model = get_peft_model(tiny_model("llama")[0], DLQATConfig(bits=3, group_size=32, r=2))
    >>> model.peft_config["default"].peft_type
    <PeftType.DLQAT: 'DLQAT'>
"""

from .dlqat import DLQAT_PEFT_TYPE, DLQATConfig, DLQATLinear, DLQATModel
from .grid import SUPPORTED_BITS, QuantizationGrid, round_clamp_ste
from .packed_format import PackedFormatConfig, PackedFormatQuantizer, packed_size, quantize_rtn
from .packed_linear import PackedLinear


__all__ = [
    "DLQAT_PEFT_TYPE",
    "SUPPORTED_BITS",
    "DLQATConfig",
    "DLQATLinear",
    "DLQATModel",
    "PackedFormatConfig",
    "PackedFormatQuantizer",
    "PackedLinear",
    "QuantizationGrid",
    "packed_size",
    "quantize_rtn",
    "round_clamp_ste",
]
