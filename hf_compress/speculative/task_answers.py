"""Short-answer tasks for lossy decoding: prompts with reference answers, rewards, greedy answers.

Shared by what tunes a lossy acceptance rule against a task score: CoSpec's arbiter training
(:mod:`.cospec.training`) and FLy's calibration (:mod:`.calibration`). An answer is the first line of the
generated text; generation stops at the first newline by default, since nothing after it is scored.

Example:
    >>> resolve_reward("squad_f1")("the Eiffel Tower", ["Eiffel Tower"])
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .._compat import cache_kwarg_name, cache_of_output
from ..evaluation.squad import squad_scores
from ..utils import InvalidArgumentTypeError

__all__ = ["REWARDS", "Reward", "TaskExample", "answer_text", "generate_answer", "prefix_cache", "resolve_reward",
           "stop_token_ids", "task_examples"]

Reward = Callable[[str, list[str]], float]
REWARDS: dict[str, Reward] = {
    "squad_f1": lambda text, answers: squad_scores(text, answers)[1],
    "squad_exact_match": lambda text, answers: squad_scores(text, answers)[0],
}


def resolve_reward(reward: str | Reward) -> Reward:
    """A reward name of :data:`REWARDS` or a callable ``(answer_text, reference_answers) -> float``."""
    if callable(reward):
        return reward
    if isinstance(reward, str) and reward in REWARDS:
        return REWARDS[reward]
    raise ValueError(f"Unknown reward {reward!r}: use one of {sorted(REWARDS)} or a callable (text, answers) -> float.")


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
        if not answers or not all(isinstance(a, str) for a in answers):
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


def answer_text(tokenizer: PreTrainedTokenizerBase, new_tokens: torch.Tensor) -> str:
    """The answer: the generated text's first line, stripped."""
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip().split("\n")[0].strip()


def generate_answer(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    strategy=None,
    cache=None,
) -> torch.LongTensor:
    """Greedy generation of one prompt ``(1, n)`` (through ``strategy`` if given); the full sequence, on CPU.

    ``cache``: a KV cache already holding a prefix of ``input_ids`` (shorter than it), so only the rest is
    prefilled — the oracle forks of CoSpec's labelling share their prompt this way.
    """
    device = model.get_input_embeddings().weight.device
    ids = input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    kwargs = {"custom_generate": strategy} if strategy is not None else {}
    if cache is not None:
        kwargs[cache_kwarg_name(model)] = cache
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
