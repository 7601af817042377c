"""Short-answer tasks for lossy decoding: prompts with reference answers, rewards, greedy answers.

Shared by what tunes a lossy acceptance rule against a task score: CoSpec's arbiter training
(:mod:`.cospec.training`) and FLy's calibration (:mod:`.calibration`). A reward says what its answer is:
the first line of the generated text (SQuAD; generation stops at the first newline by default, since
nothing after it is scored) or its first word (LAMBADA; generation stops once that word is complete, so a
lossy rule cannot look faster by racing through text no score reads).

Example:
    >>> resolve_reward("squad_f1")("the Eiffel Tower", ["Eiffel Tower"])
    1.0
    >>> resolve_reward("lambada_accuracy").answer_unit
    'word'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from .._compat import cache_kwarg_name, cache_of_output
from ..evaluation.lambada import ends_first_word, first_word, last_word_accuracy
from ..evaluation.squad import squad_scores
from ..utils import InvalidArgumentTypeError

__all__ = ["REWARDS", "AnswerUnit", "FirstWordStop", "Reward", "TaskExample", "TaskReward", "answer_stopping_criteria",
           "answer_text", "generate_answer", "prefix_cache", "resolve_reward", "stop_token_ids", "task_examples"]

Reward = Callable[[str, list[str]], float]
AnswerUnit = Literal["line", "word"]
ANSWER_UNITS: tuple[str, ...] = ("line", "word")


@dataclass(frozen=True)
class TaskReward:
    """A task score ``(answer_text, reference_answers) -> float`` and the unit its answer is cut to.

    ``answer_unit``: ``"line"`` (the answer is the generated text's first line) or ``"word"`` (its first word;
    generation stops once that word is complete). A plain callable given as a reward scores lines.
    """

    score: Reward
    answer_unit: AnswerUnit = "line"

    def __post_init__(self):
        if self.answer_unit not in ANSWER_UNITS:
            raise ValueError(f"answer_unit must be one of {ANSWER_UNITS}, got {self.answer_unit!r}.")

    def __call__(self, text: str, answers: list[str]) -> float:
        # Checked on every call: a NaN would make every comparison false and label every fork TARGET in silence.
        score = self.score(text, answers)
        try:
            value = float(score)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(score, (str, bytes)) or not math.isfinite(value):
            raise ValueError(f"The reward must return a finite number, got {score!r} for the answer {text[:40]!r}.")
        return value


REWARDS: dict[str, TaskReward] = {
    "squad_f1": TaskReward(lambda text, answers: squad_scores(text, answers)[1]),
    "squad_exact_match": TaskReward(lambda text, answers: squad_scores(text, answers)[0]),
    "lambada_accuracy": TaskReward(last_word_accuracy, "word"),
}


def resolve_reward(reward: str | Reward) -> TaskReward:
    """A reward name of :data:`REWARDS`, a :class:`TaskReward`, or a callable ``(answer_text, reference_answers) -> float``
    (scored on the answer's first line)."""
    if isinstance(reward, TaskReward):
        return reward
    if callable(reward):
        return TaskReward(reward)
    if isinstance(reward, str) and reward in REWARDS:
        return REWARDS[reward]
    raise ValueError(f"Unknown reward {reward!r}: use one of {sorted(REWARDS)} or a callable (text, answers) -> float.")


class FirstWordStop(StoppingCriteria):
    """Stop once the generated text holds a complete first word (the answer unit ``"word"``).

    ``answer_start``: the answer's first position in the sequence (an oracle fork continues an answer begun
    before its prefix ends). Without it the criterion finds the start by itself: a call whose sequence does not
    extend the previous call's by one token begins a new generation, whose answer starts at its last token. So
    one instance can be passed to many ``generate()`` calls (greedy or a speculative strategy, which checks
    every accepted token). Batch size 1: the task helpers generate one prompt at a time.

    Example:
        >>> model.generate(ids, max_new_tokens=8, stopping_criteria=StoppingCriteriaList([FirstWordStop(tok)]))  # doctest: +SKIP
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, answer_start: int | None = None):
        self.tokenizer = tokenizer
        self.fixed_start = answer_start
        self._previous: torch.Tensor | None = None
        self._answer_start = answer_start or 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[0] != 1:
            raise ValueError(f"FirstWordStop handles one sequence at a time, got a batch of {input_ids.shape[0]}.")
        row = input_ids[0]
        previous = self._previous
        continues = (previous is not None and row.shape[0] == previous.shape[0] + 1
                     and torch.equal(row[:-1], previous.to(row.device)))
        if not continues and self.fixed_start is None:
            self._answer_start = row.shape[0] - 1
        self._previous = row
        text = self.tokenizer.decode(row[self._answer_start:], skip_special_tokens=True)
        return torch.full((1,), ends_first_word(text), dtype=torch.bool, device=input_ids.device)


def answer_stopping_criteria(tokenizer: PreTrainedTokenizerBase, answer_unit: AnswerUnit,
                             answer_start: int | None = None) -> StoppingCriteriaList | None:
    """What ends an answer besides the stop ids: a :class:`FirstWordStop` for ``"word"``; nothing for ``"line"``.

    Example:
        >>> answer_stopping_criteria(tok, "word")  # pass as generate(stopping_criteria=...)  # doctest: +SKIP
    """
    return StoppingCriteriaList([FirstWordStop(tokenizer, answer_start)]) if answer_unit == "word" else None


@dataclass
class TaskExample:
    """One prompt (``(1, n)`` token ids) with its reference answers."""

    input_ids: torch.LongTensor
    answers: list[str]


def task_examples(task_dataset: Sequence[Any], tokenizer: PreTrainedTokenizerBase | None = None) -> list[TaskExample]:
    """Normalise a task dataset: items with ``answers`` and either ``input_ids`` or a ``prompt`` string.

    A ``prompt`` is tokenised as is (apply a chat template yourself and pass ``input_ids`` for chat models).
    """
    if isinstance(task_dataset, (str, bytes)) or not hasattr(task_dataset, "__len__"):
        raise InvalidArgumentTypeError(
            f"task_dataset must be a sequence of dicts with 'answers' and 'input_ids' or 'prompt', got {type(task_dataset).__name__}.")
    if len(task_dataset) == 0:
        raise ValueError("task_dataset is empty; pass prompts with reference answers.")
    examples = []
    for i, item in enumerate(task_dataset):
        if isinstance(item, TaskExample):
            examples.append(item)
            continue
        if not isinstance(item, dict):
            raise InvalidArgumentTypeError(f"task_dataset[{i}] must be a dict, got {type(item).__name__}.")
        answers = item.get("answers")
        if isinstance(answers, str):
            answers = [answers]
        elif isinstance(answers, Mapping):  # SQuAD's own layout: {"text": [...], "answer_start": [...]}
            if "text" not in answers:
                raise ValueError(f"task_dataset[{i}]['answers'] is a mapping without 'text' (keys: "
                                 f"{sorted(answers)[:5]}); give the reference answers as a list of strings.")
            answers = answers["text"]
            answers = [answers] if isinstance(answers, str) else answers
        if not answers or isinstance(answers, Mapping) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"task_dataset[{i}] has no reference answers: give it 'answers' (a list of strings); "
                             "the reward scores the generated answer against them.")
        if item.get("input_ids") is not None:
            ids = torch.as_tensor(item["input_ids"], dtype=torch.long, device="cpu")
            ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
        elif isinstance(item.get("prompt"), str):
            if tokenizer is None:
                raise ValueError("Pass tokenizer= to tokenise the 'prompt' strings of task_dataset.")
            ids = tokenizer(item["prompt"], return_tensors="pt").input_ids
        else:
            raise ValueError(f"task_dataset[{i}] needs 'input_ids' or a 'prompt' string.")
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"task_dataset[{i}]: one non-empty prompt per item, got input_ids of shape {tuple(ids.shape)}.")
        examples.append(TaskExample(ids, list(answers)))
    return examples


@lru_cache(maxsize=8)
def _newline_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    return tuple(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_at_newline: bool = True) -> list[int]:
    """The model's EOS ids, plus every token whose text holds a newline when ``stop_at_newline``."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return eos + (list(_newline_tokens(tokenizer)) if stop_at_newline else [])


def answer_text(tokenizer: PreTrainedTokenizerBase, new_tokens: torch.Tensor, answer_unit: AnswerUnit = "line") -> str:
    """The answer: the generated text's first line, stripped (``answer_unit="word"``: its first word)."""
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    return first_word(text) if answer_unit == "word" else text.strip().split("\n")[0].strip()


def generate_answer(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    strategy=None,
    cache=None,
    answer_unit: AnswerUnit = "line",
    answer_start: int | None = None,
) -> torch.LongTensor:
    """Greedy generation of one prompt ``(1, n)`` (through ``strategy`` if given); the full sequence, on CPU.

    ``cache``: a KV cache already holding a prefix of ``input_ids`` (shorter than it), so only the rest is
    prefilled — the oracle forks of CoSpec's labelling share their prompt this way. ``answer_unit="word"``
    also stops once the answer holds a complete word (:class:`FirstWordStop`); the answer starts at
    ``answer_start`` (a fork's prompt length) or else after ``input_ids``.
    """
    device = model.get_input_embeddings().weight.device
    ids = input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    kwargs = {"custom_generate": strategy} if strategy is not None else {}
    if cache is not None:
        kwargs[cache_kwarg_name(model)] = cache
    criteria = answer_stopping_criteria(tokenizer, answer_unit,
                                        input_ids.shape[1] if answer_start is None else answer_start)
    if criteria is not None:
        kwargs["stopping_criteria"] = criteria
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=stop_ids or None, pad_token_id=pad, **kwargs,
    )[0].cpu()


@torch.no_grad()
def prefix_cache(model: PreTrainedModel, sequence: torch.LongTensor):
    """The KV cache of ``sequence[:-1]`` (one forward), to be copied and cropped for each branch that forks from it.

    Example:
        >>> cache = prefix_cache(model, sequence)                                          # doctest: +SKIP
        >>> fork = copy.deepcopy(cache); fork.crop(position)                                # doctest: +SKIP
        >>> generate_answer(model, branch_ids, tok, max_new_tokens=8, stop_ids=[], cache=fork)  # doctest: +SKIP
    """
    device = model.get_input_embeddings().weight.device
    ids = sequence.reshape(1, -1)[:, :-1].to(device)
    return cache_of_output(model(ids, attention_mask=torch.ones_like(ids), use_cache=True))
