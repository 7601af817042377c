"""Calibrating a lossy acceptance rule on held-out prompts so that the task score stays within a target.

A lossy rule (FLy's entropy gate, a CoSpec arbiter's threshold) trades quality for target forwards through
a knob. Calibration decodes held-out prompts with strict verification (the target's own answers) and with
the rule at each candidate setting, from the strictest to the loosest, and keeps the setting with the fewest
target forwards whose task score is at least ``target_keep`` × the strict score. Forwards, not seconds, rank
the candidates: they do not depend on machine load, and at equal drafting they set the speed. Without
reference answers the score is agreement with the strict answers (SQuAD token F1 between the two texts), so
strict scores 1.0.

With ``confidence`` (e.g. 0.9), a setting qualifies only if the one-sided lower confidence bound of its
score, paired per prompt with strict's, clears the target: on a few dozen held-out prompts a point estimate
of 101% can hide a test score of 90%, and the bound makes the choice that much more cautious.

Within a group of candidates (one FLy window; an arbiter's thresholds) the search stops at the first setting
that misses the target: a looser setting keeps a superset of mismatches in a round, so quality is assumed
to fall monotonically. Strict verification is the fallback that always qualifies, and it is chosen unless a
qualifying loose setting needs fewer target forwards (:func:`sweep_settings`).

- :func:`calibrate_fly` (behind ``FLy.calibrate``): the entropy threshold θ and window W;
- :func:`~.cospec.calibration.calibrate_arbiter`: a CoSpec arbiter's decision threshold.

Example:
    >>> fly = FLy.calibrate(model, draft, held_out, target_keep=0.99, tokenizer=tok)  # doctest: +SKIP
    >>> fly.entropy_threshold, fly.calibration["chosen"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..evaluation.squad import squad_scores
from ..evaluation.uncertainty import paired_difference
from ..utils import InvalidArgumentTypeError, check_bool, check_float, check_int, get_logger, progress_bar
from .task_answers import (
    Reward,
    TaskExample,
    TaskReward,
    answer_text,
    generate_answer,
    resolve_reward,
    stop_token_ids,
    task_examples,
)

__all__ = ["DEFAULT_THRESHOLDS", "HeldOut", "calibrate_fly", "candidate_list", "sweep_settings"]

logger = get_logger(__name__)
# FLy's top-3 entropy (not renormalised) never exceeds ln 3 ≈ 1.1 nats, so higher thresholds are strict decoding.
DEFAULT_THRESHOLDS = (1.0, 0.8, 0.6, 0.45, 0.3)


def sweep_settings(
    evaluate: Callable[[Any], dict[str, Any]],
    groups: Sequence[Sequence[Any]],
    strict: dict[str, Any],
    target_keep: float,
    describe: Callable[[Any], dict[str, Any]] = lambda setting: {"setting": setting},
    confidence: float | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate candidate settings lazily and pick the calibrated one: ``(chosen row, every row tried)``.

    ``groups`` hold settings ordered from the strictest to the loosest; each group's scan stops at the first
    setting scoring below ``target_keep × strict["score"]``. ``evaluate(setting)`` returns at least ``score``
    and ``target_forwards``; ``strict`` is the same for strict verification. The chosen row is the qualifying
    one with the fewest target forwards (ties: the looser), or strict (``row["loose"] is False``) when no
    qualifying setting needs fewer target forwards than strict. With ``confidence``, results also hold per-prompt
    ``scores`` (strict's too) and a setting qualifies when strict's mean plus the lower ``confidence`` bound of the
    paired per-prompt difference (normal approximation) reaches the goal; each row records that ``lower_bound``.

    Example:
        >>> scores = {0.9: 1.0, 0.5: 0.995, 0.1: 0.5}                     # score by threshold; strict scores 1.0
        >>> run = lambda t: {"score": scores[t], "target_forwards": int(100 * t)}
        >>> chosen, tried = sweep_settings(run, [[0.9, 0.5, 0.1]], {"score": 1.0, "target_forwards": 100}, 0.99)
        >>> chosen["setting"], len(tried)                                   # 0.1 misses: the scan stops there
        (0.5, 4)
    """
    if strict["score"] <= 0:
        raise ValueError(
            "The target scores 0 on these held-out prompts with strict decoding, so any setting 'keeps' its score; "
            "calibrate on prompts it answers (or pass prompts without answers to calibrate on agreement with strict).")
    goal = target_keep * strict["score"]
    z = NormalDist().inv_cdf(confidence) if confidence is not None else None
    tried = [{"loose": False, **_finite(strict), "kept": 1.0}]
    best = tried[0]
    progress = progress_bar(total=sum(len(g) for g in groups), desc="calibration", unit="setting")
    for group in groups:
        for setting in group:
            result = evaluate(setting)
            progress.update()
            row = {**describe(setting), "loose": True, **_finite(result), "kept": result["score"] / strict["score"]}
            judged = row["score"]
            if z is not None:
                difference, error = paired_difference(result["scores"], strict["scores"])
                judged = row["lower_bound"] = strict["score"] + difference - z * (0.0 if math.isnan(error) else error)
            tried.append(row)
            logger.info("calibration: %s score %.4f (%.1f%% of strict)%s, %d target forwards",
                        describe(setting), result["score"], 100 * row["kept"],
                        f", lower bound {judged:.4f}" if z is not None else "", result["target_forwards"])
            if judged < goal - 1e-12:
                break  # looser settings keep even more mismatches
            if row["target_forwards"] <= best["target_forwards"] and (best["loose"] or row["target_forwards"] < best["target_forwards"]):
                best = row
    progress.close()
    if not best["loose"]:
        met = any(row["loose"] and row.get("lower_bound", row["score"]) >= goal - 1e-12 for row in tried)
        logger.warning("No loose setting kept %.1f%% of the strict score%s; calibrated to strict verification.",
                       100 * target_keep, " with fewer target forwards than strict" if met else "")
    return best, tried


