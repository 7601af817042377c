"""Generation speed: the one measurement path every speed number goes through (CLI, demo, benchmarks).

Each prompt is generated on its own (batch 1) after untimed warm-up generations; :func:`compare_generation_speed`
times several ``generate`` settings side by side (each prompt through every variant, in rotating order), and
:func:`measure_generation_speed` is its one-variant case. Per prompt it records
the wall time of the whole ``generate`` call (prefill included) and, through a timing streamer, the
decode rate after the first streamed chunk (what a cache or a drafting method changes most): the tokens
streamed after it over the time from it to the last one. Plain decoding streams one token per step; a
drafting method streams each verify round's tokens together, so the first round (prefill plus the drafts
it accepted) never counts as decoding, and an answer finished in one round has no decode rate. Options cover
what the benchmarks need: a forced output length (``force_length``: EOS cannot end a run early), a
reference output per prompt to check losslessness (``reference``), a fresh cache per call
(``cache_factory``), and, for hf_compress decoding strategies (an output with ``metrics``, or the
strategy's ``last_metrics``), the mean accepted length (tokens per target forward) and the share of the
time spent drafting.

Example:
    >>> from hf_compress.assets import tiny_model
    >>> model, tokenizer = tiny_model("llama")
    >>> result = measure_generation_speed(model, tokenizer, ["abc"], max_new_tokens=4, progress=False)
    >>> result["new_tokens"]
    [4]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import _compat
from ..utils import InvalidArgumentTypeError, check_bool, check_int, progress_bar
from ..modeling.layers import evaluation_mode
from .report import synchronize


__all__ = ["compare_generation_speed", "measure_generation_speed", "speed_ratio"]


class _TimingStreamer:
    """Timestamps of the new tokens ``generate`` streams (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first: float | None = None
        self.last: float | None = None
        self.after_first = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        if self.first is None:  # the first round: prefill plus whatever it accepted, not decoding
            self.first = now
        else:
            self.after_first += value.numel()
        self.last = now

    def end(self) -> None:
        pass

    @property
    def decode_tokens_per_second(self) -> float | None:
        if self.first is None or self.last is None or self.last <= self.first or not self.after_first:
            return None
        return self.after_first / (self.last - self.first)


@torch.inference_mode()
def measure_generation_speed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[str | torch.Tensor],
    max_new_tokens: int = 64,
    warmup: int = 1,
    progress: bool = True,
    *,
    force_length: bool = False,
    reference: Sequence[Sequence[int]] | None = None,
    cache_factory: Callable[[], Any] | None = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Median tokens/s of ``model.generate`` over ``prompts`` (greedy unless ``generate_kwargs`` say).

    Args:
        prompts: texts (tokenized with ``tokenizer``) or ``[1, n]`` token-id tensors.
        force_length: generate exactly ``max_new_tokens`` (``min_new_tokens`` too), so rates compare alike.
        reference: the expected new tokens per prompt (e.g. plain greedy's ``outputs``); adds
            ``equal_to_reference`` per prompt and ``all_equal_to_reference``.
        cache_factory: builds the cache handed to each call (e.g. ``lambda: SparKCache(model.config)``).
        generate_kwargs: anything else for ``generate`` (``custom_generate=strategy``, ...).

    Returns ``tokens_per_second`` (median of whole calls), ``decode_tokens_per_second`` (median rate after the
    first streamed chunk, over the prompts that have one), ``per_prompt`` / ``seconds`` / ``new_tokens`` / ``outputs`` (lists, per prompt), and,
    for decoding strategies, ``mean_accepted_length``, ``accepted_lengths``, ``median_drafting_share`` and
    ``strategy_metrics`` (each call's counters).

    Example:
        >>> measure_generation_speed(model, tokenizer, ["Once upon a time"], max_new_tokens=32)  # doctest: +SKIP
        {'tokens_per_second': 41.2, ...}
    """
    return compare_generation_speed(
        model, tokenizer, prompts, {"": generate_kwargs}, max_new_tokens, warmup, progress,
        force_length=force_length, reference=reference, cache_factory=cache_factory,
    )[""]


@torch.inference_mode()
def compare_generation_speed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[str | torch.Tensor],
    variants: Mapping[str, Mapping[str, Any]],
    max_new_tokens: int = 64,
    warmup: int = 1,
    progress: bool = True,
    *,
    force_length: bool = False,
    reference: Sequence[Sequence[int]] | None = None,
    cache_factory: Callable[[], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`measure_generation_speed` for several ``generate`` settings, timed side by side.

    Each prompt is generated once per variant before the next prompt starts, in an order that rotates from
    prompt to prompt, so a slowdown of the machine (another process, thermal drift) lands on every variant
    alike instead of on whichever ran during it; ratios of the returned medians compare like with like.

    Args:
        variants: name → ``generate`` keyword arguments of that variant (``{"custom_generate": strategy}``, ...).
        The others: as for :func:`measure_generation_speed`, shared by every variant.

    Returns:
        name → what :func:`measure_generation_speed` returns for that variant.

    Example:
        >>> speeds = compare_generation_speed(model, tok, prompts, {"strict": {"custom_generate": strict},
        ...                                                          "fly": {"custom_generate": fly}})  # doctest: +SKIP
        >>> speeds["fly"]["tokens_per_second"] / speeds["strict"]["tokens_per_second"]  # doctest: +SKIP
        1.31
    """
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise InvalidArgumentTypeError(
            f"prompts must be a list of texts or [1, n] token-id tensors (wrap a single prompt in a list), "
            f"got {type(prompts).__name__}."
        )
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt.")
    if not isinstance(variants, Mapping) or not variants:
        raise InvalidArgumentTypeError(
            "variants must be a non-empty mapping of name -> generate() keyword arguments, e.g. "
            "{'strict': {'custom_generate': strict}}."
        )
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_int("warmup", warmup, minimum=0)
    check_bool("progress", progress)
    check_bool("force_length", force_length)
    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InvalidArgumentTypeError(
            f"tokenizer must be a transformers tokenizer or None, got {type(tokenizer).__name__}."
        )
    if cache_factory is not None and not callable(cache_factory):
        raise InvalidArgumentTypeError(
            f"cache_factory must be a callable returning a new cache (e.g. lambda: SparKCache(model.config)), "
            f"got {type(cache_factory).__name__}."
        )
    if reference is not None and len(reference) != len(prompts):
        raise ValueError(f"reference has {len(reference)} outputs for {len(prompts)} prompts.")
    settings = {}
    for name, given in variants.items():
        if not isinstance(given, Mapping):
            raise InvalidArgumentTypeError(
                f"variants[{name!r}] must be a mapping of generate() keyword arguments, got {type(given).__name__}."
            )
        kwargs = dict(given)
        kwargs.setdefault("do_sample", False)
        if tokenizer is not None:
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id)
        if force_length:
            kwargs["min_new_tokens"] = max_new_tokens
        settings[name] = kwargs

    def run(prompt: str | torch.Tensor, generate_kwargs: dict[str, Any]):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass one or token-id tensors.")
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        else:
            ids = torch.as_tensor(prompt, device=model.device)
            if ids.ndim > 2 or (ids.ndim == 2 and ids.shape[0] != 1):
                raise ValueError(f"each prompt is one sequence of token ids ([n] or [1, n]), got shape {list(ids.shape)}; "
                                 "time a batch by passing its rows as separate prompts.")
            ids = ids.reshape(1, -1)
        ids = ids.to(model.device)
        kwargs = dict(generate_kwargs)
        if cache_factory is not None:
            kwargs[_compat.cache_kwarg_name(model)] = cache_factory()
        streamer = _TimingStreamer()
        synchronize(model.device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, return_dict_in_generate=True, streamer=streamer,
                             **kwargs)
        synchronize(model.device)  # on CUDA, wait for the last kernels before reading the clock
        elapsed = time.perf_counter() - start
        return out, elapsed, ids.shape[1], streamer

    names = list(settings)
    timings = {name: _Timings(settings[name].get("custom_generate")) for name in names}
    with evaluation_mode(model):  # dropout off: a model left in training mode would sample through it
        for prompt in list(prompts)[:warmup]:
            for name in names:
                run(prompt, settings[name])
        for index, prompt in enumerate(progress_bar(prompts, desc="generation speed", disable=not progress)):
            for offset in range(len(names)):  # rotate which variant goes first
                name = names[(index + offset) % len(names)]
                timings[name].add(*run(prompt, settings[name]))
    return {name: timings[name].result(len(prompts), max_new_tokens, reference) for name in names}


class _Timings:
    """One variant's per-prompt measurements, in prompt order, and their summary."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.rates, self.decode_rates, self.seconds, self.new_tokens, self.outputs = [], [], [], [], []
        self.accepted, self.drafting, self.per_call = [], [], []

    def add(self, out: Any, elapsed: float, prompt_len: int, streamer: _TimingStreamer) -> None:
        generated = out.sequences[0, prompt_len:].tolist()
        self.outputs.append(generated)
        self.new_tokens.append(len(generated))
        self.seconds.append(elapsed)
        self.rates.append(len(generated) / elapsed)
        if streamer.decode_tokens_per_second is not None:
            self.decode_rates.append(streamer.decode_tokens_per_second)
        metrics = getattr(out, "metrics", None) or getattr(self.strategy, "last_metrics", None)
        length = _mean_accepted_length(metrics)
        if length is not None:
            self.accepted.append(length)
            self.drafting.append(getattr(metrics, "drafting_time_s", 0.0) / max(getattr(metrics, "wall_time_s", 0.0), 1e-9))
            self.per_call.append(metrics.to_dict() if hasattr(metrics, "to_dict") else dict(metrics))

    def result(self, prompts: int, max_new_tokens: int, reference: Sequence[Sequence[int]] | None) -> dict[str, Any]:
        result: dict[str, Any] = {
            "tokens_per_second": statistics.median(self.rates),
            "per_prompt": self.rates,
            "seconds": self.seconds,
            "new_tokens": self.new_tokens,
            "prompts": prompts,
            "max_new_tokens": max_new_tokens,
            "outputs": self.outputs,
        }
        if self.decode_rates:
            result["decode_tokens_per_second"] = statistics.median(self.decode_rates)
            result["decode_per_prompt"] = self.decode_rates
        if self.accepted:
            result["mean_accepted_length"] = statistics.fmean(self.accepted)
            result["accepted_lengths"] = self.accepted
            result["median_drafting_share"] = statistics.median(self.drafting)
            result["strategy_metrics"] = self.per_call
        if reference is not None:
            equal = [list(a) == list(b) for a, b in zip(self.outputs, reference, strict=True)]
            result["equal_to_reference"] = equal
            result["all_equal_to_reference"] = all(equal)
        return result


def speed_ratio(rounds: Sequence[float], reference_rounds: Sequence[float]) -> float:
    """Speed of a variant over a reference's, from rates measured in the same rounds (both run once per round).

    The median of the per-round ratios: a machine that speeds up or slows down during a run moves both sides of
    a round alike, which the ratio of the two medians does not cancel. Rounds of different counts (a run cut
    short) fall back to the ratio of the medians.

    Example:
        >>> speed_ratio([5.0, 6.0, 7.0], [10.0, 10.0, 14.0])
        0.5
    """
    if not rounds or not reference_rounds:
        raise ValueError("speed_ratio needs at least one round on each side.")
    if len(rounds) == len(reference_rounds):
        return statistics.median(a / b for a, b in zip(rounds, reference_rounds))
    return statistics.median(rounds) / statistics.median(reference_rounds)


def _mean_accepted_length(metrics: Any) -> float | None:
    # SpeculativeMetrics (hf_compress strategies) or a plain mapping with the same key.
    if isinstance(metrics, dict):
        return metrics.get("mean_accepted_length")
    return getattr(metrics, "mean_accepted_length", None)
