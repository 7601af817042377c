"""Small shared helpers: cache location, atomic writes, logging."""

from .files import MODEL_FILE_PATTERNS, atomic_directory, atomic_file, cache_dir, holds_model
from .logging import get_logger


__all__ = ["MODEL_FILE_PATTERNS", "atomic_directory", "atomic_file", "cache_dir", "get_logger", "holds_model"]