@dataclass
class HeldOut:
    """Held-out prompts ready for calibration: examples, their score function, and what the score means."""

    examples: list[TaskExample]
    score_fn: TaskReward  # its answer_unit cuts every answer, with or without references
    with_answers: bool
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_new_tokens: int
    stop_ids: list[int]
    confidence: float | None = None  # qualify settings by this lower bound of their paired score (sweep_settings)

    @classmethod
    def prepare(cls, model, held_out_prompts, tokenizer, reward: str | Reward = "squad_f1", *, target_keep: float,
                max_new_tokens: int = 32, stop_at_newline: bool = True, confidence: float | None = None) -> HeldOut:
        """Check the arguments and normalise the prompts (plain strings or items without answers: agreement)."""
        check_float("target_keep", target_keep, low=0.0, high=1.0, low_open=True,
                    hint="It is the share of strict decoding's score to keep, e.g. 0.99.")
        if confidence is not None:
            check_float("confidence", confidence, low=0.5, high=1.0, high_open=True,
                        hint="It is the one-sided confidence of the score's lower bound, e.g. 0.9; None uses the mean.")
        if not isinstance(model, PreTrainedModel):
            raise InvalidArgumentTypeError(f"model must be the target causal LM (PreTrainedModel), got {type(model).__name__}.")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise InvalidArgumentTypeError(f"tokenizer must be the target's tokenizer, got {type(tokenizer).__name__}.")
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        check_bool("stop_at_newline", stop_at_newline)
        if isinstance(held_out_prompts, (str, bytes, Mapping)) or not isinstance(held_out_prompts, Iterable):
            raise InvalidArgumentTypeError(  # one string would be read as prompts of one letter each
                "held_out_prompts must be a list of prompts (strings, or dicts with 'prompt' or 'input_ids' and "
                f"optional 'answers'), got {type(held_out_prompts).__name__}.")
        # A generator is read once, here: the checks below and the scoring read the list.
        items = [{"prompt": p, "answers": None} if isinstance(p, str) else p for p in held_out_prompts]
        score_fn = resolve_reward(reward)  # an unknown name is refused whatever the prompts hold
        answered = [isinstance(i, TaskExample) or (isinstance(i, dict) and bool(i.get("answers"))) for i in items]
        if any(answered) and not all(answered):
            raise ValueError(
                f"held_out_prompts mixes items with reference answers and {answered.count(False)} without; give every "
                "item non-empty `answers` (scored by the reward) or none (scored by agreement with strict decoding).")
        with_answers = bool(items) and all(answered)
        if with_answers:
            examples = task_examples(items, tokenizer)
        else:
            examples = task_examples([{**i, "answers": ["-"]} for i in items], tokenizer)  # set by strict()
            score_fn = TaskReward(
                lambda text, answers: squad_scores(text, answers)[1] if answers[0].strip() else float(not text.strip()),
                score_fn.answer_unit)
        return cls(examples, score_fn, with_answers, model, tokenizer, max_new_tokens,
                   stop_token_ids(model, tokenizer, stop_at_newline), confidence)

    def run(self, strategy) -> dict[str, Any]:
        """Decode every prompt with ``strategy``: mean and per-prompt scores, target forwards, accepted tokens per forward."""
        scores, forwards, new_tokens, answers = [], 0, 0, []
        for example in self.examples:
            unit = self.score_fn.answer_unit
            sequence = generate_answer(self.model, example.input_ids, self.tokenizer, max_new_tokens=self.max_new_tokens,
                                       stop_ids=self.stop_ids, strategy=strategy, answer_unit=unit)
            text = answer_text(self.tokenizer, sequence[example.input_ids.shape[1]:], unit)
            answers.append(text)
            scores.append(self.score_fn(text, example.answers))
            forwards += strategy.last_metrics.target_forwards
            new_tokens += strategy.last_metrics.new_tokens
        return {"score": sum(scores) / len(scores), "scores": scores, "target_forwards": forwards,
                "accepted_per_forward": new_tokens / max(1, forwards), "answers": answers}

    def strict(self, strategy) -> dict[str, Any]:
        """:meth:`run` with strict verification; without answers its texts become the references (score 1.0)."""
        result = self.run(strategy)
        if not self.with_answers:
            for example, text in zip(self.examples, result["answers"]):
                example.answers = [text]
            result["score"], result["scores"] = 1.0, [1.0] * len(self.examples)
        return result

    def report(self, target_keep: float, strict: dict[str, Any], tried: list[dict[str, Any]], chosen: dict[str, Any],
               keys: Sequence[str]) -> dict[str, Any]:
        """The ``calibration`` record strategies and arbiters keep (what was tried, what was chosen; no answers)."""
        picked = {k: chosen.get(k) for k in (*keys, "loose", "score", "kept", "target_forwards")}
        if "lower_bound" in chosen:
            picked["lower_bound"] = chosen["lower_bound"]
        return {
            "target_keep": target_keep, "confidence": self.confidence,
            "score": "task" if self.with_answers else "agreement with strict",
            "prompts": len(self.examples), "strict_score": strict["score"],
            "tried": [{k: v for k, v in row.items() if k not in ("answers", "scores")} for row in tried],
            "chosen": picked,
        }


