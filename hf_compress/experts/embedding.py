"""The semantic space: the base model's own pooled hidden states, standardised and L2-normalised.

Why the base model and not a sentence encoder: nothing may be downloaded here, and no embedding model
installable from PyPI ships its weights inside the package (sentence-transformers, model2vec and
fastembed all fetch weights from the Hub on first use). The base model is on hand, reads the prompts
exactly as the experts will, and routing with it needs no second model in memory.

An embedding is the mean, over the first 128 prompt tokens, of the output of one decoder block (by
default the one an eighth of the way up; only the blocks up to it run, so routing a batch costs about an
eighth of a prefill). On SmolLM2-135M's eight-task mix that early block separates the tasks as well as
any: k-means (K=4) put 93% of the training prompts in their task's majority cluster at block 4 of 30
with 128 tokens and routed 93% of test queries there, as block 7 did with 256 tokens, against 84-86% at
the middle block or block 22 (``bench/results/experts-routing.md``); the routing forward then adds 7%
to a 32-token generation instead of 13% (``bench/results/experts-overhead-block4.md``). Raw pooled
states of a decoder LM share one large common direction and a few huge "massive activation" channels,
which would dominate cosine similarities; :class:`EmbeddingSpace` therefore standardises each channel
with the training set's mean and standard deviation before L2-normalising, and the router stores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..modeling.layers import evaluation_mode, find_decoder_blocks, kept_trainability
from ..utils import InvalidArgumentTypeError, check_int, progress_bar
from .config import DEFAULT_EMBEDDING_TOKENS


__all__ = ["DEFAULT_EMBEDDING_TOKENS", "EmbeddingSpace", "EmbeddingSpec", "check_given_embeddings",
           "default_embedding_layer", "embed_batch", "embed_texts"]


def default_embedding_layer(num_blocks: int) -> int:
    """The decoder block an eighth of the way up, rounded half up: 4 of 30, 2 of 18, 0 of 2 or 3.

    Example:
        >>> default_embedding_layer(30)
        4
    """
    return min(num_blocks - 1, (num_blocks + 4) // 8)


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which hidden state is pooled: the output of decoder block ``layer``, over the first ``max_length`` tokens.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> EmbeddingSpec.for_model(tiny_model("llama")[0])
        EmbeddingSpec(layer=0, max_length=128, pooling='mean')
    """

    layer: int
    max_length: int = DEFAULT_EMBEDDING_TOKENS
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.pooling != "mean":  # the only pooling embed_batch computes: another name must not load as mean
            raise ValueError(f"EmbeddingSpec.pooling must be 'mean', got {self.pooling!r}.")

    @classmethod
    def for_model(cls, model: nn.Module, layer: int | None = None,
                  max_length: int = DEFAULT_EMBEDDING_TOKENS) -> EmbeddingSpec:
        """The spec for ``model``: block ``layer`` or, with ``None``, the block an eighth of the way up
        (index ``(n + 4) // 8``: block 4 of SmolLM2's 30, block 0 of a 2-block test model)."""
        _, blocks = find_decoder_blocks(model)
        if layer is None:
            layer = default_embedding_layer(len(blocks))
        check_int("embedding_layer", layer, minimum=0, maximum=len(blocks) - 1,
                  hint=f"The model has {len(blocks)} decoder blocks.")
        return cls(layer=layer, max_length=check_int("embedding_max_length", max_length, minimum=1))

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    """Raised by the hook on the pooled block: the blocks above it need not run."""


