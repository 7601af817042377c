"""The pruner registry: every method folder under ``hf_compress/pruning/`` registers its pruner itself.

A pruner class registers when it is defined (``BasePruner.__init_subclass__``, keyed by its config's
``method``); :func:`discover_methods` imports every method folder once, so the registry is complete
without a hand-kept list. Adding a method means adding a folder (``config.py``, ``pruner.py``, an
``__init__.py`` importing both): the CLI, SDS's bases and the benchmarks find it here.

Example:
    >>> sorted(PRUNERS)
    ['block_pruner', 'block_removal', 'magnitude', 'sds', 'sleb', 'sparsegpt', 'tyr', 'wanda']
    >>> PRUNERS["wanda"].__name__
    'WandaPruner'
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .base import BasePruner


__all__ = ["PRUNERS", "discover_methods", "register_pruner"]

_PRUNERS: dict[str, type[BasePruner]] = {}
_discovered = False


def register_pruner(cls: type[BasePruner]) -> type[BasePruner]:
    """Add ``cls`` under ``cls.config_class.method`` (a re-imported copy of the same class replaces it)."""
    method = cls.config_class.method
    known = _PRUNERS.get(method)
    if known is not None and known is not cls and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a pruner for method {method!r} is already registered: {known.__module__}.{known.__qualname__}.")
    _PRUNERS[method] = cls
    return cls


def discover_methods() -> None:
    """Import every method folder of ``hf_compress.pruning`` once (each registers its pruner and config)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    folder = Path(__file__).parent
    for module in pkgutil.iter_modules([str(folder)]):
        if module.ispkg:
            importlib.import_module(f"{__package__}.{module.name}")


class _Registry(Mapping):
    """Read-only ``method → pruner class`` view that discovers the method folders on first use."""

    def __getitem__(self, method: str) -> type[BasePruner]:
        discover_methods()
        try:
            return _PRUNERS[method]
        except KeyError:
            raise KeyError(f"unknown pruning method {method!r}; known: {', '.join(sorted(_PRUNERS))}.") from None

    def __iter__(self) -> Iterator[str]:
        discover_methods()
        return iter(sorted(_PRUNERS))

    def __len__(self) -> int:
        discover_methods()
        return len(_PRUNERS)

    def __repr__(self) -> str:
        return f"PRUNERS({', '.join(self)})"


PRUNERS: Mapping[str, type[BasePruner]] = _Registry()
"""Pruner class by method name (the ``method`` of its config), for every method folder."""
