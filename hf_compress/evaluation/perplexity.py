"""Perplexity over a text set, with the windowing of the pruning literature (SparseGPT, Wanda).

Procedure (fixed, so numbers are comparable across methods and runs):

1. Documents are joined with ``"\\n\\n"`` and tokenized once, without special tokens.
2. The token stream is cut into consecutive, non-overlapping windows of ``window`` tokens; a final
   partial window is dropped. ``max_windows`` (optional) keeps that many windows evenly spaced over
   the stream, for a fixed, stated subset when the full set is too slow.
3. Each window is scored on its own (no carried-over context): every token but the window's first
   is predicted from the tokens before it in the window.
4. Perplexity = ``exp(total negative log-likelihood / number of predicted tokens)``.

A tokenizer that starts every text with its BOS token (Llama, Mistral, Gemma) says the model was trained to
see one: each window then starts with BOS followed by ``window - 1`` text tokens, all of them scored (the
first from BOS alone, as lm-eval's rolling log-likelihood scores a document's first token), so a window still
holds ``window`` positions and predicts ``window - 1`` tokens. Without it Gemma 3 is scored on inputs unlike
any it was trained on, and its perplexity is inflated. Tokenizers that add no BOS (SmolLM2, GPT-2, the tiny
models) are scored exactly as above.

Windows have equal length, so batches need no padding.

A window longer than the positions the model's config states (``max_position_embeddings``) is refused for learned
position tables (GPT-2, OPT: it would index past them) and, for rotary models, which run past it without an
error, measured with a warning and recorded (``max_position_embeddings`` in the result and the card's settings):
the model is then extrapolating, and the number is not comparable with one measured within its positions.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling.layers import check_within_learned_positions, evaluation_mode, position_limit
from ..utils import InvalidArgumentTypeError, check_bool, check_int, get_logger, progress_bar
from .results import MetricRecord


logger = get_logger(__name__)

_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def tokenize_stream(texts: Sequence[str] | Dataset, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Join documents with a blank line and tokenize them once (cached per tokenizer and text).

    Example:
        >>> ids = tokenize_stream(["First article.", "Second one."], tokenizer)  # doctest: +SKIP
    """
    joined = "\n\n".join(_texts(texts))
    key = (_tokenizer_fingerprint(tokenizer), hashlib.sha1(joined.encode()).hexdigest())
    if key not in _TOKEN_CACHE:
        ids = tokenizer(joined, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long, device="cpu")  # cached; windows move to the model
    return _TOKEN_CACHE[key]


