"""The ``training:`` mapping of the steps that train (DL-QAT, the token router, drafting heads).

Every step trains through ``hf_compress.training.train_with_trainer`` on token windows of a calibration text
(``causal_lm_dataset``), seeded with the recipe's seed; this file turns the recipe's few keys into those calls.

Example:
    >>> parse_training("step 2 (quantize dlqat)", {"max_steps": 40}, {"learning_rate": 1e-3})["max_steps"]
    40
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...utils import check_float, check_int
from ..config import RecipeError, check_keys, refused_as


if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from ...training import TrainingSettings


__all__ = ["TRAINING_DEFAULTS", "check_device", "check_lengths", "check_scheduler", "check_text", "parse_training",
           "training_data", "training_settings"]

TRAINING_DEFAULTS: dict[str, Any] = {
    "max_steps": 100,
    "learning_rate": 1e-3,
    "batch_size": 4,
    "seq_len": 256,
    "num_sequences": None,  # None: max_steps × batch_size windows, each seen once
    "warmup_steps": 0,
    "lr_scheduler_type": "linear",
    "text": "wikipedia",  # load_calibration_text: wikipedia (its calibration split), news or a text file
}

# transformers schedules a recipe cannot drive: the recipe's training has no evaluation and no scheduler kwargs.
_SCHEDULERS_NEEDING_MORE = {
    "reduce_lr_on_plateau": "an evaluation strategy",
    "greedy": "an evaluation strategy",
    "cosine_with_min_lr": "lr_scheduler_kwargs (min_lr or min_lr_rate)",
    "cosine_warmup_with_min_lr": "lr_scheduler_kwargs (min_lr or min_lr_rate)",
    "warmup_stable_decay": "lr_scheduler_kwargs (num_decay_steps)",
}


def parse_training(where: str, data: Any, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``training:`` mapping checked, with the step's ``defaults`` over :data:`TRAINING_DEFAULTS`."""
    values = {**TRAINING_DEFAULTS, **(defaults or {})}
    given = check_keys(f"{where} training", data if data is not None else {}, set(values))
    values.update(given)
    with refused_as(where):
        for name in ("max_steps", "batch_size", "seq_len"):
            values[name] = check_int(f"training.{name}", values[name], minimum=2 if name == "seq_len" else 1)
        values["num_sequences"] = check_int("training.num_sequences", values["num_sequences"], minimum=1,
                                            allow_none=True)
        values["warmup_steps"] = check_int("training.warmup_steps", values["warmup_steps"], minimum=0)
        values["learning_rate"] = check_float("training.learning_rate", values["learning_rate"], low=0.0,
                                              low_open=True)
        check_scheduler(where, values["lr_scheduler_type"])
    check_text(where, "training.text", values["text"])
    return values


def check_text(where: str, name: str, text: Any) -> None:
    """Refuse, before any work, a calibration text ``load_calibration_text`` would refuse mid-run."""
    from ...assets.text import CALIBRATION_TEXTS

    if isinstance(text, str) and (text in CALIBRATION_TEXTS or Path(text).is_file()):
        return
    raise RecipeError(f"{where}: {name} must be {', '.join(repr(t) for t in CALIBRATION_TEXTS)} or the path of an "
                      f"existing UTF-8 text file (relative to the working directory), got {text!r}.")


def check_lengths(where: str, model: Any, lengths: dict[str, Any]) -> None:
    """Refuse, before the first step runs, token lengths (``{"training.seq_len": 600}``) longer than a learned
    position table (GPT-2, OPT): the step would otherwise end in an ``IndexError`` deep in the model, after the
    earlier steps' work.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> check_lengths("step 2 (quantize dlqat)", tiny_model("gpt2")[0], {"training.seq_len": 600})
        Traceback (most recent call last):
        ...
        hf_compress.recipe.config.RecipeError: step 2 (quantize dlqat): training.seq_len is 600 tokens, but this
        model has learned positions for 512 only; use training.seq_len <= 512.
    """
    from ...modeling.layers import check_within_learned_positions

    with refused_as(where):
        for setting, length in lengths.items():
            if isinstance(length, int):
                check_within_learned_positions(model, length, f"{setting} is", setting)


def check_scheduler(where: str, scheduler: Any) -> None:
    """Refuse a learning-rate schedule that ``TrainingArguments`` or the scheduler would refuse once training starts."""
    from transformers.trainer_utils import SchedulerType

    usable = [member.value for member in SchedulerType if member.value not in _SCHEDULERS_NEEDING_MORE]
    if isinstance(scheduler, str) and scheduler in _SCHEDULERS_NEEDING_MORE:
        needs = _SCHEDULERS_NEEDING_MORE[scheduler]
        raise RecipeError(f"{where}: training.lr_scheduler_type {scheduler!r} needs {needs}, which a recipe's training "
                          f"does not set; use one of {', '.join(usable)}.")
    if scheduler not in usable:
        raise RecipeError(f"{where}: training.lr_scheduler_type must be one of {', '.join(usable)}, got {scheduler!r}.")


def check_device(where: str, device: torch.device) -> None:
    """Refuse, before the first step runs, a recipe device its training steps cannot train on (``cuda:1`` in one
    process: ``Trainer`` would move the model to ``cuda:0``; see ``hf_compress.training.check_training_device``).

    Example:
        >>> import torch
        >>> check_device("step 2 (quantize dlqat)", torch.device("cpu"))
    """
    from ...training import check_training_device

    with refused_as(where):
        check_training_device(device)


def training_settings(training: dict[str, Any], seed: int, device: torch.device, progress: bool = True
                      ) -> TrainingSettings:
    """``TrainingSettings`` for one step (logging ten times per run), training on the recipe's ``device``."""
    from ...training import TrainingSettings

    return TrainingSettings(
        max_steps=training["max_steps"], learning_rate=training["learning_rate"],
        per_device_batch_size=training["batch_size"], warmup_steps=training["warmup_steps"],
        lr_scheduler_type=training["lr_scheduler_type"], logging_steps=max(1, training["max_steps"] // 10),
        seed=seed, progress=progress, device=device,
    )


def training_data(training: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int) -> Dataset:
    """The step's token windows: ``num_sequences`` (default ``max_steps × batch_size``) windows of ``seq_len``."""
    from ...assets import load_calibration_text
    from ...training import causal_lm_dataset

    count = training["num_sequences"] or training["max_steps"] * training["batch_size"]
    return causal_lm_dataset(load_calibration_text(training["text"]), tokenizer, num_sequences=count,
                             seq_len=training["seq_len"], seed=seed)
