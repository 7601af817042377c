"""Generation throughput: tokens per second per prompt, reported as a median over prompts.

Each prompt is generated on its own (batch 1) after one untimed warm-up generation; the timer covers
the whole ``generate`` call (prefill included), and the token count is the number of new tokens
actually produced. Strategies that report speculative statistics (an output with ``metrics``, as
hf_compress decoding strategies return with ``return_dict_in_generate=True``) have their mean accepted
length (tokens per target forward) averaged too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.inference_mode()
def measure_generation_speed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    warmup: int = 1,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Median tokens/s of ``model.generate`` over ``prompts`` (greedy unless ``generate_kwargs`` say).

    Returns ``tokens_per_second`` (median), ``per_prompt`` (list), ``new_tokens`` (list), and
    ``mean_accepted_length`` when the strategy reports one. The generated ids are returned under
    ``outputs`` (lists of new-token ids) so callers can check agreement between strategies.

    Example:
        >>> measure_generation_speed(model, tokenizer, ["Once upon a time"], max_new_tokens=32)  # doctest: +SKIP
        {'tokens_per_second': 41.2, ...}
    """
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt.")
    generate_kwargs.setdefault("do_sample", False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate_kwargs.setdefault("pad_token_id", pad)

    def run(prompt: str):
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True, **generate_kwargs)
        elapsed = time.perf_counter() - start
        return out, elapsed, inputs["input_ids"].shape[1]

    for prompt in list(prompts)[:warmup]:
        run(prompt)
    rates, new_tokens, outputs, accepted = [], [], [], []
    for prompt in tqdm(prompts, desc="generation speed", disable=not progress):
        out, elapsed, prompt_len = run(prompt)
        generated = out.sequences[0, prompt_len:].tolist()
        outputs.append(generated)
        new_tokens.append(len(generated))
        rates.append(len(generated) / elapsed)
        length = _mean_accepted_length(getattr(out, "metrics", None))
        if length is not None:
            accepted.append(length)
    result: dict[str, Any] = {
        "tokens_per_second": statistics.median(rates),
        "per_prompt": rates,
        "new_tokens": new_tokens,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "outputs": outputs,
    }
    if accepted:
        result["mean_accepted_length"] = statistics.fmean(accepted)
    return result


def _mean_accepted_length(metrics: Any) -> float | None:
    # SpeculativeMetrics (hf_compress strategies) or a plain mapping with the same key.
    if isinstance(metrics, dict):
        return metrics.get("mean_accepted_length")
    return getattr(metrics, "mean_accepted_length", None)
