"""Library logging: every module logs under the ``hf_compress`` logger; nothing prints (progress bars aside).

Where several processes run one script (``torchrun``), only the main one draws progress bars and logs below
WARNING, as ``Trainer`` quiets its replicas (``log_level_replica``): the others would repeat every line.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from .processes import is_main_process


_ROOT = "hf_compress"


def _main_process_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or is_main_process()


def get_logger(name: str) -> logging.Logger:
    """Return a child of the ``hf_compress`` logger (``name`` is usually ``__name__``).

    Example:
        >>> logger = get_logger(__name__)
        >>> logger.info("calibrating block %d", 3)
    """
    if name != _ROOT and not name.startswith(_ROOT + "."):
        name = f"{_ROOT}.{name}"
    logger = logging.getLogger(name)
    # On the logger itself: a parent's filter does not see the records its children pass up.
    if _main_process_or_warning not in logger.filters:
        logger.addFilter(_main_process_or_warning)
    return logger


def progress_bar(*args: Any, disable: bool = False, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(*args, **kwargs)``, drawn by the main process only.

    Example:
        >>> for block in progress_bar(range(3), desc="pruning", disable=True):
        ...     pass
    """
    from tqdm.auto import tqdm

    return tqdm(*args, disable=disable or not is_main_process(), **kwargs)


def progress_kwargs(function: Callable[..., Any], progress: bool) -> dict[str, bool]:
    """``{"progress": progress}`` when ``function`` takes a ``progress`` keyword, else ``{}``: hands a caller's bar
    switch (``-q``) on to a hook a user may have written without one.

    Example:
        >>> progress_kwargs(lambda model, progress=True: None, False), progress_kwargs(lambda model: None, False)
        ({'progress': False}, {})
    """
    return {"progress": progress} if "progress" in inspect.signature(function).parameters else {}