def token_windows(stream: torch.Tensor, window: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a token stream into ``[num_windows, window]`` (partial tail dropped; optional even subset).

    Example:
        >>> token_windows(torch.arange(10), 4).tolist()
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    check_int("window", window)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    check_int("max_windows", max_windows, minimum=1, allow_none=True)
    if not isinstance(stream, torch.Tensor) or stream.ndim != 1:
        raise InvalidArgumentTypeError(f"stream must be a 1-D tensor of token ids, got {type(stream).__name__}.")
    count = stream.numel() // window
    if count == 0:
        raise ValueError(f"The text has {stream.numel()} tokens, fewer than one window of {window}.")
    windows = stream[: count * window].view(count, window)
    if max_windows is not None and max_windows < count:
        keep = torch.linspace(0, count - 1, max_windows, device=stream.device).round().long().unique()
        windows = windows[keep]
    return windows


@torch.inference_mode()
def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] | Dataset,
    window: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    score_last: int | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``texts`` (see the module docstring for the exact procedure).

    ``score_last``: score only the last ``score_last`` predicted tokens of each window (the whole window is still
    the input). What a model that spends less compute on a prompt's earlier tokens (token routing) should be
    judged on: the continuation it is asked for, not its predictions inside the prompt.

    Returns a JSON-ready dict: ``perplexity``, ``nll`` (mean, nats/token), ``window_nlls`` (each window's mean, in
    window order: every window scores as many tokens, so their mean is ``nll``; for a standard error, or a paired
    difference between two models on the same windows), ``tokens`` (predicted), ``windows``, ``window``,
    ``max_windows``, ``score_last``, ``bos`` (each window started with the tokenizer's BOS: see the module
    docstring), ``max_position_embeddings`` (the config's positions when ``window`` exceeds them, else ``None``: see
    the module docstring), ``seconds``. The model is measured in eval mode (its mode is restored after).

    Example:
        >>> from hf_compress.assets import load_text
        >>> evaluate_perplexity(model, tokenizer, load_text("wikipedia", "eval"), window=512)  # doctest: +SKIP
        {'perplexity': 21.4, 'tokens': 159804, ...}
    """
    check_int("window", window)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    check_int("max_windows", max_windows, minimum=1, allow_none=True, hint="None scores every window.")
    check_int("batch_size", batch_size, minimum=1)
    check_score_last(score_last, window)
    check_bool("progress", progress)
    check_tokenizer(tokenizer)
    check_within_learned_positions(model, window, "window is", "window")
    positions = position_limit(model)
    beyond = positions is not None and window > positions
    if beyond:  # rotary/computed positions run past it without an error, as transformers lets them (and warns)
        logger.warning(
            "window is %d tokens, but this model's config states %d positions (max_position_embeddings): the model "
            "extrapolates past what it was trained on, and this perplexity is not comparable with one measured at "
            "window <= %d. The card records it (max_position_embeddings=%d); use window <= %d for a standard number.",
            window, positions, positions, positions, positions)
    scored = window - 1 if score_last is None else score_last
    bos = window_bos(tokenizer)
    if bos is not None and window < 3:
        raise ValueError(f"window must be at least 3 tokens for a tokenizer that starts each window with BOS, got {window}.")
    stream = tokenize_stream(texts, tokenizer)
    text_tokens = window if bos is None else window - 1
    if stream.numel() < text_tokens:
        most = stream.numel() + (bos is not None)
        raise ValueError(f"The text has {stream.numel()} tokens, fewer than one window of {window}"
                         + (" (BOS and " + str(text_tokens) + " text tokens)" if bos is not None else "")
                         + f"; use window <= {most} or pass more text.")
    windows = token_windows(stream, text_tokens, max_windows)
    device = model.device
    # Only the scored tail's logits when that saves work (the whole window stays the input); scoring every token keeps
    # the plain call, which models without the argument take too.
    keep = {"logits_to_keep": scored + 1} if scored < window - 1 else {}
    window_nlls: list[float] = []
    total_tokens = 0
    start = time.perf_counter()
    with evaluation_mode(model):
        for batch in progress_bar(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            if bos is not None:
                batch = torch.cat([batch.new_full((batch.shape[0], 1), bos), batch], dim=1)
            logits = model(input_ids=batch, use_cache=False, **keep).logits
            targets = batch[:, -scored:]
            # Window by window: a float copy and log-softmax of one window's logits, not of the batch's.
            for row in range(targets.shape[0]):
                nll = torch.nn.functional.cross_entropy(logits[row, -scored - 1 : -1].float(), targets[row])
                window_nlls.append(float(nll))
            total_tokens += targets.numel()
            del logits
    seconds = time.perf_counter() - start
    mean_nll = math.fsum(window_nlls) / len(window_nlls)
    logger.info("perplexity %.3f over %d tokens (%d windows of %d) in %.1fs",
                math.exp(mean_nll), total_tokens, len(windows), window, seconds)
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "window_nlls": window_nlls,
        "tokens": total_tokens,
        "windows": len(windows),
        "window": window,
        "max_windows": max_windows,
        "score_last": score_last,
        "bos": bos is not None,
        "max_position_embeddings": positions if beyond else None,
        "seconds": seconds,
    }


def window_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id a perplexity window starts with: the tokenizer's, when it puts one before every text; else ``None``.

    Example:
        >>> from hf_compress.assets.tiny_models import tiny_tokenizer
        >>> window_bos(tiny_tokenizer()) is None  # a byte-level tokenizer that adds no special tokens
        True
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


def check_score_last(score_last: int | None, window: int) -> None:
    """Refuse a ``score_last`` that is not a positive int or exceeds the ``window - 1`` tokens a window predicts."""
    check_int("score_last", score_last, minimum=1, allow_none=True, hint="None scores every predicted token.")
    if score_last is not None and score_last > window - 1:
        raise ValueError(f"score_last={score_last} exceeds the {window - 1} predicted tokens of a {window}-token window.")


def scored_tokens(score_last: int | None) -> str:
    """Which predicted tokens a perplexity scores, in words (for cards and tables).

    Example:
        >>> scored_tokens(None), scored_tokens(128)
        ('all tokens', 'last 128 tokens of each window')
    """
    return "all tokens" if score_last is None else f"last {score_last} tokens of each window"


def perplexity_label(score_last: int | None) -> str:
    """``"Perplexity"``, or ``"Perplexity (last N tokens of each window)"`` for a perplexity of the windows' tails."""
    return "Perplexity" if score_last is None else f"Perplexity ({scored_tokens(score_last)})"


