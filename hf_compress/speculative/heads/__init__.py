"""Drafting heads on a frozen model — Amphista and the Medusa baseline — trained with ``Trainer`` and
decoded through ``generate(custom_generate=Amphista(heads))`` with tree verification.

Example:
    >>> from hf_compress.speculative.heads import AmphistaConfig, AmphistaHeads, Amphista, train_heads
    >>> heads = AmphistaHeads.for_model(model, AmphistaConfig(num_heads=4))            # doctest: +SKIP
    >>> train_heads(model, heads, dataset, args=TrainingArguments(...))              # doctest: +SKIP
    >>> heads.save_pretrained("heads/")                                              # doctest: +SKIP
    >>> model.generate(**inputs, custom_generate=Amphista(AmphistaHeads.from_pretrained("heads/")))  # doctest: +SKIP
"""

from ..tree import DraftTree
from .auto import register_auto_classes
from .config import AmphistaConfig, DraftHeadsConfig, MedusaConfig
from .drafter import HeadsDrafter
from .modeling import AmphistaHeads, AutoEmbeddingBlock, BaseParts, DraftHeads, MedusaHeads, load_heads
from .strategy import Amphista
from .training import (
    FeatureDataset,
    TimeBudget,
    cache_base_features,
    head_accuracy,
    heads_loss,
    self_distillation_dataset,
    train_heads,
)


# A heads folder given to AutoModelForCausalLM / AutoModel / pipeline is refused saying how to load it.
register_auto_classes()

__all__ = [
    "Amphista",
    "AmphistaConfig",
    "AmphistaHeads",
    "AutoEmbeddingBlock",
    "BaseParts",
    "DraftHeads",
    "DraftHeadsConfig",
    "DraftTree",
    "FeatureDataset",
    "HeadsDrafter",
    "MedusaConfig",
    "MedusaHeads",
    "TimeBudget",
    "cache_base_features",
    "head_accuracy",
    "heads_loss",
    "load_heads",
    "self_distillation_dataset",
    "train_heads",
]
