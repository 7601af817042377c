"""Moved to :mod:`hf_compress.modeling.identity` (its checks serve DL-QAT and the experts too); this name stays for
code that imported it from here, with a FutureWarning. Nothing in hf_compress imports it."""

from __future__ import annotations

import warnings

from ..modeling.identity import (  # noqa: F401  (re-exported for the old import path)
    base_model_identity,
    check_base_model,
    check_identity_field,
    record_base_model,
    same_base_model,
)


__all__ = ["base_model_identity", "check_base_model", "check_identity_field", "record_base_model", "same_base_model"]

warnings.warn(
    "hf_compress.speculative.base_identity moved to hf_compress.modeling.identity: import from there.",
    FutureWarning, stacklevel=2,
)