def _plain_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.inference_mode()
def embed_batch(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                spec: EmbeddingSpec) -> torch.Tensor:
    """Raw pooled embeddings ``[batch, hidden]`` (float32, on the CPU) of a token batch, any padding side.

    Each row's real tokens (``attention_mask`` 1; all tokens without a mask) are cut to
    ``spec.max_length`` and re-laid right-padded, so a row embeds the same whether it came left-padded
    from a generation batch or alone. A ``PeftModel`` is run with its adapters disabled: the space is the
    base model's.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = [ids[mask.bool()][: spec.max_length] for ids, mask in zip(input_ids, attention_mask)]
    if any(len(row) == 0 for row in rows):
        raise ValueError("A row of the batch has no tokens (its attention_mask is all zeros); remove it.")
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    captured: list[torch.Tensor] = []

    def stop(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    _, blocks = find_decoder_blocks(_plain_model(model))
    handle = blocks[spec.layer].register_forward_hook(stop)
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else _nothing()
    try:
        with kept_trainability(model), disable, evaluation_mode(model):  # dropout: a prompt's embedding would vary
            _plain_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"Decoder block {spec.layer} did not run; cannot embed with this model.")
    hidden = captured[0].float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * weights).sum(1) / weights.sum(1)).cpu()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_given_embeddings(embeddings: torch.Tensor, rows: int, width: int | None = None) -> torch.Tensor:
    """Embeddings a caller passed instead of computing them (``embeddings=``): a finite ``[rows, width]`` tensor.

    ``width``: the hidden size the router will embed queries in (``train_experts``); the selection takes any width.
    A NaN row would make the selection loop forever and k-means fail deep inside.

    Example:
        >>> check_given_embeddings(torch.zeros(3, 4), rows=2)
        Traceback (most recent call last):
        ...
        ValueError: embeddings has 3 rows for 2 examples.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError("embeddings must be a float tensor [examples, width] (what embed_texts returns), got "
                         f"{getattr(embeddings, 'shape', type(embeddings).__name__)}.")
    if embeddings.shape[0] != rows:
        raise ValueError(f"embeddings has {embeddings.shape[0]} rows for {rows} examples.")
    if width is not None and embeddings.shape[1] != width:
        raise ValueError(
            f"embeddings are {embeddings.shape[1]} wide, but the router embeds queries with the model's hidden states "
            f"({width} wide): pass embed_texts(model, ...) of this model, or leave embeddings=None.")
    bad = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"embeddings row {int(bad[0])} holds NaN or inf ({len(bad)} such rows); recompute them "
                         "(embed_texts in float32) or leave embeddings=None.")
    return embeddings


def embed_texts(model: nn.Module, tokenizer, texts: Sequence[str], spec: EmbeddingSpec, *,
                batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Raw pooled embeddings ``[len(texts), hidden]`` of ``texts``, tokenised as a user would for generation.

    Texts are embedded in batches of similar length (less padding); the result is in the input order.

    Example:
        >>> from hf_compress.assets import tiny_model
        >>> model, tokenizer = tiny_model("llama")
        >>> spec = EmbeddingSpec.for_model(model)
        >>> embed_texts(model, tokenizer, ["a", "bc"], spec, progress=False).shape
        torch.Size([2, 64])
    """
    if not texts:
        raise ValueError("texts is empty; pass at least one text to embed.")
    check_int("batch_size", batch_size, minimum=1)
    odd = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if odd:
        raise InvalidArgumentTypeError(f"texts must be prompt strings; texts[{odd[0]}] is a {type(texts[odd[0]]).__name__} "
                                       "(pass each row's prompt text).")
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"][: spec.max_length] for text in texts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"Text(s) {empty[:5]} tokenise to no tokens (an empty prompt?); remove them or give them text.")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    out: torch.Tensor | None = None
    for start in progress_bar(range(0, len(order), batch_size), desc="embedding", disable=not progress, leave=False):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        # Laid out on the CPU (one copy to the model's device per batch, not one per row).
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device="cpu")
        mask = torch.zeros_like(ids)
        for row, index in enumerate(chunk):
            ids[row, : len(encoded[index])] = torch.tensor(encoded[index], device="cpu")
            mask[row, : len(encoded[index])] = 1
        pooled = embed_batch(model, ids.to(device), mask.to(device), spec)
        if out is None:
            out = torch.empty(len(texts), pooled.shape[1], device="cpu")  # embed_batch returns CPU rows
        out[chunk] = pooled
    return out


class EmbeddingSpace:
    """Per-channel standardisation fitted on the training embeddings, then L2 normalisation.

    Example:
        >>> space = EmbeddingSpace.fit(torch.randn(10, 4))
        >>> space(torch.randn(3, 4)).norm(dim=1).allclose(torch.ones(3))
        True
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean = mean.float()
        self.std = std.float()

    @classmethod
    def fit(cls, raw: torch.Tensor) -> EmbeddingSpace:
        raw = raw.float()
        std = raw.std(0, unbiased=False) if len(raw) > 1 else torch.ones(raw.shape[1], device=raw.device)
        # A constant channel carries no information: leave it unscaled rather than divide by zero.
        return cls(raw.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std)))

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"Embeddings of width {raw.shape[-1]} do not fit a space of width {self.mean.shape[0]}.")
        return nn.functional.normalize((raw.float() - self.mean) / self.std, dim=-1)