def candidate_list(name: str, values: Any) -> list:
    """The candidate settings a calibration scans, as a list; refused when not a list or empty, since no candidate
    at all would leave strict decoding chosen in silence.

    Example:
        >>> candidate_list("thresholds", 0.5)
        Traceback (most recent call last):
        ...
        hf_compress.utils.validation.InvalidArgumentTypeError: thresholds must be a non-empty list of candidates, e.g. thresholds=[0.5], got float.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidArgumentTypeError(f"{name} must be a non-empty list of candidates, e.g. {name}=[{values!r}], got "
                                       f"{type(values).__name__}.")
    values = list(values)
    if not values:
        raise ValueError(f"{name} must be a non-empty list of candidates, got none.")
    return values


def calibrate_fly(
    model: PreTrainedModel,
    drafter: PreTrainedModel | str | None,
    held_out_prompts: Sequence[Any],
    target_keep: float = 0.99,
    *,
    tokenizer: PreTrainedTokenizerBase,
    reward: str | Reward = "squad_f1",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    windows: Sequence[int] = (6,),
    max_new_tokens: int = 32,
    stop_at_newline: bool = True,
    confidence: float | None = None,
    strategy_class=None,
    **fly_kwargs: Any,
):
    """The FLy strategy (``strategy_class``, default :class:`~.strategies.FLy`) calibrated on ``held_out_prompts``.

    Args:
        model: The target.
        drafter: Draft model (or path / Hub id), or ``None`` / ``"ngram"`` for n-gram drafting.
        held_out_prompts: Items with ``input_ids`` or a ``prompt`` string, and ``answers`` for a task score; plain
            strings or items without answers use agreement with strict decoding instead.
        target_keep: The calibrated FLy must score at least this share of strict decoding's score.
        tokenizer: The target's tokenizer (decodes answers).
        reward: Task score with answers (a name of ``REWARDS``, e.g. ``"squad_f1"`` or ``"lambada_accuracy"``,
            or a callable).
        thresholds / windows: Candidate entropy thresholds (nats) and deferred-window lengths.
        max_new_tokens / stop_at_newline: The answer budget (answers are the first line, or the first word for a
            reward whose ``answer_unit`` is ``"word"``).
        confidence: Qualify a setting by the lower bound (at this one-sided confidence, e.g. 0.9) of its paired
            per-prompt score instead of its mean; ``None``: the mean (:func:`sweep_settings`).
        fly_kwargs: Other FLy settings (``num_draft_tokens``, ``use_ngram``, ``tokenizer``/``draft_tokenizer`` for
            cross-tokenizer drafts, ...).

    Returns:
        The chosen FLy; its ``calibration`` attribute lists every candidate tried (score, share kept,
        target forwards, accepted tokens per forward) and the chosen one.
    """
    from .strategies import FLy

    strategy_class = strategy_class or FLy
    held = HeldOut.prepare(model, held_out_prompts, tokenizer, reward, target_keep=target_keep,
                           max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline, confidence=confidence)
    thresholds = sorted({check_float("thresholds[]", t, low=0.0) for t in candidate_list("thresholds", thresholds)},
                        reverse=True)
    windows = [check_int("windows[]", w, minimum=1) for w in candidate_list("windows", windows)]
    draft = None if drafter == "ngram" else drafter
    if fly_kwargs.get("draft_tokenizer") is not None:
        fly_kwargs["tokenizer"] = tokenizer  # a cross-tokenizer pair: the target's tokenizer is this one
    strict_strategy = strategy_class(draft, loose=False, **fly_kwargs)
    strict = held.strict(strict_strategy)
    # The strict run loaded a draft (and tokenizers) given by name: every candidate reuses them, not loads its own.
    if draft is not None:
        draft = strict_strategy.draft_model
    for name in ("tokenizer", "draft_tokenizer"):
        if fly_kwargs.get(name) is not None:
            fly_kwargs[name] = getattr(strict_strategy, name)
    best, tried = sweep_settings(
        lambda s: held.run(strategy_class(draft, entropy_threshold=s[1], window=s[0], **fly_kwargs)),
        [[(w, t) for t in thresholds] for w in windows], strict, target_keep,
        describe=lambda s: {"threshold": s[1], "window": s[0]}, confidence=held.confidence)
    tried[0].update(threshold=None, window=None)
    chosen = (strategy_class(draft, entropy_threshold=best["threshold"], window=best["window"], **fly_kwargs)
              if best["loose"] else strict_strategy)
    chosen.calibration = held.report(target_keep, strict, tried, best, ("threshold", "window"))
    return chosen


def _finite(result: dict[str, Any]) -> dict[str, Any]:
    if not math.isfinite(result["score"]):
        raise ValueError("The reward returned a non-finite score.")
    return dict(result)


