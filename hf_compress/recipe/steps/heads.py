"""``heads``: drafting heads (Amphista or the Medusa baseline) trained on the model as the earlier steps left it.

``DraftHeads.for_model`` → ``train_heads`` (``Trainer``; the base stays frozen and unchanged) on token windows
of the calibration text. The heads ship in the final folder's ``heads/`` sub-folder, a complete
``custom_generate`` folder (``Amphista(heads).save_pretrained``), since heads and model each need a
``config.json`` of their own.

Example:
    >>> step = HeadsStep.parse(2, {"method": "amphista", "num_heads": 3, "training": {"max_steps": 50}}, seed=0)
    >>> step.fields["num_heads"], step.fields["training"]["lr_scheduler_type"], step.produces()
    (3, 'cosine', {'heads'})
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from ...utils import check_int, get_logger
from ..config import check_keys, refused_as
from .base import RecipeState, Step
from .training import check_device, check_lengths, parse_training, training_data, training_settings


logger = get_logger(__name__)

# Filled from the model by DraftHeads.for_model, or written by train_heads: not recipe fields.
_FROM_MODEL = ("hidden_size", "vocab_size", "base_model_name_or_path", "base_model_identity", "training")
# Medusa's released learning rate with a cosine schedule (train_heads' default), short windows.
HEADS_TRAINING = {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "batch_size": 8, "seq_len": 64}


class HeadsStep(Step):
    """``heads: {method: amphista | medusa, <AmphistaConfig / MedusaConfig fields>, training: {...}}``."""

    kind = "heads"
    changes_weights = False

    @classmethod
    def parse(cls, index: int, data: dict[str, Any], seed: int) -> HeadsStep:
        from ...speculative.heads.training import MIN_WINDOW

        configs = _config_classes()
        method = cls.method_of(index, data, list(configs))
        where = cls.where(index, method)
        names = _config_fields(configs[method])
        fields = check_keys(where, data, {"method", "training", *names})
        fields.pop("method")
        training = parse_training(where, fields.pop("training", None), HEADS_TRAINING)
        config = _config(where, configs[method], fields)
        needed = MIN_WINDOW + config.num_heads - 1  # head k learns the token 2 + k past each position
        with refused_as(where):
            check_int("training.seq_len", training["seq_len"], minimum=needed,
                      hint=f"{config.num_heads} drafting heads learn from windows of at least {needed} tokens.")
        resolved = {name: copy.deepcopy(getattr(config, name)) for name in names}
        return cls(index, method, {**resolved, "training": training})

    def produces(self) -> set[str]:
        return {"heads"}

    def refused_after(self) -> dict[str, str]:
        return {**super().refused_after(), "heads": "two heads steps: one set of drafting heads per model; keep one."}

    def check_model(self, state: RecipeState) -> None:
        hidden = state.model.get_output_embeddings().in_features
        _config(self.where(self.index, self.method), _config_classes()[self.method],
                {**self.config_fields(), "hidden_size": hidden})  # e.g. Amphista's attention heads divide it
        check_lengths(self.where(self.index, self.method), state.model,
                      {"training.seq_len": self.fields["training"]["seq_len"]})
        check_device(self.where(self.index, self.method), state.device)

    def config_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.fields.items() if k != "training"}

    def apply(self, state: RecipeState, progress: bool) -> dict[str, Any]:
        from ...speculative.heads import DraftHeads, train_heads

        config = _config(self.where(self.index, self.method), _config_classes()[self.method], self.config_fields())
        heads = DraftHeads.for_model(state.model, config)
        training = self.fields["training"]
        data = training_data(training, state.tokenizer, state.seed)
        description = f"{training['text']} calibration text, {len(data)} windows of {training['seq_len']} tokens"
        result = train_heads(state.model, heads, data, training_settings(training, state.seed, state.device, progress),
                             data_description=description)
        state.heads = heads
        return {"training_loss": round(float(result["training_loss"]), 6), "training_steps": result["global_step"],
                "train_seconds": round(result["train_seconds"], 2),
                "parameters": sum(p.numel() for p in heads.parameters())}


def _config_classes() -> dict[str, type]:
    from ...speculative.heads import AmphistaConfig, MedusaConfig

    return {"amphista": AmphistaConfig, "medusa": MedusaConfig}


def _config_fields(config_class: type) -> list[str]:
    """The heads config's own settings (declared on DraftHeadsConfig and its subclass, not PreTrainedConfig's)."""
    from ...speculative.heads import DraftHeadsConfig

    names: list[str] = []
    for klass in reversed(config_class.__mro__):
        if isinstance(klass, type) and issubclass(klass, DraftHeadsConfig):
            names += [n for n in inspect.get_annotations(klass) if n not in names and n not in _FROM_MODEL]
    return names


def _config(where: str, config_class: type, fields: dict[str, Any]) -> Any:
    with refused_as(where):
        return config_class(**fields)
