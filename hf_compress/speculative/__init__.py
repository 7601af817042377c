"""Speculative decoding as ``generate()`` strategies: one engine, pluggable drafters and acceptance rules.

Example:
    >>> from hf_compress.speculative import FLy
    >>> out = model.generate(**inputs, max_new_tokens=256, custom_generate=FLy(draft_model=draft))  # doctest: +SKIP
"""

from .acceptance import (
    AcceptanceRule,
    LooseVerification,
    SpeculativeSampling,
    StrictGreedy,
    Verdict,
    top_k_entropy,
)
from .drafting import CrossTokenizerDrafter, Draft, Drafter, ModelDrafter, NgramDrafter
from .engine import (
    CachedSequence,
    SpeculativeDecodingOutput,
    SpeculativeMetrics,
    speculative_decode,
    verify_and_advance,
)
from .strategies import FLy, SpeculativeDecoding, strategy_from_dict


__all__ = [
    "AcceptanceRule",
    "CachedSequence",
    "CrossTokenizerDrafter",
    "Draft",
    "Drafter",
    "FLy",
    "LooseVerification",
    "ModelDrafter",
    "NgramDrafter",
    "SpeculativeDecoding",
    "SpeculativeDecodingOutput",
    "SpeculativeMetrics",
    "SpeculativeSampling",
    "StrictGreedy",
    "Verdict",
    "speculative_decode",
    "strategy_from_dict",
    "top_k_entropy",
    "verify_and_advance",
]
