"""Language-modelling datasets of fixed-length token windows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from datasets import Dataset

from ..modeling.calibration import calibration_batches


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


__all__ = ["causal_lm_dataset"]


def causal_lm_dataset(
    texts: str | Sequence[str] | Dataset,
    tokenizer: PreTrainedTokenizerBase,
    num_sequences: int,
    seq_len: int = 512,
    seed: int = 0,
) -> Dataset:
    """``num_sequences`` windows of ``seq_len`` tokens (``input_ids`` and ``labels``) for next-token training.

    The windows are drawn exactly like calibration windows (``calibration_batches``: seeded, from the
    text joined into one token stream), so a training run and a calibration pass on the same split
    with the same seed see the same tokens.

    Example:
        >>> from hf_compress.assets import tiny_tokenizer
        >>> data = causal_lm_dataset(["some text " * 20], tiny_tokenizer(), num_sequences=3, seq_len=8)
        >>> len(data), len(data[0]["input_ids"]), data[0]["input_ids"] == data[0]["labels"]
        (3, 8, True)
    """
    windows = calibration_batches(texts, tokenizer, num_sequences=num_sequences, seq_len=seq_len, seed=seed)
    rows = windows.tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": rows})
