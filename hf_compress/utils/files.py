"""Filesystem helpers: the library cache and all-or-nothing writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


CACHE_ENV = "HF_COMPRESS_CACHE"

MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.gguf",
)
"""Files whose presence marks a folder as holding a model (``save_pruned`` refuses to overwrite it)."""


def holds_model(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` contains a model checkpoint (``config.json`` or weight files).

    Example:
        >>> holds_model("/nonexistent")
        False
    """
    folder = Path(folder)
    return folder.is_dir() and any(any(folder.glob(pattern)) for pattern in MODEL_FILE_PATTERNS)


def cache_dir(*parts: str) -> Path:
    """The hf_compress cache (``$HF_COMPRESS_CACHE``, default ``~/.cache/hf_compress``), created on use.

    Example:
        >>> cache_dir("models")  # doctest: +SKIP
        PosixPath('/root/.cache/hf_compress/models')
    """
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_compress").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block finishes without error.

    The temporary directory sits next to ``target`` (same filesystem) so the final move is a rename;
    on failure it is removed and ``target`` is left as it was.

    Example:
        >>> with atomic_directory("out/model") as tmp:  # doctest: +SKIP
        ...     model.save_pretrained(tmp)
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another directory or pass overwrite=True.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file that replaces ``target`` only when the block finishes without error.

    Example:
        >>> with atomic_file("results.json") as f:  # doctest: +SKIP
        ...     json.dump(results, f)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
