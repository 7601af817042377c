"""Argument checks shared by every public config and constructor: one line per error, naming the argument.

Every check raises at construction time with a message of the form
``"<name> must be <allowed>, got <value!r>."`` (plus a hint where one helps). A value of the wrong type
raises :class:`InvalidArgumentTypeError`, which is both a ``TypeError`` and a ``ValueError``: callers that
catch ``ValueError`` for bad settings keep working. ``bool`` is never accepted as a number.

No torch import here: this module is imported by light modules (configs, the CLI).

Example:
    >>> check_int("num_heads", 4, minimum=1)
    4
    >>> check_float("dropout", 0.1, low=0.0, high=1.0, high_open=True)
    0.1
    >>> check_int("num_heads", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: num_heads must be a positive integer, got 0.
    >>> check_float("lora_alpha", float("nan"), low=0.0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: lora_alpha must be a positive number (NaN and infinity are not), got nan.
    >>> check_float("lora_alpha", -1, low=0.0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: lora_alpha must be a positive number, got -1.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Collection, Iterable
from typing import Any

__all__ = [
    "DTYPE_NAMES",
    "InvalidArgumentTypeError",
    "check_bool",
    "check_choice",
    "check_float",
    "check_fraction",
    "check_int",
    "check_int_sequence",
    "check_path",
    "check_seed",
    "check_str",
    "check_str_list",
    "closest_name",
]


DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The dtypes a model may be loaded in by name (``--dtype``, a recipe's ``dtype``, ``load_model``); float32 first, the
default, and what every stored benchmark used. Here, with no torch import, so the CLI's help and recipe checks stay
fast."""


class InvalidArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. A ``TypeError`` and, for code that catches bad settings as
    ``ValueError``, a ``ValueError`` too.

    Example:
        >>> isinstance(InvalidArgumentTypeError("x"), ValueError)
        True
    """


def closest_name(name: str, known: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The known name nearest to a mistyped ``name`` (for a "did you mean" hint), or ``None`` when none is close.

    Example:
        >>> closest_name("wandda", ["magnitude", "wanda"]), closest_name("xyz", ["wanda"])
        ('wanda', None)
    """
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name nearest to a mistyped ``name``, or ``""`` when none is close.

    Example:
        >>> f"unknown method 'wand'{did_you_mean('wand', ['magnitude', 'wanda'])}"
        "unknown method 'wand' (did you mean 'wanda'?)"
    """
    close = closest_name(name, known)
    return f" (did you mean {close!r}?)" if close else ""


def _message(name: str, allowed: str, value: Any, hint: str) -> str:
    text = f"{name} must be {allowed}, got {value!r}."
    return f"{text} {hint}" if hint else text


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer from {minimum} to {maximum}"
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    hint: str = "",
) -> Any:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (``None`` passes when ``allow_none``).

    Raises:
        InvalidArgumentTypeError: not an integer (``bool``, ``float`` and strings included).
        ValueError: out of range.

    Example:
        >>> check_int("window", 6, minimum=1)
        6
        >>> check_int("limit", None, minimum=0, allow_none=True) is None
        True
    """
    if value is None and allow_none:
        return None
    allowed = _int_range(minimum, maximum) + (" or None" if allow_none else "")
    if not _is_int(value):
        raise InvalidArgumentTypeError(_message(name, allowed, value, hint))
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(_message(name, allowed, value, hint))
    return int(value)


def _float_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        if low == 0:
            return f"a {'positive' if low_open else 'non-negative'} number"
        return f"a number {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> Any:
    """``value`` as a finite ``float`` between ``low`` and ``high`` (``*_open``: that bound excluded).

    Integers are accepted (``1`` for ``1.0``); ``bool``, strings, NaN and infinities are not.

    Raises:
        InvalidArgumentTypeError: not a real number.
        ValueError: NaN, infinite or out of range.

    Example:
        >>> check_float("channel_ratio", 0, low=0.0, high=1.0, high_open=True)
        0.0
    """
    if value is None and allow_none:
        return None
    allowed = _float_range(low, high, low_open, high_open) + (" or None" if allow_none else "")
    if not _is_real(value):
        raise InvalidArgumentTypeError(_message(name, allowed, value, hint))
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(_message(name, f"{allowed} (NaN and infinity are not)", value, hint))
    if low is not None and (number <= low if low_open else number < low):
        raise ValueError(_message(name, allowed, value, hint))
    if high is not None and (number >= high if high_open else number > high):
        raise ValueError(_message(name, allowed, value, hint))
    return number


def check_fraction(name: str, value: Any, *, low_open: bool = False, high_open: bool = True, hint: str = "") -> float:
    """``value`` as a fraction between 0 and 1: a number, or a string of one (``"0.3"``) or of a percentage
    (``"30%"``), as the pruners' ``sparsity`` and the command line take it. ``*_open``: that bound excluded.

    Example:
        >>> check_fraction("token_sparsity", "30%"), check_fraction("budget", 0.2, low_open=True, high_open=False)
        (0.3, 0.2)
    """
    if not isinstance(value, str):
        return check_float(name, value, low=0.0, high=1.0, low_open=low_open, high_open=high_open, hint=hint)
    allowed = _float_range(0.0, 1.0, low_open, high_open) + ", or a percentage"
    text = value.strip()
    percent = text.endswith("%")
    try:
        number = float(text[:-1] if percent else text) / (100 if percent else 1)
    except ValueError:
        raise InvalidArgumentTypeError(_message(name, allowed, value, hint)) from None
    if not (0.0 < number if low_open else 0.0 <= number) or not (number < 1.0 if high_open else number <= 1.0):
        raise ValueError(_message(name, allowed, value, hint))  # NaN fails both comparisons
    return number + 0.0  # "-0" is 0.0


