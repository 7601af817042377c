"""Filesystem helpers: the library cache, all-or-nothing writes, and locks.

Every writer of the library (sparse, packed and slim checkpoints, adapters, drafting heads, strategy
folders, benchmark outputs, the reference-model cache) goes through :func:`atomic_directory` or
:func:`atomic_file`, so they share one set of guarantees:

- **nothing half-written**: files are staged next to the target and moved into place only when complete;
  an exception, ``KeyboardInterrupt`` or a full disk removes the staging and leaves the target as it was;
- **no moment without the target**: on Linux the staged folder and the old one are swapped in one
  ``renameat2(RENAME_EXCHANGE)`` call; elsewhere the old folder is renamed aside (under a unique name)
  only once the new one is complete, then removed;
- **no user file lost**: a folder that holds files but no model is refused unless ``overwrite=True``,
  and when overwriting, the files the new save does not write are kept (stale weight files excepted);
- **no litter**: staging and aside folders carry the writer's PID; the next write next to the same target
  removes those whose writer is gone (a process killed with SIGKILL cannot clean up after itself).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .processes import is_main_process


CACHE_ENV = "HF_COMPRESS_CACHE"

MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.gguf",
)
"""Files whose presence marks a folder as holding a model (saving there needs ``overwrite=True``)."""

STALE_ON_OVERWRITE: tuple[str, ...] = (
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.gguf",
    "config.json", "generation_config.json", "adapter_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", "custom_generate", "experts_config.json",
    "recipe.yaml", "recipe_results.json",
)
"""Top-level entries of an old artifact that an overwrite drops even when the new save does not write them:
the old model's weights (e.g. shards of a larger one), configs and tokenizer would otherwise be read
together with the new ones, and a recipe run's record (``recipe.yaml``, ``recipe_results.json``) would describe
another build. A top-level folder holding model files (:func:`holds_model`: an adapter, an
expert, drafting heads) is part of the old artifact too and is dropped whole. Everything else (notes,
results, a README) is the user's and is kept."""

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def holds_model(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` contains a model checkpoint (``config.json`` or weight files).

    Example:
        >>> holds_model("/nonexistent")
        False
    """
    folder = Path(folder)
    return folder.is_dir() and any(any(folder.glob(pattern)) for pattern in MODEL_FILE_PATTERNS)


def folders_overlap(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two folders are the same one or one holds the other (a save that replaces one would take the other).

    Example:
        >>> folders_overlap("out", "out/adapter"), folders_overlap("out", "work")
        (True, False)
    """
    a, b = Path(first).expanduser().resolve(), Path(second).expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file the user named (calibration text, a recipe, training rows); a binary or otherwise
    encoded file is refused in one line that names it, not with the codec's bare message.

    Example:
        >>> read_user_text("model.safetensors", "calibration text file")  # doctest: +SKIP
        ValueError: calibration text file model.safetensors is not UTF-8 text (byte 0x90 at offset 0) ...
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {os.fspath(path)} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at "
                         f"offset {error.start}); pass a text file, or convert it to UTF-8.") from None


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


def check_save_dir(
    target: str | os.PathLike, overwrite: bool = False, *, expected_bytes: int | None = None, argument: str = "save_dir"
) -> Path:
    """Refuse, before any expensive work, a save target that the save would refuse at the end.

    Checks that ``target`` is not a file, that a non-empty folder is only written with ``overwrite=True``,
    that its parent can be created and written to, and (given ``expected_bytes``) that the disk has room.
    ``argument`` names the parameter in the messages (``"--save-dir"`` for the CLI).

    Raises:
        FileExistsError: ``target`` is a file, or a non-empty folder and ``overwrite`` is false.
        PermissionError: the folder cannot be written.
        OSError: not enough free space (``errno.ENOSPC``).

    Example:
        >>> check_save_dir("/nonexistent-parent/out")  # doctest: +SKIP
        PermissionError: save_dir /nonexistent-parent/out cannot be created: ...
    """
    target = Path(target)
    if not is_main_process():  # only the main process writes (torchrun): a late rank would find its finished folder
        return target
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{argument} {target} is a file; pass a folder path.")
    if target.is_dir() and not overwrite:
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            what = "already holds a model" if holds_model(target) else (
                f"is not empty ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, e.g. {entries[0]!r}) "
                "and holds no model"
            )
            raise FileExistsError(
                f"{argument} {target} {what}; choose a new or empty folder, or pass overwrite=True (--overwrite) "
                "to save into it (files the save does not write are kept)."
            )
    parent = _writable_ancestor(argument, target, target)
    if expected_bytes:
        free = shutil.disk_usage(parent).free
        if free < expected_bytes * 1.1:
            raise OSError(
                errno.ENOSPC,
                f"{argument} {target}: about {expected_bytes / 2**20:.0f} MiB are needed but only "
                f"{free / 2**20:.0f} MiB are free on that disk; free some space or choose another folder.",
            )
    return target


def check_output_file(path: str | os.PathLike, argument: str = "path") -> Path:
    """Refuse, before any work, a file path that cannot be written: a folder, below a file, or not writable.

    Example:
        >>> check_output_file(__file__ + "/results.json", "--output")  # a path below this module's own file
        Traceback (most recent call last):
        ...
        FileExistsError: --output .../files.py/results.json cannot be created: .../files.py is a file, not a folder; choose another path.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise IsADirectoryError(f"{argument} {path} is a folder; pass the path of the file to write in it.")
    _writable_ancestor(argument, target, target.parent)
    return target


def check_folder_path(path: str | os.PathLike, argument: str = "output_dir") -> Path:
    """Refuse, before any work, a folder path that cannot be created and written: a file, below a file, or not
    writable. Unlike :func:`check_save_dir`, a folder that already holds files is fine (a training run's checkpoints).

    Example:
        >>> check_folder_path(__file__ + "/run")  # a path below this module's own file
        Traceback (most recent call last):
        ...
        FileExistsError: output_dir .../files.py/run cannot be created: .../files.py is a file, not a folder; choose another path.
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{argument} {target} is a file; pass a folder path.")
    _writable_ancestor(argument, target, target)
    return target


def _writable_ancestor(argument: str, target: Path, start: Path) -> Path:
    """``start`` or its nearest existing ancestor, which must be a writable folder for ``target`` to be written
    (a one-line error naming ``argument`` otherwise)."""
    parent = _existing_ancestor(start)
    if not parent.is_dir():
        raise FileExistsError(f"{argument} {target} cannot be created: {parent} is a file, not a folder; choose "
                              "another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{argument} {target} cannot be written: {parent} is not writable; choose another folder.")
    return parent


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder that replaces ``target`` only if the block finishes without error.

    The staging folder sits next to ``target`` (same filesystem), so the final step is a rename. See the
    module docstring for the guarantees. With ``overwrite=True`` an existing ``target`` is replaced by the
    new content plus the old files the block did not write (old weight files excepted).

    Raises:
        FileExistsError: ``target`` is a file, or a non-empty folder and ``overwrite`` is false.

    Example:
        >>> with atomic_directory("out/model") as tmp:  # doctest: +SKIP
        ...     model.save_pretrained(tmp)
    """
    target = check_save_dir(target, overwrite)
    if target.is_symlink():
        target = target.resolve()
    created = [parent for parent in target.parents if not parent.exists()]  # removed again if the save fails
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(staging, _normal_mode(directory=True))  # mkdtemp creates 0700
    try:
        yield staging
        _give_normal_permissions(staging)  # before the user's files are linked in: theirs keep their modes
        if target.is_dir():
            _carry_unrelated_files(target, staging)
        _install(staging, target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # innermost first; a folder something else wrote into meanwhile stays
            try:
                parent.rmdir()
            except OSError:
                break
        if _out_of_space(error):  # safetensors says only "I/O error: No space left on device (os error 28)"
            raise OSError(errno.ENOSPC, f"no space left on the device of {target} while saving there ({error}); "
                                        "nothing was written: free some space or save elsewhere") from error
        raise


def _out_of_space(error: BaseException) -> bool:
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def _give_normal_permissions(folder: Path) -> None:
    # safetensors 0.8 writes its files owner-only (0600), unlike every other file of a save: a saved model shared
    # with other users or containers could not be read. Only files with exactly that mode are changed.
    normal = _normal_mode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600 and normal != 0o600:
            os.chmod(path, normal)


def _carry_unrelated_files(old: Path, new: Path) -> None:
    # e.g. expert_2/ of a 3-expert save overwritten by 2 experts: not the user's, and not part of the new save.
    stale_folders = {path.name for path in old.iterdir()
                     if path.is_dir() and not path.is_symlink() and holds_model(path)}
    for path in sorted(old.rglob("*")):  # symlinked folders are listed, not entered
        relative = path.relative_to(old)
        if (new / relative).exists() or (new / relative).is_symlink():
            continue
        if path.is_dir() and not path.is_symlink() and any(path.iterdir()):
            continue  # its files are carried one by one
        if relative.parts[0] in stale_folders:
            continue
        if any(fnmatch.fnmatch(relative.parts[0], pattern) for pattern in STALE_ON_OVERWRITE):
            continue
        (new / relative).parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():  # the link itself, wherever (and whether) it points
            os.symlink(os.readlink(path), new / relative)
            continue
        if path.is_dir():  # an empty folder of the user's
            (new / relative).mkdir()
            continue
        try:
            os.link(path, new / relative)  # a hard link: instant and no extra space; the old name goes away
        except OSError:
            shutil.copy2(path, new / relative, follow_symlinks=False)


def _install(staging: Path, target: Path) -> None:
    """Move the complete ``staging`` folder to ``target``; ``target`` exists at every moment if it existed."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):  # staging now holds the old content
        shutil.rmtree(staging, ignore_errors=True)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    os.rmdir(aside)  # only the unique name is needed; rename() cannot replace a non-empty folder
    os.rename(target, aside)
    os.rename(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); ``False`` where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV):
        return False  # the filesystem (or a seccomp policy) does not support it: fall back to two renames
    raise OSError(code, f"could not swap {first} and {second}: {os.strerror(code)}")


def sweep_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove staging and aside entries next to ``target`` whose writing process no longer runs.

    Returns the removed paths. Entries of live processes (this one included) are left alone.

    Example:
        >>> sweep_stale_staging("/nonexistent/model")
        []
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = _STAGING.match(entry.name)
        if not match or match["name"] != target.name or _process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot tell): keep its files
    return True


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temporary path next to ``target``; it replaces ``target`` when the block succeeds.

    For writers that want a file name rather than a handle (``safetensors.torch.save_file``). Two writers of
    the same target never share a temporary name, and the last one to finish wins whole.

    Example:
        >>> with atomic_path("work/state.safetensors") as tmp:  # doctest: +SKIP
        ...     save_file(tensors, tmp)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _normal_mode())  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file that replaces ``target`` only when the block finishes without error.

    Example:
        >>> with atomic_file("results.json") as f:  # doctest: +SKIP
        ...     json.dump(results, f)
    """
    with atomic_path(target) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float = -1, busy_message: str | None = None) -> Iterator[None]:
    """Hold an inter-process lock on ``path`` (created if needed) for the block.

    Used where two processes could otherwise do the same work at once or clobber each other's files
    (the reference-model conversion, Týr's work folder). The lock is released when the process dies.
    ``timeout`` seconds (``-1``: wait forever, ``0``: do not wait) before ``TimeoutError(busy_message)``.

    Example:
        >>> with file_lock(cache_dir("models") / ".smollm2.lock"):  # doctest: +SKIP
        ...     convert()
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise TimeoutError(busy_message or f"{path} is locked by another process; try again later.") from None
    try:
        yield
    finally:
        lock.release()


def _normal_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` would give a new file or folder under the process's umask."""
    return (0o777 if directory else 0o666) & ~_current_umask()


def _current_umask() -> int:
    # Linux reports the umask in /proc (kernel 4.7+). os.umask(0) is the portable way to read it, but it sets the
    # process-wide umask to 0 until it is set back: a file another thread creates meanwhile is world-writable.
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0)  # elsewhere: set straight back
    os.umask(mask)
    return mask
