"""Train a ``PermutationLearner`` with ``transformers.Trainer`` (through ``hf_compress.training``).

Only the cost matrices have ``requires_grad`` while training, so the Trainer's optimiser (AdamW,
cosine schedule) sees nothing else, and ``accelerate launch`` / ``torchrun`` scale it unchanged. A
callback feeds the training progress to the learner (temperature annealing) and stops at
``max_train_seconds``; the loss curve comes back from the Trainer's log history.

Example:
    >>> perms, info = learn_permutations(model, sites, norms, calibration_ids, config, 2, 4)  # doctest: +SKIP
    >>> info["train_seconds"], info["loss_curve"][:2]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...utils import get_logger
from .config import LearnedPermutationConfig
from .learned import PermutationLearner
from .sites import PermutationSite

__all__ = ["learn_permutations"]

logger = get_logger(__name__)


def learn_permutations(
    model: nn.Module,
    sites: Sequence[PermutationSite],
    input_norms: Mapping[str, torch.Tensor] | None,
    training_ids: torch.Tensor,
    config: LearnedPermutationConfig,
    kept: int,
    group: int,
    initial: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Learn the site permutations on ``training_ids`` (``[sequences, seq_len]``); return them and training info.

    The info holds ``train_seconds``, ``steps``, ``loss_curve`` (``[step, loss]`` pairs) and
    ``temperature_end`` (the temperature reached).
    """
    from datasets import Dataset
    from transformers import TrainerCallback

    from ...training import TrainingSettings, train_with_trainer

    if config.num_training_sequences is not None:
        training_ids = training_ids[: config.num_training_sequences]
    rows = training_ids.tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    steps = max(1, math.ceil(config.epochs * len(rows) / config.batch_size))
    learner = PermutationLearner(model, sites, input_norms, config, kept, group, initial)

    class _Progress(TrainerCallback):  # temperature annealing and the wall-time budget
        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            learner.progress = state.global_step / max(1, state.max_steps - 1)

        def on_step_end(self, args, state, control, **kwargs):
            budget = config.max_train_seconds
            if budget is not None and time.perf_counter() - self.start > budget:
                logger.warning("learned permutation: stopping at step %d (max_train_seconds=%g)",
                               state.global_step, budget)
                control.should_training_stop = True

    device = next(model.parameters()).device
    settings = TrainingSettings(
        max_steps=steps, learning_rate=config.learning_rate, per_device_batch_size=config.batch_size,
        lr_scheduler_type="cosine", logging_steps=max(1, steps // 25), seed=config.seed,
        use_cpu=device.type == "cpu",
    )
    frozen = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    training = model.training
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()  # dropout off: the loss must see the network that will be exported
    try:
        with tempfile.TemporaryDirectory(prefix="hf_compress_permutation_") as folder:
            result = train_with_trainer(learner, dataset, folder, settings, callbacks=[_Progress()])
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(frozen[name])
        model.train(training)
    curve = [[entry["step"], entry["loss"]] for entry in result["log_history"] if "loss" in entry]
    info = {
        "train_seconds": result["train_seconds"], "steps": result["global_step"], "loss_curve": curve,
        "temperature_end": learner.temperature, "cost_parameters": sum(c.numel() for c in learner.costs),
    }
    return learner.hard_permutations(), info
