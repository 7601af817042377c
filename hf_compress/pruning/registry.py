"""The pruner registry: every method folder under ``hf_compress/pruning/`` registers its config and pruner itself.

A config class registers when it is defined (``PruningConfig.__init_subclass__``, keyed by its ``method``), and so
does a pruner class (``BasePruner.__init_subclass__``, keyed by its config's ``method``). A method folder
(``config.py``, ``pruner.py``, an ``__init__.py`` exporting both lazily) is found without a hand-kept list:
:func:`discover_configs` imports every folder's ``config.py``, which needs neither torch nor transformers, so
``hf-compress prune --help`` lists the methods in a fraction of a second; :data:`PRUNERS` imports a method's
``pruner.py`` when that method is first looked up, and every one when it is iterated. The CLI, SDS's bases, the
recipes and the benchmarks find the methods here.

Example:
    >>> sorted(CONFIGS)
    ['block_pruner', 'block_removal', 'magnitude', 'sds', 'sleb', 'sparsegpt', 'tyr', 'wanda']
    >>> PRUNERS["wanda"].__name__
    'WandaPruner'
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .base import BasePruner
    from .config import PruningConfig


__all__ = ["CONFIGS", "PRUNERS", "discover_configs", "discover_methods", "register_pruner"]

_PRUNERS: dict[str, type[BasePruner]] = {}
_discovered: set[str] = set()  # "config" and/or "pruner": which modules of every folder were imported


def register_pruner(cls: type[BasePruner]) -> type[BasePruner]:
    """Add ``cls`` under ``cls.config_class.method`` (a re-imported copy of the same class replaces it)."""
    method = cls.config_class.method
    known = _PRUNERS.get(method)
    if known is not None and known is not cls and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a pruner for method {method!r} is already registered: {known.__module__}.{known.__qualname__}.")
    _PRUNERS[method] = cls
    return cls


def discover_configs() -> None:
    """Import every method folder's ``config.py`` once (each registers its config; no torch is imported)."""
    _import_every_folder("config")


def discover_methods() -> None:
    """Import every method folder's ``config.py`` and ``pruner.py`` once (each registers its config and pruner)."""
    _import_every_folder("config")
    _import_every_folder("pruner")


def _import_every_folder(module: str) -> None:
    if module in _discovered:
        return
    for package in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        name = f"{__package__}.{package.name}.{module}"
        if package.ispkg and _find_module(name):  # find_spec, not a file check: zipped and .pyc-only installs too
            importlib.import_module(name)
    _discovered.add(module)  # only once every folder imported: a failed import is raised again, not half-listed


def _find_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package, or a relative name
        return False


def _configs() -> dict[str, type[PruningConfig]]:
    from .config import _REGISTRY

    discover_configs()
    return _REGISTRY


class _Configs(Mapping):
    """Read-only ``method → config class`` view that imports the method folders' ``config.py`` on first use."""

    def __getitem__(self, method: str) -> type[PruningConfig]:
        configs = _configs()
        try:
            return configs[method]
        except KeyError:
            raise KeyError(f"unknown pruning method {method!r}; known: {', '.join(sorted(configs))}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_configs()))

    def __len__(self) -> int:
        return len(_configs())

    def __repr__(self) -> str:
        return f"CONFIGS({', '.join(self)})"


class _Pruners(Mapping):
    """Read-only ``method → pruner class`` view. Looking one method up imports that method's ``pruner.py`` only
    (found next to its config); iterating imports every method folder's."""

    def __getitem__(self, method: str) -> type[BasePruner]:
        if method not in _PRUNERS:
            config_class = CONFIGS[method]  # an unknown method is refused here, listing the known ones
            folder = config_class.__module__.rpartition(".")[0]  # "" for a config defined in a script
            if folder and _find_module(f"{folder}.pruner"):
                importlib.import_module(f"{folder}.pruner")
        if method not in _PRUNERS:  # a config without a pruner in its folder (e.g. defined in a user's module)
            discover_methods()
        try:
            return _PRUNERS[method]
        except KeyError:
            raise KeyError(f"no pruner is registered for method {method!r}; known: {', '.join(sorted(_PRUNERS))}."
                           ) from None

    def __iter__(self) -> Iterator[str]:
        discover_methods()
        return iter(sorted(_PRUNERS))

    def __len__(self) -> int:
        discover_methods()
        return len(_PRUNERS)

    def __repr__(self) -> str:
        return f"PRUNERS({', '.join(self)})"


CONFIGS: Mapping[str, type[PruningConfig]] = _Configs()
"""Config class by method name, for every method folder; imports no pruner (and neither torch nor transformers)."""

PRUNERS: Mapping[str, type[BasePruner]] = _Pruners()
"""Pruner class by method name (the ``method`` of its config), for every method folder."""
