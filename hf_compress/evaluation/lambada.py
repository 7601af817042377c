"""LAMBADA last-word accuracy: does the first word a model writes after the passage equal its last word?

Scored on generated text (Paperno et al., 2016): the prediction counts when its first word matches the last
word, ignoring case and the punctuation around it ("Signs." matches "signs"). Not lm-eval's ``lambada_openai``
number, which scores log-likelihoods: its ``acc`` counts a passage when greedy decoding reproduces the target's
tokens exactly (case and all), so it is a little stricter than this and not directly comparable.

Example:
    >>> last_word_accuracy(" signs. She", ["signs"])
    1.0
"""

from __future__ import annotations

import re

__all__ = ["ends_first_word", "first_word", "last_word_accuracy"]

# A word: letters/digits with inner apostrophes or hyphens ("didn't", "well-known"); anything else ends it.
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def first_word(text: str) -> str:
    """The first word of ``text`` ("" when there is none), without the punctuation around it."""
    match = _WORD.search(text)
    return match.group(0) if match else ""


def ends_first_word(text: str) -> bool:
    """Whether ``text`` holds a complete first word: one followed by a character that cannot continue it.

    A trailing U+FFFD is a character whose bytes have not all been decoded yet (byte-level BPE splits "é"
    over two tokens), so it may still continue the word.
    """
    match = _WORD.search(text)
    if match is None or match.end() == len(text) or text.endswith("\ufffd"):
        return False
    rest = text[match.end():]
    # "don" + "'t" or "well" + "-" may still grow into one word: wait for what follows the joiner.
    return not (len(rest) == 1 and rest in "'’-")


def last_word_accuracy(prediction: str, answers: list[str]) -> float:
    """1.0 when the first word of ``prediction`` equals one of ``answers`` (case-insensitive), else 0.0."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of reference words, got {answers!r}.")
    word = first_word(prediction).casefold()
    return float(bool(word) and any(word == first_word(a).casefold() for a in answers))
