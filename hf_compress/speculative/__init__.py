"""Speculative decoding as ``generate()`` strategies: one engine, pluggable drafters and acceptance rules.

Example:
    >>> from hf_compress.speculative import FLy
    >>> out = model.generate(**inputs, max_new_tokens=256, custom_generate=FLy(draft_model=draft))  # doctest: +SKIP
    >>> out = model.generate(**inputs, do_sample=False, custom_generate=CoSpec(arbiter, draft_model=draft))  # doctest: +SKIP
"""

from .acceptance import (
    AcceptanceRule,
    LooseVerification,
    SpeculativeSampling,
    StrictGreedy,
    TypicalAcceptance,
    Verdict,
    top_k_entropy,
)
from .cospec import ArbiterConfig, ArbiterTrainingSettings, CoSpec, CoSpecArbiter, calibrate_arbiter, train_arbiter
from .drafting import CrossTokenizerDrafter, Draft, Drafter, ModelDrafter, NgramDrafter
from .engine import (
    CachedSequence,
    SpeculativeDecodingOutput,
    SpeculativeMetrics,
    speculative_decode,
    verify_and_advance,
)
from .strategies import FLy, SpeculativeDecoding, register_strategy, strategy_from_dict
from .tree import DraftTree


__all__ = [
    "AcceptanceRule",
    "ArbiterConfig",
    "ArbiterTrainingSettings",
    "CachedSequence",
    "CoSpec",
    "CoSpecArbiter",
    "CrossTokenizerDrafter",
    "Draft",
    "DraftTree",
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
    "TypicalAcceptance",
    "Verdict",
    "calibrate_arbiter",
    "register_strategy",
    "speculative_decode",
    "strategy_from_dict",
    "top_k_entropy",
    "train_arbiter",
    "verify_and_advance",
]
