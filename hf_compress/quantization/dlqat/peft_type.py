"""Adding ``DLQAT`` to PEFT's closed ``PeftType`` enum, so ``register_peft_method`` accepts it.

``peft.utils.register_peft_method`` only registers names that are members of ``PeftType``, and the
enum has no public way to grow. The least invasive fix is to add one member the way ``enum`` itself
stores members (``_member_map_``, ``_value2member_map_``, ``_member_names_``): ``PeftType.DLQAT``,
``PeftType("DLQAT")``, iteration, pickling and ``==`` with the string ``"DLQAT"`` then behave as for a
built-in member. Nothing of PEFT is patched or replaced.

It must run in every process before an adapter is loaded; ``import hf_compress`` does that (through
``hf_compress.quantization``), so ``PeftModel.from_pretrained(base, folder)`` works in a fresh
interpreter after that import. If a future PEFT ships its own ``DLQAT`` member, it is used as is.

Example:
    >>> from peft.utils import PeftType
    >>> PeftType("DLQAT") is DLQAT_PEFT_TYPE
    True
"""

from __future__ import annotations

from peft.utils import PeftType


__all__ = ["DLQAT_PEFT_TYPE", "extend_peft_type"]


def extend_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it (value ``name``) if PEFT does not define it (idempotent)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # EnumType.__setattr__ refuses to rebind members; this name is new, so set it on the class directly.
    type.__setattr__(PeftType, name, member)
    return member


DLQAT_PEFT_TYPE: PeftType = extend_peft_type("DLQAT")
