"""DL-QAT as a PEFT method: ``DLQATConfig`` / ``DLQATLinear`` / ``DLQATModel``, registered on import.

Importing this package adds ``DLQAT`` to ``peft.PeftType`` and registers the method with
``peft.utils.register_peft_method``, so ``get_peft_model`` and ``PeftModel.from_pretrained`` know it.
``import hf_compress`` imports it, which is all a fresh process needs to load a saved adapter.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ...modeling.identity import weight_fingerprint  # lives in modeling.identity; still exported here, as before
from .config import LORA_SPACES, DLQATConfig
from .layer import DLQATLayer, DLQATLinear, LayerQuantization
from .model import DLQATModel
from .peft_type import DLQAT_PEFT_TYPE


__all__ = [
    "DLQAT_PEFT_TYPE",
    "LORA_SPACES",
    "DLQATConfig",
    "DLQATLayer",
    "DLQATLinear",
    "DLQATModel",
    "LayerQuantization",
    "weight_fingerprint",
]

# Idempotent: a module reload must not fail on "already registered".
if DLQAT_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="dlqat", config_cls=DLQATConfig, model_cls=DLQATModel)
