"""Library logging: every module logs under the ``hf_compress`` logger; nothing prints (progress bars aside)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any


_ROOT = "hf_compress"


def get_logger(name: str) -> logging.Logger:
    """Return a child of the ``hf_compress`` logger (``name`` is usually ``__name__``).

    Example:
        >>> logger = get_logger(__name__)
        >>> logger.info("calibrating block %d", 3)
    """
    if name != _ROOT and not name.startswith(_ROOT + "."):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def progress_kwargs(function: Callable[..., Any], progress: bool) -> dict[str, bool]:
    """``{"progress": progress}`` when ``function`` takes a ``progress`` keyword, else ``{}``: hands a caller's bar
    switch (``-q``) on to a hook a user may have written without one.

    Example:
        >>> progress_kwargs(lambda model, progress=True: None, False), progress_kwargs(lambda model: None, False)
        ({'progress': False}, {})
    """
    return {"progress": progress} if "progress" in inspect.signature(function).parameters else {}
