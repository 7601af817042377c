"""Is this the base model an add-on was trained on? Cheap checks, recorded when the add-on is built, run at load.

Hidden size and vocabulary only say that the shapes fit: an add-on trained for another model of the same shape
(another architecture, seed or checkpoint) would be accepted and work badly. Two records, both compared with a
tolerance rather than hashed, so the same weights in another dtype still match:

- :func:`base_model_identity` — the text model type and a few entries of the input embeddings; recorded by drafting
  heads and CoSpec arbiters in their configs and checked before decoding (:func:`check_base_model`);
- :func:`weight_fingerprint` — four numbers per weight matrix; DL-QAT stores one per adapted layer (its grid is a
  function of that layer's weights) and SilverSight experts two (embeddings and one block weight).

Example:
    >>> from hf_compress.assets import tiny_model
    >>> identity = base_model_identity(tiny_model("llama")[0])
    >>> identity["model_type"], len(identity["embedding_sample"])
    ('llama', 32)
    >>> same_base_model(identity, base_model_identity(tiny_model("llama")[0].half()))
    True
    >>> same_base_model(identity, base_model_identity(tiny_model("llama", seed=1)[0]))
    False
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ..utils import InvalidArgumentTypeError, get_logger


__all__ = ["base_model_identity", "check_base_model", "check_identity_field", "describe_base_model", "fingerprints_match",
           "record_base_model", "same_base_model", "weight_fingerprint"]

logger = get_logger(__name__)

SAMPLE_ROWS, SAMPLE_COLUMNS = 8, 4
# Relative distance between two samples of the same weights: rounding only (bfloat16 at most ~0.4% per entry; no
# compression method here changes the input embeddings). Two unrelated matrices of one scale sit near sqrt(2).
MAX_RELATIVE_DISTANCE = 0.02

# Configs already reported as uncheckable (logged once), by id: configs define __eq__, so they are not hashable.
_UNCHECKED_LOGGED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def base_model_identity(model: nn.Module) -> dict[str, Any]:
    """``{"model_type", "embedding_sample"}`` of ``model``: its text model type, and ``SAMPLE_ROWS × SAMPLE_COLUMNS``
    entries spread over its input embeddings (4 significant digits; ``None`` where they cannot be read)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    return {"model_type": getattr(text_config, "model_type", None) or None, "embedding_sample": _embedding_sample(model)}


def _embedding_sample(model: nn.Module) -> list[float] | None:
    weight = getattr(model.get_input_embeddings(), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point() or weight.is_meta:
        return None  # packed, sharded onto the meta device, ...: nothing to compare
    rows = torch.linspace(0, weight.shape[0] - 1, SAMPLE_ROWS, device=weight.device).round().long()
    columns = torch.linspace(0, weight.shape[1] - 1, SAMPLE_COLUMNS, device=weight.device).round().long()
    values = weight.detach()[rows][:, columns].float().flatten().tolist()
    return [float(f"{value:.4g}") for value in values]


def same_base_model(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two :func:`base_model_identity` records name the same model (parts missing on either side pass)."""
    return not _differences(recorded, current)


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    if recorded.get("model_type") and current.get("model_type") and recorded["model_type"] != current["model_type"]:
        out.append(f"model type {recorded['model_type']!r} vs {current['model_type']!r}")
    a, b = recorded.get("embedding_sample"), current.get("embedding_sample")
    if a is not None and b is not None:
        a = torch.tensor(a, dtype=torch.float64, device="cpu")
        b = torch.tensor(b, dtype=torch.float64, device="cpu")
        scale = max(float(a.norm()), float(b.norm()), 1e-12)
        if a.shape != b.shape or float((a - b).norm()) > MAX_RELATIVE_DISTANCE * scale:
            out.append("other input embedding weights")
    return out


def check_identity_field(value: Any) -> None:
    """Refuse a config's ``base_model_identity`` that is not ``None`` or a record :func:`base_model_identity` wrote."""
    if value is None:
        return
    sample = value.get("embedding_sample") if isinstance(value, dict) else None
    if not (isinstance(value, dict) and set(value) <= {"model_type", "embedding_sample"}
            and (value.get("model_type") is None or isinstance(value["model_type"], str))
            and (sample is None or (isinstance(sample, list)
                                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sample)))):
        raise InvalidArgumentTypeError(
            "base_model_identity must be None or {'model_type': str, 'embedding_sample': [numbers]} (written by "
            f"for_model; do not set it by hand), got {value!r:.120}.")


def record_base_model(config: Any, model: nn.Module) -> None:
    """Record ``model``'s :func:`base_model_identity` in ``config.base_model_identity`` unless one is there already."""
    if config.base_model_identity is None:
        config.base_model_identity = base_model_identity(model)


def describe_base_model(config: Any, role: str = "base") -> tuple[str, str]:
    """How an add-on's config names the model it was built for: ``(description, argument)`` for a message, e.g.
    ``("the base model org/m", "'org/m'")``, or, without a recorded name, its type and sizes and a placeholder.

    Example:
        >>> from types import SimpleNamespace
        >>> describe_base_model(SimpleNamespace(base_model_name_or_path=None, base_model_identity={"model_type": "llama"},
        ...                                     hidden_size=64, vocab_size=256), role="target")
        ('a llama target model of hidden size 64 and 256 tokens whose name was not recorded', 'TARGET_MODEL')
    """
    name = config.base_model_name_or_path
    if name:
        return f"the {role} model {name}", repr(name)
    model_type = (config.base_model_identity or {}).get("model_type")
    kind = f"a {model_type} {role} model" if model_type else f"a {role} model"
    return (f"{kind} of hidden size {config.hidden_size} and {config.vocab_size} tokens whose name was not recorded",
            f"{role.upper()}_MODEL")


def check_base_model(config: Any, model: nn.Module, what: str, remedy: str) -> None:
    """Refuse ``model`` if it is not the base model ``config`` was trained on (``what``: "these heads", ...).

    Add-ons saved before the identity was recorded cannot be checked: that is logged once, at INFO, and accepted.
    """
    recorded = config.base_model_identity
    if recorded is None:
        if _UNCHECKED_LOGGED.get(id(config)) is not config:
            _UNCHECKED_LOGGED[id(config)] = config
            logger.info("Cannot check that this model is the base model of %s: saved before hf_compress recorded "
                        "base model identities (train or build them again to record one).", what)
        return
    differences = _differences(recorded, base_model_identity(model))
    if differences:
        trained_for = config.base_model_name_or_path or "an unnamed model"
        this = getattr(getattr(model, "config", None), "name_or_path", None) or "an unnamed model"
        raise ValueError(
            f"Wrong base model for {what}: trained for {trained_for!r}, but this model ({this!r}) differs "
            f"({'; '.join(differences)}) although the sizes match. {remedy}"
        )


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Four numbers that identify a weight matrix well enough to tell two base models apart.

    Example:
        >>> tuple(weight_fingerprint(torch.ones(3, 2)).tolist())
        (2.4494898319244385, 2.0, 2.0, 1.0)
    """
    w = weight.detach().float()
    return torch.stack([w.norm(), w[0].sum(), w[-1].sum(), w.abs().mean()])


def fingerprints_match(saved: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether two :func:`weight_fingerprint` results describe the same weight (tolerant to a bf16/fp32 cast)."""
    tolerance = 1e-2 * float(current[0].abs()) + 1e-6
    return bool(torch.allclose(saved.float().cpu(), current.float().cpu(), rtol=1e-2, atol=tolerance))
