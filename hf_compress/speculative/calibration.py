"""``FLy.calibrate``: choose FLy's entropy threshold (and window) on held-out prompts so quality stays in target.

FLy's θ = 0.3 was set for 70B targets; a 135M target is rarely that confident, so the gate almost never
closes and mismatches are kept that change the answer. Calibration decodes held-out prompts with strict
verification (the target's own answers) and with FLy at each candidate (window, θ), and keeps the setting
with the fewest target forwards whose task score is at least ``target_keep`` × the strict score. Forwards,
not seconds, rank the candidates: they do not depend on machine load, and at equal drafting they set the
speed. Without reference answers the score is agreement with the strict answers (SQuAD token F1 between
the two texts), so strict scores 1.0.

For each window the thresholds are tried from the strictest down, and the search stops at the first that
misses the target (a lower θ keeps a superset of mismatches in a round, so quality is assumed to fall
monotonically); strict verification (``loose=False``) is the fallback that always qualifies.

Example:
    >>> fly = FLy.calibrate(model, draft, held_out, target_keep=0.99, tokenizer=tok)  # doctest: +SKIP
    >>> fly.entropy_threshold, fly.calibration["chosen"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..evaluation.squad import squad_scores
from ..utils import InvalidArgumentTypeError, check_bool, check_float, check_int, get_logger
from .task_answers import (
    Reward,
    TaskExample,
    answer_text,
    generate_answer,
    resolve_reward,
    stop_token_ids,
    task_examples,
)

__all__ = ["DEFAULT_THRESHOLDS", "calibrate_fly"]

logger = get_logger(__name__)
DEFAULT_THRESHOLDS = (3.0, 2.0, 1.5, 1.0, 0.6, 0.3)


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
        reward: Task score with answers (``"squad_f1"``, ``"squad_exact_match"`` or a callable).
        thresholds / windows: Candidate entropy thresholds (nats) and deferred-window lengths.
        max_new_tokens / stop_at_newline: The answer budget (answers are the first line).
        fly_kwargs: Other FLy settings (``num_draft_tokens``, ``use_ngram``, ``tokenizer``/``draft_tokenizer`` for
            cross-tokenizer drafts, ...).

    Returns:
        The chosen FLy; its ``calibration`` attribute lists every candidate tried (score, share kept,
        target forwards, accepted tokens per forward) and the chosen one.
    """
    from .strategies import FLy

    strategy_class = strategy_class or FLy
    if not isinstance(model, PreTrainedModel):
        raise InvalidArgumentTypeError(f"model must be the target causal LM (PreTrainedModel), got {type(model).__name__}.")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InvalidArgumentTypeError(f"tokenizer must be the target's tokenizer, got {type(tokenizer).__name__}.")
    check_float("target_keep", target_keep, low=0.0, high=1.0, low_open=True,
                hint="It is the share of strict decoding's score to keep, e.g. 0.99.")
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_bool("stop_at_newline", stop_at_newline)
    thresholds = sorted({check_float("thresholds[]", t, low=0.0) for t in thresholds}, reverse=True)
    windows = [check_int("windows[]", w, minimum=1) for w in windows]
    if not thresholds or not windows:
        raise ValueError("Pass at least one candidate threshold and one window.")
    items = [{"prompt": p, "answers": None} if isinstance(p, str) else p for p in held_out_prompts] \
        if isinstance(held_out_prompts, (list, tuple)) else held_out_prompts
    with_answers = bool(items) and all(isinstance(i, TaskExample) or (isinstance(i, dict) and i.get("answers")) for i in items)
    if with_answers:
        examples = task_examples(items, tokenizer)
        score_fn = resolve_reward(reward)
    else:
        examples = task_examples([{**i, "answers": ["-"]} for i in items], tokenizer)  # answers set below
        score_fn = lambda text, answers: squad_scores(text, answers)[1] if answers[0].strip() else float(not text.strip())
    draft = None if drafter == "ngram" else drafter
    if fly_kwargs.get("draft_tokenizer") is not None:
        fly_kwargs["tokenizer"] = tokenizer  # a cross-tokenizer pair: the target's tokenizer is this one
    stop_ids = stop_token_ids(model, tokenizer, stop_at_newline)

    def run(strategy) -> dict[str, Any]:
        scores, forwards, new_tokens, answers = [], 0, 0, []
        for example in examples:
            sequence = generate_answer(model, example.input_ids, tokenizer, max_new_tokens=max_new_tokens,
                                       stop_ids=stop_ids, strategy=strategy)
            text = answer_text(tokenizer, sequence[example.input_ids.shape[1]:])
            answers.append(text)
            scores.append(score_fn(text, example.answers))
            forwards += strategy.last_metrics.target_forwards
            new_tokens += strategy.last_metrics.new_tokens
        return {"score": sum(scores) / len(scores), "target_forwards": forwards,
                "accepted_per_forward": new_tokens / max(1, forwards), "answers": answers}

    strict_strategy = strategy_class(draft, loose=False, **fly_kwargs)
    strict = run(strict_strategy)
    if not with_answers:
        for example, text in zip(examples, strict["answers"]):
            example.answers = [text]
        strict["score"] = 1.0
    if strict["score"] <= 0:
        raise ValueError(
            "The target scores 0 on these held-out prompts with strict decoding, so any threshold 'keeps' its score; "
            "calibrate on prompts it answers (or pass prompts without answers to calibrate on agreement with strict).")
    goal = target_keep * strict["score"]
    tried = [{"threshold": None, "window": None, "loose": False, **_public(strict), "kept": 1.0}]
    best = tried[0]
    candidates = [(w, t) for w in windows for t in thresholds]
    progress = tqdm(total=len(candidates), desc="FLy calibration", unit="setting")
    for window in windows:
        for threshold in thresholds:
            result = run(strategy_class(draft, entropy_threshold=threshold, window=window, **fly_kwargs))
            progress.update()
            row = {"threshold": threshold, "window": window, "loose": True, **_public(result),
                   "kept": result["score"] / strict["score"]}
            tried.append(row)
            logger.info("FLy calibration: θ=%s W=%d score %.4f (%.1f%% of strict), %d target forwards",
                        threshold, window, result["score"], 100 * row["kept"], result["target_forwards"])
            if result["score"] < goal - 1e-12:
                break  # lower thresholds keep even more mismatches
            if (row["target_forwards"], -row["score"]) < (best["target_forwards"], -best["score"]):
                best = row
    progress.close()
    if best["loose"]:
        chosen = strategy_class(draft, entropy_threshold=best["threshold"], window=best["window"], **fly_kwargs)
    else:
        met = any(row["loose"] and row["score"] >= goal - 1e-12 for row in tried)
        logger.warning("No FLy setting kept %.1f%% of the strict score%s; calibrated to strict verification.",
                       100 * target_keep, " with fewer target forwards than strict" if met else "")
        chosen = strict_strategy
    chosen.calibration = {
        "target_keep": target_keep, "score": "task" if with_answers else "agreement with strict",
        "prompts": len(examples), "strict_score": strict["score"], "tried": tried,
        "chosen": {k: best[k] for k in ("threshold", "window", "loose", "score", "kept", "target_forwards")},
    }
    return chosen


def _public(result: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in result.items() if k != "answers"}
    if not math.isfinite(out["score"]):
        raise ValueError("The reward returned a non-finite score.")
    return out
