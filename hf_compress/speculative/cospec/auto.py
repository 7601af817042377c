"""What transformers' Auto classes do with a CoSpec arbiter folder: read its config, load the arbiter, refuse an LM.

A folder written by :meth:`~.modeling.CoSpecArbiter.save_pretrained` looks like a model folder (``config.json``,
``model.safetensors``, a card), but it holds a small policy that settles draft/target mismatches for one target
model, and cannot generate. Importing this module (the ``cospec`` package does) registers with transformers:
``AutoConfig`` reads :class:`~.config.ArbiterConfig`; ``AutoModel`` loads the :class:`~.modeling.CoSpecArbiter`
itself (it is a ``PreTrainedModel``, and its own ``from_pretrained`` refuses an incomplete folder);
``AutoModelForCausalLM`` (which ``pipeline("text-generation")`` uses) gets a stand-in whose every constructor raises
a ``ValueError`` that names the target and shows the calls that decode with the arbiter. After a bare
``import hf_compress`` the first arbiter folder an Auto class reads imports this package
(:mod:`hf_compress.utils.model_types`), so the refusal needs no import of its own.

Example:
    >>> from transformers import AutoModelForCausalLM
    >>> from hf_compress.assets import tiny_model
    >>> from hf_compress.speculative.cospec import CoSpecArbiter
    >>> model, _ = tiny_model("llama")
    >>> folder = CoSpecArbiter.for_model(model).save_pretrained("arbiter")
    >>> AutoModelForCausalLM.from_pretrained("arbiter")  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    ValueError: arbiter holds a CoSpec arbiter (hf_compress, model type hf_compress_cospec_arbiter) for a llama target
    model of hidden size 64 and 256 tokens whose name was not recorded, not a causal LM: ...
"""

from __future__ import annotations

import os
from pathlib import Path

from ...modeling.identity import describe_base_model
from ...utils.model_types import NotThisModelClass
from .config import ArbiterConfig
from .modeling import CoSpecArbiter


__all__ = ["CoSpecArbiterIsNotACausalLM", "arbiter_is_not_a_causal_lm", "register_auto_classes"]



def arbiter_is_not_a_causal_lm(source: str | os.PathLike, config: ArbiterConfig) -> str:
    """The message for an attempt to load arbiter folder ``source`` as a causal LM: what it holds, what to call."""
    source = str(source)
    for_target, target_arg = describe_base_model(config, role="target")
    draft = config.draft_model_name_or_path
    if draft:
        drafting, draft_arg = f"the draft model {draft}", f", draft_model={draft!r}"
    elif (config.training or {}).get("drafter") == "model":  # trained with a draft model whose name was not recorded
        drafting, draft_arg = "a draft model whose name was not recorded", ", draft_model=DRAFT_MODEL"
    else:
        drafting, draft_arg = "n-gram prompt lookup", ""
    ngram_lookup = not draft_arg or config.use_ngram  # n-gram drafting, or a draft model sped up by it
    ngram_args = (", use_ngram=True" if draft_arg and config.use_ngram else "") + (
        f", min_ngram_size={config.min_ngram_size}" if ngram_lookup and config.min_ngram_size != 1 else "")
    strategy = f"CoSpec({source!r}{draft_arg}{ngram_args})"
    message = (
        f"{source} holds a CoSpec arbiter (hf_compress, model type {config.model_type}) for {for_target}, not a causal "
        "LM: at each draft/target mismatch it decides whether the draft token stays, and cannot generate on its own. "
        f"It was trained with drafts from {drafting}. Load the target model and decode with it (greedy only):\n"
        f"    model = AutoModelForCausalLM.from_pretrained({target_arg})\n"
        f"    out = model.generate(**inputs, do_sample=False, custom_generate={strategy})"
        "  # from hf_compress.speculative import CoSpec\n"
    )
    local = Path(source)
    if not local.is_dir() or (local / "custom_generate" / "generate.py").is_file():  # a Hub id, or a folder that has it
        message += (f"or, through the folder's custom_generate/ code: model.generate(**inputs, do_sample=False, "
                    f"custom_generate={source!r}, trust_remote_code=True). ")
    return message + f"CoSpecArbiter.from_pretrained({source!r}) (or AutoModel) loads the arbiter itself."


class CoSpecArbiterIsNotACausalLM(NotThisModelClass):
    """Stands for the arbiter in ``AutoModelForCausalLM``'s mapping; loading or building it raises a clear error."""

    config_class: type[ArbiterConfig] = ArbiterConfig

    @classmethod
    def refusal(cls, source: str | os.PathLike, config: ArbiterConfig) -> str:
        return arbiter_is_not_a_causal_lm(source, config)

    @classmethod
    def from_config_refusal(cls, config: ArbiterConfig) -> str:
        return ("ArbiterConfig configures a CoSpec arbiter, not a causal LM, so AutoModelForCausalLM cannot build it. "
                "Build one for a target with CoSpecArbiter.for_model(model, config), or AutoModel.from_config(config).")


def register_auto_classes() -> None:
    """Register the arbiter's config with ``AutoConfig``, the arbiter with ``AutoModel``, a refusal with
    ``AutoModelForCausalLM``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(ArbiterConfig.model_type, ArbiterConfig, exist_ok=True)  # over hf_compress's placeholder
    AutoModel.register(ArbiterConfig, CoSpecArbiter, exist_ok=True)
    AutoModelForCausalLM.register(ArbiterConfig, CoSpecArbiterIsNotACausalLM, exist_ok=True)


# An arbiter folder given to AutoModelForCausalLM / pipeline is refused saying how to decode with it.
register_auto_classes()
