"""Import-time helpers: run a callback once a module is imported, and package attributes loaded on first use.

``import hf_compress`` must register its checkpoint formats with transformers and its PEFT method with
peft, yet importing either (and torch under them) costs seconds. So registration waits for the user's
own import: :func:`when_imported` runs the callback right away if the module is already loaded, or
right after it finishes loading otherwise (a ``sys.meta_path`` finder wraps that one module's loader).

A failing callback is logged, never raised into the user's import: a missing registration shows up as a
clear error when the checkpoint or adapter is loaded, while an exception here would break ``import peft``.

Example:
    >>> seen = []
    >>> when_imported("json", lambda module: seen.append(module.__name__))
    >>> seen
    ['json']
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
from collections.abc import Callable
from types import ModuleType

from .logging import get_logger


__all__ = ["lazy_exports", "when_imported"]

logger = get_logger(__name__)

_callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}
_lock = threading.RLock()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once module ``name`` is fully imported (now, if it already is)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _callbacks.setdefault(name, []).append(callback)
            _install_finder()
            return
    _run(callback, module)


def _run(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        callback(module)
    except Exception:  # noqa: BLE001 - see the module docstring
        logger.warning("hf_compress could not register with %s", module.__name__, exc_info=True)


class _LoaderThatNotifies(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callbacks waiting for the module."""

    def __init__(self, loader: importlib.abc.Loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            callbacks = _callbacks.pop(self._name, [])
        for callback in callbacks:
            _run(callback, module)

    def __getattr__(self, attribute):  # get_data, get_filename, is_package, resource readers, ...
        return getattr(self._loader, attribute)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderThatNotifies(spec.loader, fullname)
        return spec


_finder = _PostImportFinder()


def _install_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose public names live in submodules loaded on first use.

    ``exports`` maps each public name to its submodule (relative to ``package``, or a full module name
    starting with ``hf_compress.``). A package ``__init__``
    then costs nothing to import, and importing one submodule (``pkg.grid``) does not import its siblings.

    Example:
        >>> __getattr__, __dir__ = lazy_exports("hf_compress.quantization", {"QuantizationGrid": "grid"})
        >>> __getattr__("QuantizationGrid").__name__
        'QuantizationGrid'
    """

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = exports[name] if exports[name].startswith("hf_compress.") else f"{package}.{exports[name]}"
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
