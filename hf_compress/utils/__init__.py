"""Small shared helpers: cache location, atomic writes, logging."""

from .files import atomic_directory, atomic_file, cache_dir
from .logging import get_logger


__all__ = ["atomic_directory", "atomic_file", "cache_dir", "get_logger"]
