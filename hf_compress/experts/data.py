"""Instruction data for experts: rows as (prompt, completion) pairs, and packed training windows.

A dataset is a ``datasets.Dataset`` (or a list of dicts) with TRL's prompt-completion columns
``prompt`` and ``completion`` (the prompt is what a query looks like at inference, so it is what gets
embedded and routed; the loss is on the completion), or a single ``text`` column (language-modelling
rows: the whole text is embedded and trained on). A list of strings is a ``text`` dataset.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset


__all__ = ["InstructionRows", "instruction_rows", "packed_instruction_dataset"]


@dataclass(frozen=True)
class InstructionRows:
    """The rows of a dataset as prompts (embedded, routed) and completions (``""`` for text rows)."""

    prompts: list[str]
    completions: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def instruction_rows(dataset: Dataset | Sequence[dict[str, Any]] | Sequence[str], argument: str = "dataset") -> InstructionRows:
    """Read ``prompt``/``completion`` (or ``text``) rows; a clear error for any other layout.

    Example:
        >>> instruction_rows([{"prompt": "2+2=", "completion": " 4"}]).completions
        [' 4']
        >>> instruction_rows(["plain text"]).prompts
        ['plain text']
    """
    if isinstance(dataset, Dataset):
        columns = set(dataset.column_names)
        get = dataset.__getitem__
    elif isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):
        if not dataset:
            raise ValueError(f"{argument} is empty; pass at least one example.")
        if all(isinstance(row, str) for row in dataset):
            return InstructionRows(list(dataset), [""] * len(dataset))
        if not all(isinstance(row, dict) for row in dataset):
            raise TypeError(f"{argument} must be a datasets.Dataset, a list of dicts or a list of strings.")
        columns = set(dataset[0]) if dataset else set()
        get = lambda name: [row[name] for row in dataset]  # noqa: E731
    else:
        raise TypeError(f"{argument} must be a datasets.Dataset, a list of dicts or a list of strings, "
                        f"got {type(dataset).__name__}.")
    if {"prompt", "completion"} <= columns:
        prompts, completions = list(get("prompt")), list(get("completion"))
    elif "text" in columns:
        prompts = list(get("text"))
        completions = [""] * len(prompts)
    else:
        raise ValueError(f"{argument} needs `prompt` and `completion` columns (instruction data) or a `text` "
                         f"column; it has {sorted(columns) or 'none'}.")
    if not prompts:
        raise ValueError(f"{argument} is empty; pass at least one example.")
    for name, values in (("prompt", prompts), ("completion", completions)):
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise TypeError(f"{argument} row {bad}: `{name}` must be a string, got {type(values[bad]).__name__}.")
    return InstructionRows(prompts, completions)


def packed_instruction_dataset(rows: InstructionRows, tokenizer, seq_len: int, seed: int = 0) -> Dataset:
    """Training windows of exactly ``seq_len`` tokens: examples in a seeded order, packed back to back.

    Each example is ``prompt + completion + EOS``; its labels are ``-100`` on the prompt (the loss is on
    what the expert must produce) and the token ids elsewhere (all of a text row). Packing wastes no
    compute on padding and gives the fixed-length rows ``train_with_trainer``'s default collator needs;
    the last window is filled with EOS tokens that carry no loss.

    Example:
        >>> from hf_compress.assets import tiny_tokenizer
        >>> rows = InstructionRows(["Q: hi\\nA:"], [" hello"])
        >>> data = packed_instruction_dataset(rows, tiny_tokenizer(), seq_len=16)
        >>> len(data[0]["input_ids"]), data[0]["labels"][:3]
        (16, [-100, -100, -100])
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos_token_id; set one so packed examples can be separated.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    labels: list[int] = []
    for index in order:
        prompt, completion = rows.prompts[index], rows.completions[index]
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if completion:
            whole = tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]
            # The completion is what follows the prompt's own tokens (merges at the seam stay with it).
            cut = 0
            while cut < min(len(prompt_ids), len(whole)) and whole[cut] == prompt_ids[cut]:
                cut += 1
            ids += whole + [eos]
            labels += [-100] * cut + whole[cut:] + [eos]
        else:
            ids += prompt_ids + [eos]
            labels += prompt_ids + [eos]
    remainder = -len(ids) % seq_len
    ids += [eos] * remainder
    labels += [-100] * remainder
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    window_labels = [labels[i : i + seq_len] for i in range(0, len(labels), seq_len)]
    keep = [i for i, w in enumerate(window_labels) if any(label != -100 for label in w)]
    return Dataset.from_dict({"input_ids": [windows[i] for i in keep], "labels": [window_labels[i] for i in keep]})