_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def check_seed(name: str, value: Any, *, allow_none: bool = False, numpy: bool = False) -> Any:
    """``value`` if it is an integer a ``torch.Generator`` accepts as a seed (``-2**63`` to ``2**64 - 1``), or with
    ``numpy`` (the seed also goes to a NumPy generator) one NumPy accepts too (``0`` to ``2**32 - 1``).

    Example:
        >>> check_seed("seed", 1234)
        1234
        >>> check_seed("seed", -1, numpy=True)
        Traceback (most recent call last):
        ValueError: seed must be an integer seed (0 to 2**32 - 1), got -1.
    """
    if value is None and allow_none:
        return None
    low, high, span = (0, 2**32 - 1, "0 to 2**32 - 1") if numpy else (_SEED_MIN, _SEED_MAX, "-2**63 to 2**64 - 1")
    allowed = f"an integer seed ({span})" + (" or None" if allow_none else "")
    if not _is_int(value):
        raise InvalidArgumentTypeError(_message(name, allowed, value, ""))
    if not low <= value <= high:
        raise ValueError(_message(name, allowed, value, ""))
    return int(value)


def check_bool(name: str, value: Any, *, hint: str = "") -> bool:
    """``value`` if it is ``True`` or ``False`` (``0``/``1``, strings and ``None`` are refused).

    Example:
        >>> check_bool("loose", False)
        False
    """
    if not isinstance(value, bool):
        raise InvalidArgumentTypeError(_message(name, "True or False", value, hint))
    return value


def check_choice(name: str, value: Any, choices: Collection[Any], *, hint: str = "") -> Any:
    """``value`` if it is one of ``choices``.

    Example:
        >>> check_choice("stage_feeds", "last", ("staged", "last"))
        'last'
    """
    try:
        known = value in choices
    except TypeError:  # unhashable value against a set
        known = False
    if not known:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(_message(name, f"one of {listed}", value, hint))
    return value


def check_str(name: str, value: Any, *, allow_none: bool = False, allow_empty: bool = False, hint: str = "") -> Any:
    """``value`` if it is a string (non-empty unless ``allow_empty``; ``None`` when ``allow_none``).

    Example:
        >>> check_str("base", "wanda")
        'wanda'
    """
    if value is None and allow_none:
        return None
    allowed = ("a string" if allow_empty else "a non-empty string") + (" or None" if allow_none else "")
    if not isinstance(value, str):
        raise InvalidArgumentTypeError(_message(name, allowed, value, hint))
    if not allow_empty and not value.strip():
        raise ValueError(_message(name, allowed, value, hint))
    return value


def check_str_list(name: str, value: Any, *, allow_none: bool = False, hint: str = "") -> Any:
    """``value`` as a list of strings; a lone string is a list of one (never a list of characters).

    Example:
        >>> check_str_list("skip", "mlp.*")
        ['mlp.*']
    """
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return [value]
    allowed = "a string or a list of strings" + (" or None" if allow_none else "")
    if not isinstance(value, Iterable) or isinstance(value, (bytes, dict)):
        raise InvalidArgumentTypeError(_message(name, allowed, value, hint))
    items = list(value)
    if not all(isinstance(item, str) for item in items):
        raise InvalidArgumentTypeError(_message(name, allowed, value, hint))
    return items


def check_int_sequence(
    name: str, value: Any, *, minimum: int | None = None, allow_empty: bool = True, hint: str = ""
) -> list[int]:
    """``value`` as a list of integers, each ``>= minimum``.

    Example:
        >>> check_int_sequence("selection_tokens", (8, 16), minimum=1)
        [8, 16]
    """
    allowed = f"a list of {_int_range(minimum, None).removeprefix('an ').removeprefix('a ')}s"
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise InvalidArgumentTypeError(_message(name, allowed, value, hint))
    items = list(value)
    if not all(_is_int(item) for item in items):
        raise InvalidArgumentTypeError(_message(name, allowed, value, hint))
    if (minimum is not None and any(item < minimum for item in items)) or (not allow_empty and not items):
        raise ValueError(_message(name, allowed if allow_empty else "a non-empty " + allowed.removeprefix("a "),
                                  value, hint))
    return [int(item) for item in items]


def check_path(name: str, value: Any, *, allow_none: bool = False, hint: str = "") -> Any:
    """``value`` if it is a path (``str`` or ``os.PathLike``), non-empty.

    Example:
        >>> check_path("save_dir", "out/")
        'out/'
    """
    if value is None and allow_none:
        return None
    allowed = "a folder or file path (str or os.PathLike)" + (" or None" if allow_none else "")
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentTypeError(_message(name, allowed, value, hint))
    if not os.fspath(value):
        raise ValueError(_message(name, allowed, value, hint))
    return value
