"""What transformers' Auto classes do with a heads folder: read its config, refuse to load it as a model.

A folder written by :meth:`~.modeling.DraftHeads.save_pretrained` looks like a model folder (``config.json``,
``model.safetensors``, a card), but it holds only drafting heads, useless without their base model. Plain
transformers refuses it with "does not recognize this architecture ... upgrade transformers", which sends
the user the wrong way. :func:`register_auto_classes` (run when this package is imported) registers the heads'
configs with ``AutoConfig`` and, for ``AutoModel`` and ``AutoModelForCausalLM`` (which ``pipeline`` uses),
a stand-in whose every constructor raises a ``ValueError`` that names the base model and shows the calls that
decode with the heads. Nothing loads: the heads are not a model.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.speculative.heads import MedusaConfig, MedusaHeads
    >>> model, _ = tiny_model("llama")
    >>> folder = MedusaHeads.for_model(model, MedusaConfig(num_heads=2)).save_pretrained("heads")
    >>> AutoModelForCausalLM.from_pretrained("heads")
    Traceback (most recent call last):
    ...
    ValueError: heads holds Medusa drafting heads (hf_compress, model type hf_compress_medusa) for a llama base model
    of hidden size 64 and 256 tokens whose name was not recorded, not a model: ...
"""

from __future__ import annotations

import os

from ...modeling.identity import describe_base_model
from ...utils.model_types import NotThisModelClass
from .config import AmphistaConfig, DraftHeadsConfig, MedusaConfig


__all__ = ["heads_are_not_a_model", "register_auto_classes"]


def heads_are_not_a_model(source: str | os.PathLike, config: DraftHeadsConfig) -> str:
    """The message for an attempt to load heads folder ``source`` as a model: what it holds, what to call."""
    source = str(source)
    kind = "Medusa" if isinstance(config, MedusaConfig) else "Amphista"
    for_base, base_arg = describe_base_model(config)
    return (
        f"{source} holds {kind} drafting heads (hf_compress, model type {config.model_type}) for {for_base}, not a "
        "model: the heads draft tokens that the base model verifies, and cannot generate on their own. Load the base "
        "model and decode with them:\n"
        f"    model = AutoModelForCausalLM.from_pretrained({base_arg})\n"
        f"    out = model.generate(**inputs, custom_generate=Amphista({source!r}))"
        "  # from hf_compress.speculative.heads import Amphista\n"
        f"or, through the folder's custom_generate/ code: model.generate(**inputs, custom_generate={source!r}, "
        f"trust_remote_code=True). DraftHeads.from_pretrained({source!r}) loads the heads themselves."
    )


class _HeadsAreNotAModel(NotThisModelClass):
    """Stands for drafting heads in the Auto model mappings; loading or building it raises a clear error."""

    config_class: type[DraftHeadsConfig] = DraftHeadsConfig

    @classmethod
    def refusal(cls, source: str | os.PathLike, config: DraftHeadsConfig) -> str:
        return heads_are_not_a_model(source, config)

    @classmethod
    def from_config_refusal(cls, config: DraftHeadsConfig) -> str:
        return (f"{type(config).__name__} configures drafting heads, not a model, so an Auto model class cannot build "
                "it. Build heads for a model with DraftHeads.for_model(model, config) (hf_compress.speculative.heads).")


class MedusaHeadsAreNotAModel(_HeadsAreNotAModel):
    config_class = MedusaConfig


class AmphistaHeadsAreNotAModel(_HeadsAreNotAModel):
    config_class = AmphistaConfig


def register_auto_classes() -> None:
    """Register the heads' configs with ``AutoConfig`` and refusals with ``AutoModel``/``AutoModelForCausalLM``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for refusal in (MedusaHeadsAreNotAModel, AmphistaHeadsAreNotAModel):
        config_class = refusal.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class in (AutoModel, AutoModelForCausalLM):
            auto_class.register(config_class, refusal, exist_ok=True)
