"""The ``training:`` mapping of the steps that train (DL-QAT, the token router, drafting heads).

Every step trains through ``hf_compress.training.train_with_trainer`` on token windows of a calibration text
(``causal_lm_dataset``), seeded with the recipe's seed; this file turns the recipe's few keys into those calls.

Example:
    >>> parse_training("step 2 (quantize dlqat)", {"max_steps": 40}, {"learning_rate": 1e-3})["max_steps"]
    40
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...utils import check_float, check_int, check_str
from ..config import check_keys, refused_as


if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from ...training import TrainingSettings


__all__ = ["TRAINING_DEFAULTS", "parse_training", "training_data", "training_settings"]

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
        check_str("training.lr_scheduler_type", values["lr_scheduler_type"])
        check_str("training.text", values["text"])
    return values


def training_settings(training: dict[str, Any], seed: int, device: torch.device) -> TrainingSettings:
    """``TrainingSettings`` for one step (logging ten times per run; on the CPU when the recipe runs there)."""
    from ...training import TrainingSettings

    return TrainingSettings(
        max_steps=training["max_steps"], learning_rate=training["learning_rate"],
        per_device_batch_size=training["batch_size"], warmup_steps=training["warmup_steps"],
        lr_scheduler_type=training["lr_scheduler_type"], logging_steps=max(1, training["max_steps"] // 10),
        seed=seed, use_cpu=device.type == "cpu",
    )


def training_data(training: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int) -> Dataset:
    """The step's token windows: ``num_sequences`` (default ``max_steps × batch_size``) windows of ``seq_len``."""
    from ...assets import load_calibration_text
    from ...training import causal_lm_dataset

    count = training["num_sequences"] or training["max_steps"] * training["batch_size"]
    return causal_lm_dataset(load_calibration_text(training["text"]), tokenizer, num_sequences=count,
                             seq_len=training["seq_len"], seed=seed)
