"""Generation speed: the one measurement path every speed number goes through (CLI, demo, benchmarks).

Each prompt is generated on its own (batch 1) after untimed warm-up generations. Per prompt it records
the wall time of the whole ``generate`` call (prefill included) and, through a timing streamer, the
decode rate after the first new token (what a cache or a drafting method changes most). Options cover
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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import _compat
from ..utils import InvalidArgumentTypeError, check_bool, check_int
from .report import synchronize


__all__ = ["measure_generation_speed"]


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
        if self.first is None:
            self.first = now
            self.after_first += value.numel() - 1
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
    first new token), ``per_prompt`` / ``seconds`` / ``new_tokens`` / ``outputs`` (lists, per prompt), and,
    for decoding strategies, ``mean_accepted_length``, ``accepted_lengths``, ``median_drafting_share`` and
    ``strategy_metrics`` (each call's counters).

    Example:
        >>> measure_generation_speed(model, tokenizer, ["Once upon a time"], max_new_tokens=32)  # doctest: +SKIP
        {'tokens_per_second': 41.2, ...}
    """
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise InvalidArgumentTypeError(
            f"prompts must be a list of texts or [1, n] token-id tensors (wrap a single prompt in a list), "
            f"got {type(prompts).__name__}."
        )
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt.")
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
    generate_kwargs.setdefault("do_sample", False)
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generate_kwargs.setdefault("pad_token_id", pad)
    if force_length:
        generate_kwargs["min_new_tokens"] = max_new_tokens
    strategy = generate_kwargs.get("custom_generate")

    def run(prompt: str | torch.Tensor):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass one or token-id tensors.")
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        else:
            ids = torch.as_tensor(prompt, device=model.device).reshape(1, -1)
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

    for prompt in list(prompts)[:warmup]:
        run(prompt)
    rates, decode_rates, seconds, new_tokens, outputs, accepted, drafting, per_call = [], [], [], [], [], [], [], []
    for prompt in tqdm(prompts, desc="generation speed", disable=not progress):
        out, elapsed, prompt_len, streamer = run(prompt)
        generated = out.sequences[0, prompt_len:].tolist()
        outputs.append(generated)
        new_tokens.append(len(generated))
        seconds.append(elapsed)
        rates.append(len(generated) / elapsed)
        if streamer.decode_tokens_per_second is not None:
            decode_rates.append(streamer.decode_tokens_per_second)
        metrics = getattr(out, "metrics", None) or getattr(strategy, "last_metrics", None)
        length = _mean_accepted_length(metrics)
        if length is not None:
            accepted.append(length)
            drafting.append(getattr(metrics, "drafting_time_s", 0.0) / max(getattr(metrics, "wall_time_s", 0.0), 1e-9))
            per_call.append(metrics.to_dict() if hasattr(metrics, "to_dict") else dict(metrics))
    result: dict[str, Any] = {
        "tokens_per_second": statistics.median(rates),
        "per_prompt": rates,
        "seconds": seconds,
        "new_tokens": new_tokens,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "outputs": outputs,
    }
    if decode_rates:
        result["decode_tokens_per_second"] = statistics.median(decode_rates)
        result["decode_per_prompt"] = decode_rates
    if accepted:
        result["mean_accepted_length"] = statistics.fmean(accepted)
        result["accepted_lengths"] = accepted
        result["median_drafting_share"] = statistics.median(drafting)
        result["strategy_metrics"] = per_call
    if reference is not None:
        result["equal_to_reference"] = [list(a) == list(b) for a, b in zip(outputs, reference, strict=True)]
        result["all_equal_to_reference"] = all(result["equal_to_reference"])
    return result


def _mean_accepted_length(metrics: Any) -> float | None:
    # SpeculativeMetrics (hf_compress strategies) or a plain mapping with the same key.
    if isinstance(metrics, dict):
        return metrics.get("mean_accepted_length")
    return getattr(metrics, "mean_accepted_length", None)
