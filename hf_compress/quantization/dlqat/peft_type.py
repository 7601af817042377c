"""Adding ``DLQAT`` to PEFT's closed ``PeftType`` enum, so ``register_peft_method`` accepts it.

``peft.utils.register_peft_method`` only registers names that are members of ``PeftType``, and the
enum has no public way to grow; :func:`hf_compress._compat.extend_peft_type` adds the member the way
``enum`` itself stores members. Nothing of PEFT is patched or replaced.

It must run in every process before an adapter is loaded; ``import hf_compress`` does that (through
``hf_compress.quantization``), so ``PeftModel.from_pretrained(base, folder)`` works in a fresh
interpreter after that import. If a future PEFT ships its own ``DLQAT`` member, it is used as is.

Example:
    >>> from peft.utils import PeftType
    >>> PeftType("DLQAT") is DLQAT_PEFT_TYPE
    True
"""

from __future__ import annotations

from ..._compat import extend_peft_type


__all__ = ["DLQAT_PEFT_TYPE", "extend_peft_type"]


DLQAT_PEFT_TYPE = extend_peft_type("DLQAT")
