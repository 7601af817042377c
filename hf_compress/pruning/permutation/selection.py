"""Keep-best for the learned permutation: score candidates on held-out windows, keep one only when it is measurably better.

Training moves the cost matrices; every few steps ``train.py`` decodes them (Hungarian) and offers the candidate
to a ``KeepBest``. Three scores, ``LearnedPermutationConfig.selection``:

- ``"sequential_ce"`` (the default): the next-token loss, per window, of the model with the candidate absorbed and
  pruned by Wanda block by block, each block's statistics gathered on the outputs of the already pruned blocks
  before it — what the pruner that follows does (``sequential_pruned_losses``). It costs a copy of the model and a
  Wanda pass over the selection windows per score.
- ``"pruned_ce"``: the same loss through the learner's own pruned network, whose masks read the *dense* model's
  statistics in one pass (cheaper; a permutation trained against those masks can score well there and
  prune worse sequentially, which was measured: ``permutation-learned-selection.md``).
- ``"objective"``: the training objective (one number, no per-window spread).

A candidate replaces the kept one when its mean is lower *and*, for per-window scores, its mean lead over the
starting point exceeds ``margin`` paired standard errors over the windows. Without that test a lead of 0.0002
nats on eight windows, noise, replaced RIA's permutation with one 10% worse in perplexity.

Example:
    >>> keep = KeepBest(margin=2.0)
    >>> keep.offer(0, "start", torch.tensor([3.0, 3.2, 3.1, 3.3]))
    True
    >>> keep.offer(10, "noise", torch.tensor([3.01, 3.19, 3.08, 3.31]))  # lower mean, inside the noise
    False
    >>> keep.offer(20, "better", torch.tensor([2.9, 3.1, 3.0, 3.2]))
    True
    >>> keep.best, keep.best_step, round(keep.lead, 3)
    ('better', 20, 0.1)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .absorb import absorb_permutations
from .sites import find_sites

__all__ = ["KeepBest", "sequential_pruned_losses", "window_losses"]


class KeepBest:
    """The best candidate offered so far; the first offer is the starting point and is always kept.

    Args:
        margin: paired standard errors (over windows) by which a candidate's mean score must beat the starting
            point's to be kept; 0 keeps any lower mean. A single-number score is compared by value alone.

    Attributes:
        best, best_step, best_mean: the kept candidate, when it was offered, its mean score.
        start_mean: the starting point's mean score.
        lead, lead_stderr: the kept candidate's mean lead over the start and its paired standard error (0 for the start).
        rejected: offers with a lower mean than the kept one that failed the margin.
    """

    def __init__(self, margin: float = 2.0) -> None:
        self.margin = margin
        self.best: Any = None
        self.best_step = 0
        self.best_mean = math.inf
        self.start_mean = math.inf
        self.lead = self.lead_stderr = 0.0
        self.rejected = 0
        self._start: torch.Tensor | None = None

    def offer(self, step: int, candidate: Any, scores: torch.Tensor) -> bool:
        """Consider ``candidate`` with per-window ``scores`` (lower is better); return whether it is now the kept one."""
        scores = scores.detach().double().flatten().cpu()
        mean = float(scores.mean())
        if self._start is None:
            self._start, self.start_mean = scores, mean
            self.best, self.best_step, self.best_mean = candidate, step, mean
            return True
        if not mean < self.best_mean:
            return False
        lead, stderr = _paired_lead(self._start, scores)
        if scores.numel() > 1 and lead <= self.margin * stderr:
            self.rejected += 1
            return False
        self.best, self.best_step, self.best_mean = candidate, step, mean
        self.lead, self.lead_stderr = lead, stderr
        return True


def _paired_lead(start: torch.Tensor, scores: torch.Tensor) -> tuple[float, float]:
    """Mean of ``start − scores`` and its standard error over the windows (0 with one window)."""
    from ...evaluation.uncertainty import paired_difference  # lazy: pruning does not import the evaluation suite

    lead, stderr = paired_difference(start.tolist(), scores.tolist())
    return lead, 0.0 if math.isnan(stderr) else stderr


@torch.no_grad()
def window_losses(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 2, parameters: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Mean next-token loss of each window of ``input_ids`` (``[windows, len]``) → ``[windows]`` (fp32, on CPU).

    ``parameters``: replace these of the model's tensors for the call (``torch.func.functional_call``), as the
    learner's pruned network does. Windows run ``batch_size`` at a time to keep the logits small.
    """
    device = next(model.parameters()).device
    losses = []
    for chunk in input_ids.split(batch_size):
        chunk = chunk.to(device)
        kwargs = {"input_ids": chunk, "use_cache": False}
        if parameters is None:
            logits = model(**kwargs).logits
        else:
            logits = torch.func.functional_call(model, dict(parameters), args=(), kwargs=kwargs, strict=False).logits
        token_losses = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), chunk[:, 1:].flatten(),
                                                   reduction="none")
        losses.append(token_losses.view(chunk.shape[0], -1).mean(dim=1).cpu())
    return torch.cat(losses)


def sequential_pruned_losses(
    model: nn.Module,
    permutations: Mapping[str, torch.Tensor],
    sparsity: str,
    input_ids: torch.Tensor,
    skip: Sequence[str] = (),
    batch_size: int = 2,
) -> torch.Tensor:
    """Per-window loss of ``model`` with ``permutations`` absorbed and pruned by Wanda to ``sparsity`` block by block.

    The statistics and the loss both come from ``input_ids``; ``model`` itself is not modified (a copy is pruned,
    so this holds a second model while it runs).

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, _ = tiny_model("llama")
        >>> identity = {site.name: torch.arange(site.width) for site in find_sites(model)}
        >>> sequential_pruned_losses(model, identity, "2:4", torch.randint(3, 256, (2, 16))).shape
        torch.Size([2])
    """
    from ..wanda import WandaConfig, WandaPruner  # the pruning package imports this one

    candidate = copy.deepcopy(model)
    with _quiet(_PRUNING_LOGGERS):  # one scoring would log every block of a pruning that is not the real one
        absorb_permutations(candidate, find_sites(candidate, skip), permutations)
        config = WandaConfig(sparsity=sparsity, skip=list(skip), batch_size=batch_size)
        pruner = WandaPruner(candidate)
        pruner.run(config, pruner.plan(config), input_ids, progress=False)
    return window_losses(candidate, input_ids, batch_size)


_PRUNING_LOGGERS = ("hf_compress.pruning.mask_pruner", "hf_compress.modeling.calibration",
                    "hf_compress.pruning.permutation.absorb")


@contextlib.contextmanager
def _quiet(names: Sequence[str]):
    """Raise these loggers to WARNING for the block (info lines off, warnings and errors still shown)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
