"""Small shared helpers: cache location, atomic writes, logging and progress."""

from .files import (
    MODEL_FILE_PATTERNS,
    atomic_directory,
    atomic_file,
    atomic_path,
    cache_dir,
    check_output_file,
    check_save_dir,
    file_lock,
    holds_model,
    sweep_stale_staging,
)
from .logging import get_logger, progress_kwargs
from .validation import (
    DTYPE_NAMES,
    InvalidArgumentTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_int_sequence,
    check_path,
    check_seed,
    check_str,
    check_str_list,
    closest_name,
    did_you_mean,
)


__all__ = [
    "DTYPE_NAMES",
    "InvalidArgumentTypeError",
    "MODEL_FILE_PATTERNS",
    "atomic_directory",
    "atomic_file",
    "atomic_path",
    "cache_dir",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_int_sequence",
    "check_path",
    "check_output_file",
    "check_save_dir",
    "check_seed",
    "check_str",
    "check_str_list",
    "closest_name",
    "did_you_mean",
    "file_lock",
    "get_logger",
    "holds_model",
    "progress_kwargs",
    "sweep_stale_staging",
]