def perplexity_record(result: dict[str, Any], dataset_type: str, dataset_name: str, split: str | None) -> MetricRecord:
    """The model-card record of one :func:`evaluate_perplexity` result.

    Example:
        >>> perplexity_record(result, "wikipedia", "English Wikipedia excerpt", "eval")  # doctest: +SKIP
    """
    settings = {k: result[k] for k in ("window", "windows", "tokens", "max_windows")}
    last = result.get("score_last")
    if last is not None:
        settings["score_last"] = last
    if result.get("bos"):
        settings["bos_per_window"] = True
    if result.get("max_position_embeddings"):  # the window ran past the config's positions: say so on the card
        settings["max_position_embeddings"] = result["max_position_embeddings"]
    return MetricRecord(
        task_type="text-generation",
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split=split,
        metric_type="perplexity",
        metric_name=perplexity_label(last),
        metric_value=round(result["perplexity"], 4),
        metric_config=f"window={result['window']}" + ("" if last is None else f",score_last={last}"),
        settings=settings,
    )


def _texts(texts: Sequence[str] | Dataset) -> Iterable[str]:
    if isinstance(texts, Dataset):
        if "text" not in texts.column_names:
            raise ValueError(f"texts: the Dataset needs a 'text' column, it has {texts.column_names}.")
        return texts["text"]
    if isinstance(texts, str):
        raise TypeError("Pass a list of documents (or a Dataset with a 'text' column), not a single string.")
    documents = list(texts) if isinstance(texts, Iterable) else None
    odd = [t for t in documents if not isinstance(t, str)][:1] if documents is not None else []
    if documents is None or odd:
        got = type(texts).__name__ if documents is None else f"a {type(texts).__name__} holding {type(odd[0]).__name__}"
        hint = " (decode bytes first: text.decode('utf-8'))" if odd and isinstance(odd[0], bytes) else ""
        raise InvalidArgumentTypeError(
            f"texts must be a list of documents (strings) or a Dataset with a 'text' column, got {got}{hint}."
        )
    return documents


def check_tokenizer(tokenizer: Any, name: str = "tokenizer") -> None:
    """Refuse anything but a transformers tokenizer, with one line naming ``name``."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InvalidArgumentTypeError(
            f"{name} must be a transformers tokenizer (PreTrainedTokenizerBase), got {type(tokenizer).__name__}."
        )


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    # What decides the ids, not only the vocabulary: a fast tokenizer's whole pipeline (normaliser, pre-tokeniser,
    # merges, added tokens) serialises to one string; a slow one is described by its vocabulary and settings.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        described = backend.to_str()
    else:
        described = repr((sorted(tokenizer.get_vocab().items()), sorted(map(repr, tokenizer.init_kwargs.items()))))
    return hashlib.sha1(f"{type(tokenizer).__name__}\n{described}".encode()).hexdigest()
