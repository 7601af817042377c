"""Train a ``PermutationLearner`` with ``transformers.Trainer`` (through ``hf_compress.training``).

Only the cost matrices have ``requires_grad`` while training, so the Trainer's optimiser (AdamW,
cosine schedule) sees nothing else, and ``accelerate launch`` / ``torchrun`` scale it unchanged. A
callback feeds the training progress to the learner (temperature annealing: over the steps, or over
``max_train_seconds`` when that budget ends first), stops at ``max_train_seconds`` and keeps the best
permutation: the starting point and, every ``eval_every`` steps and at the end, the Hungarian decoding
of the costs is scored on ``eval_sequences`` fixed windows, held out from training when there are at
least twice as many windows, and offered to a ``selection.KeepBest``: a candidate wins only with a lower
score that beats the start by more than ``selection_margin`` paired standard errors, so the result is
never worse than where it started on that score, and not replaced on noise. The score (``selection``)
is by default the next-token loss of the model pruned by Wanda block by block with those permutations
absorbed. The loss curve comes back from the Trainer's log history (logged at least every
``eval_every`` steps).

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
from .blockwise import BlockwisePermutationLearner
from .learned import PermutationLearner
from .selection import KeepBest, sequential_pruned_losses
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
    batch_size: int = 8,
    skip: Sequence[str] = (),
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Learn the site permutations on ``training_ids`` (``[sequences, seq_len]``); return the best and training info.

    ``skip``: the pruner's skip patterns (left dense by the ``"sequential_ce"`` selection's Wanda pass).

    The info holds ``train_seconds``, ``steps``, ``loss_curve`` (``[step, loss]`` pairs),
    ``temperature_end`` (the temperature reached), ``objective_curve`` (``[step, objective]`` of the
    hard permutations; step 0 is the starting point), ``objective_initial``, ``objective_best``,
    ``selection_curve`` (``[step, mean score]``), ``selection_initial``, ``selection_best``,
    ``selection_lead`` and ``selection_lead_stderr`` (the kept one's lead over the start),
    ``selection_rejected`` (lower means that failed the margin), ``best_step`` (0: nothing beat the start),
    and ``mask_rebuilds``. ``progress=False``: Trainer prints no progress bar or loss dicts.
    """
    from datasets import Dataset
    from transformers import TrainerCallback

    from ...training import (
        TrainingSettings,
        broadcast_from_main,
        largest_over_processes,
        preserved_random_state,
        process_count,
        train_with_trainer,
    )

    if config.num_training_sequences is not None:
        training_ids = training_ids[: config.num_training_sequences]
    # Keep-best scores windows the costs never trained on when there are enough of them (the last
    # ``eval_sequences``): scored on training windows, the choice follows the learner's overfitting.
    total = training_ids.shape[0]
    held_out = total >= 2 * config.eval_sequences
    if held_out:
        train_rows = list(range(total - config.eval_sequences))
        evaluation = torch.arange(total - config.eval_sequences, total, device=training_ids.device)
    else:
        train_rows = list(range(total))
        evaluation = torch.arange(min(config.eval_sequences, total), device=training_ids.device)
        logger.warning("learned permutation: %d windows are too few to hold %d out; keep-best scores training "
                       "windows", total, config.eval_sequences)
    # Every process takes its own batch_size windows per step: the epochs are over all of them together.
    steps = max(1, math.ceil(config.epochs * len(train_rows) / (config.batch_size * process_count())))
    blockwise = config.objective == "block"
    device = next(model.parameters()).device
    evaluation_ids = training_ids[evaluation].to(device)
    setup = time.perf_counter()
    if blockwise:  # its objective reads the captured windows by index
        dataset = Dataset.from_dict({"index": train_rows})
        learner: PermutationLearner = BlockwisePermutationLearner(
            model, sites, input_norms, config, kept, group, initial, training_ids=training_ids, batch_size=batch_size)
    else:
        rows = training_ids[train_rows].tolist()
        dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
        learner = PermutationLearner(model, sites, input_norms, config, kept, group, initial)
        evaluation = evaluation_ids
    setup = time.perf_counter() - setup

    class _Progress(TrainerCallback):  # temperature annealing, the wall-time budget, keep-best
        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.curve: list[list[float]] = []  # [step, training objective]
            self.selection_curve: list[list[float]] = []  # [step, mean selection score]
            self.keep = KeepBest(config.selection_margin)
            self.score(0, settings)  # before Trainer: the settings start the process group under torchrun

        def score(self, step: int, args: Any) -> None:
            hard = list(learner.decode())  # a list of its own: later partial decodes replace entries of the learner's
            objective = learner.objective(hard, evaluation)
            if config.selection == "sequential_ce":
                scores = sequential_pruned_losses(model, learner.site_permutations(hard), f"{kept}:{group}",
                                                  evaluation_ids, skip, batch_size=2)
            elif config.selection == "pruned_ce":
                scores = learner.pruned_losses(hard, evaluation_ids)
            else:
                scores = torch.tensor([objective])
            # Rank 0's scores on every rank (GPU kernels may differ in the last bits): ranks keeping different
            # candidates would absorb different permutations.
            objective, scores = broadcast_from_main((objective, scores.detach().cpu()), args)
            self.curve.append([step, objective])
            self.selection_curve.append([step, float(scores.double().mean())])  # as KeepBest averages
            self.keep.offer(step, hard, scores)

        def elapsed(self, args) -> float:  # one reading for every rank: they anneal and stop alike
            return largest_over_processes(time.perf_counter() - self.start, args.device)

        def on_step_begin(self, args, state, control, **kwargs):
            progress = state.global_step / max(1, state.max_steps - 1)
            if config.max_train_seconds is not None:  # a budget that stops training early still anneals fully
                progress = max(progress, self.elapsed(args) / config.max_train_seconds)
            learner.progress = min(progress, 1.0)

        def on_step_end(self, args, state, control, **kwargs):
            budget = config.max_train_seconds
            if budget is not None and self.elapsed(args) > budget:
                logger.warning("learned permutation: stopping at step %d (max_train_seconds=%g)",
                               state.global_step, budget)
                control.should_training_stop = True
                control.should_log = True  # the loss curve ends where training did
            if state.global_step % config.eval_every == 0 or control.should_training_stop:
                self.score(state.global_step, args)

        def on_train_end(self, args, state, control, **kwargs):
            if self.curve[-1][0] != state.global_step:
                self.score(state.global_step, args)

    settings = TrainingSettings(
        max_steps=steps, learning_rate=config.learning_rate, per_device_batch_size=config.batch_size,
        lr_scheduler_type="cosine", seed=config.seed,
        # At least as often as keep-best scores: a time budget may stop training long before steps // 25.
        logging_steps=max(1, min(steps // 25, config.eval_every)),
        progress=progress, device=device,  # where the model is: Trainer would otherwise pick its first GPU
    )
    frozen = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    training = model.training
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()  # dropout off: the loss must see the network that will be exported
    try:
        tracker = _Progress()
        # Inside prune(): the caller's random generators are not Trainer's to re-seed.
        with tempfile.TemporaryDirectory(prefix="hf_compress_permutation_") as folder, preserved_random_state():
            result = train_with_trainer(learner, dataset, folder, settings, callbacks=[tracker])
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(frozen[name])
        model.train(training)
    curve = [[entry["step"], entry["loss"]] for entry in result["log_history"] if "loss" in entry]
    keep = tracker.keep
    info = {
        "train_seconds": result["train_seconds"], "setup_seconds": setup, "steps": result["global_step"],
        "loss_curve": curve, "temperature_end": learner.temperature,
        "cost_parameters": sum(c.numel() for c in learner.costs), "objective": config.objective,
        "objective_curve": tracker.curve, "objective_initial": tracker.curve[0][1],
        "objective_best": dict(tracker.curve)[keep.best_step], "best_step": keep.best_step,
        "selection": config.selection, "selection_curve": tracker.selection_curve,
        "selection_initial": keep.start_mean, "selection_best": keep.best_mean,
        "selection_lead": keep.lead, "selection_lead_stderr": keep.lead_stderr,
        "selection_margin": config.selection_margin, "selection_rejected": keep.rejected,
        "mask_rebuilds": learner.mask_rebuilds, "selection_windows": "held-out" if held_out else "training",
    }
    logger.info("learned permutation: %d steps in %.0f s; %s %.5f at the start, kept %.5f (step %d; %d better means "
                "inside %g standard errors rejected)", info["steps"], info["train_seconds"], config.selection,
                keep.start_mean, keep.best_mean, keep.best_step, keep.rejected, config.selection_margin)
    return learner.site_permutations(tracker.keep.best), info
