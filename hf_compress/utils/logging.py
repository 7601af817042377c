"""Library logging: every module logs under the ``hf_compress`` logger; nothing prints."""

from __future__ import annotations

import logging


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
