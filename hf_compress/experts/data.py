"""Instruction data for experts: rows as (prompt, completion) pairs, and packed training windows.

A dataset is a ``datasets.Dataset`` (or a list of dicts) with TRL's prompt-completion columns
``prompt`` and ``completion`` (the prompt is what a query looks like at inference, so it is what gets
embedded and routed; the loss is on the completion), or a single ``text`` column (language-modelling
rows: the whole text is embedded and trained on). A list of strings is a ``text`` dataset.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from ..utils import read_user_text
from .config import TASK_MIX_TASKS


__all__ = ["TASK_MIX_TASKS", "InstructionRows", "example_tokens", "instruction_rows", "packed_instruction_dataset",
           "read_instruction_file", "task_mix_rows"]


@dataclass(frozen=True)
class InstructionRows:
    """The rows of a dataset as prompts (embedded, routed) and completions (``""`` for text rows)."""

    prompts: list[str]
    completions: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def instruction_rows(dataset: Dataset | Sequence[dict[str, Any]] | Sequence[str], argument: str = "dataset",
                     counted_from: int = 0) -> InstructionRows:
    """Read ``prompt``/``completion`` (or ``text``) rows; a clear error for any other layout.

    An error names the row by its index (``counted_from=0``, as Python indexes a list or Dataset), or as the
    n-th row of a file (``counted_from=1``).

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
            columns, get = {"text"}, lambda name: list(dataset)  # noqa: E731
        elif not all(isinstance(row, dict) for row in dataset):
            raise TypeError(f"{argument} must be a datasets.Dataset, a list of dicts or a list of strings.")
        else:
            columns = set(dataset[0])
            get = lambda name: [row.get(name) for row in dataset]  # noqa: E731  (a missing field: the type check below)
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
    def row(index: int) -> str:
        return f"row {index + counted_from}"

    for name, values in (("prompt", prompts), ("completion", completions)):
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise TypeError(f"{argument} {row(bad)}: `{name}` must be a string, got {type(values[bad]).__name__}.")
    instruction = {"prompt", "completion"} <= columns
    blank = next((i for i, v in enumerate(prompts) if not v), None)
    if blank is not None:
        raise ValueError(f"{argument} {row(blank)}: `{'prompt' if instruction else 'text'}` is empty; it is what "
                         "gets embedded and routed, so fill it in or remove the row.")
    blank = next((i for i, v in enumerate(completions) if not v), None) if instruction else None
    if blank is not None:  # "" marks a text row: the prompt itself would be trained on
        raise ValueError(f"{argument} {row(blank)}: `completion` is empty, so training would score its prompt; give "
                         "it a completion or remove the row.")
    return InstructionRows(prompts, completions)


def example_tokens(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    """An example's token ids (no EOS) and the index where the part training scores starts: after the prompt's own
    tokens for an instruction row (merges at the seam stay with the completion), 0 for a text row (``""``).

    Example:
        >>> from hf_compress.assets import tiny_tokenizer
        >>> ids, cut = example_tokens(tiny_tokenizer(), "Q: hi\\nA:", " hello")
        >>> 0 < cut < len(ids)
        True
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not completion:
        return prompt_ids, 0
    whole = tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]
    cut = 0
    while cut < min(len(prompt_ids), len(whole)) and whole[cut] == prompt_ids[cut]:
        cut += 1
    return whole, cut


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
        whole, cut = example_tokens(tokenizer, rows.prompts[index], rows.completions[index])
        ids += whole + [eos]
        labels += [-100] * cut + whole[cut:] + [eos]
    remainder = -len(ids) % seq_len
    ids += [eos] * remainder
    labels += [-100] * remainder
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    window_labels = [labels[i : i + seq_len] for i in range(0, len(labels), seq_len)]
    keep = [i for i, w in enumerate(window_labels) if any(label != -100 for label in w)]
    return Dataset.from_dict({"input_ids": [windows[i] for i in keep], "labels": [window_labels[i] for i in keep]})


def task_mix_rows(tasks: Sequence[str], per_task: int, *, skip: int = 0, seed: int = 1234) -> list[dict[str, str]]:
    """Instruction rows ``{"task", "prompt", "completion"}`` from the offline task data, ``per_task`` each.

    Multiple-choice tasks give their correct context and continuation (lm-eval's prompts), SQuAD its prompt and
    first reference answer, GSM8K ``"Question: ...\\nAnswer:"`` and the reference solution. Each task's rows are
    those after the first ``skip`` of its fixed seeded subset (``load_zero_shot_task(limit=...)``), so the
    first ``skip`` stay held out for an evaluation with ``--limit skip``; a task with fewer rows gives fewer.

    Example:
        >>> rows = task_mix_rows(["boolq", "gsm8k"], 2)
        >>> [row["task"] for row in rows]
        ['boolq', 'boolq', 'gsm8k', 'gsm8k']
    """
    from ..assets import load_gsm8k, load_squad, load_zero_shot_task
    from ..utils import check_choice, check_int

    check_int("per_task", per_task, minimum=1)
    check_int("skip", skip, minimum=0)
    if not tasks:
        raise ValueError(f"Name at least one task of the mix: {', '.join(TASK_MIX_TASKS)}.")
    for task in tasks:
        check_choice("task", task, TASK_MIX_TASKS)
    rows: list[dict[str, str]] = []
    for task in dict.fromkeys(tasks):  # in order, once each
        if task == "squad":
            data = load_squad(limit=skip + per_task, seed=seed)
            pairs = [(r["prompt"], " " + r["answers"][0]) for r in data]
        elif task == "gsm8k":
            data = load_gsm8k(limit=skip + per_task, seed=seed)
            pairs = [(f"Question: {r['question']}\nAnswer:", " " + r["target"]) for r in data]
        else:
            data = load_zero_shot_task(task, limit=skip + per_task, seed=seed)
            pairs = [(r["contexts"][r["label"]], r["continuations"][r["label"]]) for r in data]
        rows += [{"task": task, "prompt": prompt, "completion": completion} for prompt, completion in pairs[skip:]]
    return rows


def read_instruction_file(path: str | os.PathLike, argument: str = "data") -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` file (one JSON object per line) or a ``.json`` file (a list of objects).

    The rows need ``prompt``/``completion`` or ``text`` fields (checked by :func:`instruction_rows`).

    Example:
        >>> read_instruction_file("train.jsonl")  # doctest: +SKIP
        [{'prompt': 'Q: 2+2?\\nA:', 'completion': ' 4'}]
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{argument} {name}: no such file; pass a .jsonl file of prompt/completion (or "
                                "text) rows.")
    text = read_user_text(name, f"{argument} file")
    if name.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{argument} {name} is not valid JSON ({err}); write a list of objects, or JSON lines "
                             "in a .jsonl file.") from None
        if not isinstance(rows, list):
            raise ValueError(f"{argument} {name} must hold a JSON list of objects, got a {type(rows).__name__}.")
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{argument} {name} line {number} is not valid JSON ({err}); write one object per "
                                 "line.") from None
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"{argument} {name}: row {bad + 1} is a {type(rows[bad]).__name__}, not an object with "
                         "prompt/completion (or text) fields.")
    if not rows:
        raise ValueError(f"{argument} {name} holds no rows; add prompt/completion (or text) rows.")
    instruction_rows(rows, f"{argument} {name}", counted_from=1)  # the fields, checked before any model loads
    return rows
