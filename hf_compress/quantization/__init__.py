"""Weight quantization: DL-QAT as a PEFT method, the packed low-bit layer (its format is
``hf_compress.formats.packed``), and RTN. Names load on first use, so importing one module (``grid``) does
not import peft.

Example:
    >>> from peft import get_peft_model
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.quantization import DLQATConfig
    >>> model = get_peft_model(tiny_model("llama")[0], DLQATConfig(bits=3, group_size=32, r=2))
    >>> model.peft_config["default"].peft_type
    <PeftType.DLQAT: 'DLQAT'>
"""

from ..utils.import_hooks import lazy_exports


_EXPORTS = {
    "DLQAT_PEFT_TYPE": "dlqat",
    "DLQATConfig": "dlqat",
    "DLQATLinear": "dlqat",
    "DLQATModel": "dlqat",
    "SUPPORTED_BITS": "grid",
    "QuantizationGrid": "grid",
    "round_clamp_ste": "grid",
    "PackedLinear": "packed_linear",
    "set_kernel_cache_budget": "kernels",
    "set_packed_kernel": "kernels",
    "quantize_rtn": "rtn",
    "PackedFormatConfig": "hf_compress.formats.packed",
    "PackedFormatQuantizer": "hf_compress.formats.packed",
    "packed_size": "hf_compress.formats.packed",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
