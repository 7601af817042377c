"""Calibrating a CoSpec arbiter's threshold on held-out prompts, the way FLy is calibrated.

An arbiter trained on a handful of oracle labels can keep draft tokens that change answers; its threshold
is the knob. :func:`calibrate_arbiter` decodes held-out prompts with strict verification and with the
arbiter at candidate thresholds, from the strictest down, and keeps the threshold with the fewest target
forwards whose task score is at least ``target_keep`` × strict's (the shared
:func:`~..calibration.sweep_settings`); if none qualifies the threshold becomes ``1.0``: strict verification,
so on the held-out prompts CoSpec never loses more than ``target_keep`` allows. The choice and every
candidate are stored in ``arbiter.config.calibration`` (saved with the arbiter and shown on its card).

Default candidates are quantiles, not a fixed grid: a warm-started arbiter's probabilities can sit anywhere
in (0, 1), so the thresholds are placed where they keep 10%, 20%, 35%, 50% and 75% of the mismatches the
arbiter met on the held-out strict pass.

Example:
    >>> arbiter = calibrate_arbiter(arbiter, model, draft, held_out, target_keep=0.99, tokenizer=tok)  # doctest: +SKIP
    >>> arbiter.config.threshold, arbiter.config.calibration["chosen"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...utils import InvalidArgumentTypeError, check_float
from ..calibration import HeldOut, candidate_list, sweep_settings
from ..task_answers import Reward
from .modeling import CoSpecArbiter
from .rule import DecisionLog
from .strategy import CoSpec

__all__ = ["DEFAULT_KEEP_SHARES", "calibrate_arbiter", "quantile_thresholds"]

DEFAULT_KEEP_SHARES = (0.1, 0.2, 0.35, 0.5, 0.75)


def quantile_thresholds(probabilities: torch.Tensor, keep_shares: Sequence[float]) -> list[float]:
    """Thresholds, strictest first, above which about each ``keep_shares`` of ``probabilities`` lie.

    Example:
        >>> quantile_thresholds(torch.tensor([0.1, 0.2, 0.3, 0.4]), [0.25, 0.5])
        [0.35, 0.25]
    """
    values = sorted(float(p) for p in probabilities.flatten())
    if not values:
        return []
    out = set()
    for share in keep_shares:
        check_float("keep_shares[]", share, low=0.0, high=1.0, low_open=True)
        rank = len(values) - max(1, round(share * len(values)))  # values[rank:] are kept
        below = values[rank - 1] if rank > 0 else 0.0
        out.add(round((below + values[rank]) / 2, 6))  # midway: robust to ties at the edge
    return sorted((t for t in out if t < 1.0), reverse=True)


@torch.no_grad()
def calibrate_arbiter(
    arbiter: CoSpecArbiter,
    model: PreTrainedModel,
    drafter: PreTrainedModel | str | None,
    held_out_prompts: Sequence[Any],
    target_keep: float = 0.99,
    *,
    tokenizer: PreTrainedTokenizerBase,
    reward: str | Reward = "squad_f1",
    thresholds: Sequence[float] | None = None,
    keep_shares: Sequence[float] = DEFAULT_KEEP_SHARES,
    max_new_tokens: int = 32,
    stop_at_newline: bool = True,
    confidence: float | None = None,
    **cospec_kwargs: Any,
) -> CoSpecArbiter:
    """Set ``arbiter.config.threshold`` to the loosest safe threshold on ``held_out_prompts`` (in place).

    Args:
        arbiter: A trained :class:`~.modeling.CoSpecArbiter` for ``model``.
        model / drafter: The target, and the draft model (``None`` / ``"ngram"``: n-gram prompt lookup).
        held_out_prompts: Items with ``input_ids`` or ``prompt`` and ``answers`` (task score), or without
            answers (agreement with strict answers); disjoint from the arbiter's training prompts.
        target_keep: The calibrated arbiter must score at least this share of strict decoding's score.
        thresholds: Candidate thresholds on P(DRAFT); default :func:`quantile_thresholds` of ``keep_shares``.
        reward, max_new_tokens, stop_at_newline, confidence: As for :func:`~..calibration.calibrate_fly`.
        cospec_kwargs: Drafting settings of :class:`~.strategy.CoSpec` (``num_draft_tokens``, ``use_ngram``,
            ``draft_tokenizer`` for a cross-tokenizer pair, ...); ``num_draft_tokens``, ``use_ngram`` and
            ``min_ngram_size`` default to
            the arbiter's (``config``: what it was trained with and what its saved ``custom_generate`` folder uses),
            so the threshold is chosen for the drafting it will run with.

    Returns:
        ``arbiter``, with ``config.threshold`` chosen (``1.0`` = strict when no candidate qualifies) and
        ``config.calibration`` recording every candidate tried and the choice.
    """
    if not isinstance(arbiter, CoSpecArbiter):
        raise InvalidArgumentTypeError(f"arbiter must be a CoSpecArbiter, got {type(arbiter).__name__}.")
    keep_shares = candidate_list("keep_shares", keep_shares)
    thresholds = None if thresholds is None else candidate_list("thresholds", thresholds)
    held = HeldOut.prepare(model, held_out_prompts, tokenizer, reward, target_keep=target_keep,
                           max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline, confidence=confidence)
    arbiter.check_compatible(model, tokenizer)
    draft = None if drafter == "ngram" else drafter
    cospec_kwargs.setdefault("num_draft_tokens", arbiter.config.num_draft_tokens)
    cospec_kwargs.setdefault("use_ngram", arbiter.config.use_ngram)
    cospec_kwargs.setdefault("min_ngram_size", arbiter.config.min_ngram_size)
    if cospec_kwargs.get("draft_tokenizer") is not None:
        cospec_kwargs["tokenizer"] = tokenizer
    strict_strategy = CoSpec(arbiter, draft, mode="strict", **cospec_kwargs)
    strict_strategy.decision_log = log = DecisionLog()  # accumulates over the held-out prompts
    strict = held.strict(strict_strategy)
    if thresholds is None:
        met = torch.stack([d.features for d in log.decisions]) if log.decisions else torch.zeros(0, arbiter.config.num_features)
        probabilities = arbiter(met.to(arbiter.feature_mean.device)).sigmoid().cpu() if len(met) else met
        candidates = quantile_thresholds(probabilities, keep_shares)
    else:
        candidates = sorted({check_float("thresholds[]", t, low=0.0, high=1.0, high_open=True) for t in thresholds},
                            reverse=True)
    best, tried = sweep_settings(lambda t: held.run(CoSpec(arbiter, draft, threshold=t, **cospec_kwargs)),
                                 [candidates], strict, target_keep, describe=lambda t: {"threshold": t},
                                 confidence=held.confidence)
    tried[0]["threshold"] = 1.0
    arbiter.config.threshold = float(best["threshold"]) if best["loose"] else 1.0
    arbiter.config.calibration = {
        **held.report(target_keep, strict, tried, best, ("threshold",)),
        "mismatches_met": len(log.decisions),
        "num_draft_tokens": cospec_kwargs["num_draft_tokens"],
        "use_ngram": cospec_kwargs["use_ngram"],
        "min_ngram_size": cospec_kwargs["min_ngram_size"],
    }
    arbiter.config.calibration["chosen"]["threshold"] = arbiter.config.threshold
    if isinstance(arbiter.config.training, dict):
        arbiter.config.training.pop("calibration_error", None)  # a failed calibration of train_arbiter's, now done
    return arbiter

