"""Shared by the robustness matrix (``scripts/bench_robustness.py``): one case, one outcome.

A case is a callable that should either succeed (the input is valid) or raise a *clear* error: an
exception of an expected type whose message names the argument (and, for ranges, the allowed values).
Anything else is a finding: ``silently_accepted`` (a bad input that went through), ``unclear`` (an
expected exception type whose message does not name the argument) or ``crash`` (an unexpected
exception type, e.g. ``AttributeError`` from deep inside).
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable, Sequence
from typing import Any


CLEAR_TYPES: tuple[type[BaseException], ...] = (
    ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, OSError,
    KeyError, NotImplementedError, SystemExit,
)
OUTCOMES = ("clear_error", "valid", "silently_accepted", "unclear", "crash")


@dataclasses.dataclass
class Case:
    """One input. ``call`` runs it; ``names`` are the words a clear message must contain (any of them);
    ``valid=True`` marks an input that must be accepted (a check against over-strict validation)."""

    group: str
    name: str
    call: Callable[[], Any]
    names: Sequence[str] = ()
    valid: bool = False


def run_case(case: Case) -> dict[str, Any]:
    """Run ``case`` and classify what happened."""
    row: dict[str, Any] = {"group": case.group, "case": case.name}
    try:
        case.call()
    except CLEAR_TYPES as err:  # noqa: PERF203
        message = f"{type(err).__name__}: {err}"
        if isinstance(err, SystemExit):
            message = f"SystemExit({err.code})"
        named = not case.names or any(word.lower() in str(err).lower() for word in case.names)
        if case.valid:
            row["outcome"] = "crash"
        else:
            row["outcome"] = "clear_error" if named or isinstance(err, SystemExit) else "unclear"
        row["error"] = message[:300]
    except Exception as err:  # noqa: BLE001 - classifying is the point
        row["outcome"] = "crash"
        row["error"] = f"{type(err).__name__}: {err}"[:300]
        row["where"] = traceback.format_exc().strip().splitlines()[-3][:200]
    else:
        row["outcome"] = "valid" if case.valid else "silently_accepted"
    return row


def run_cases(cases: Sequence[Case]) -> list[dict[str, Any]]:
    """Run every case (each isolated: one failure does not stop the others)."""
    return [run_case(case) for case in cases]
