"""Which process this is, when several run the same script (``torchrun``, ``accelerate launch``).

Every process trains the same model; only the main one (rank 0) writes folders, pushes to the Hub, draws progress
bars and logs below WARNING, as ``transformers`` does for ``save_pretrained`` and ``Trainer`` for its logs. Several
processes writing one folder collide: one's half-staged copy replaces another's, or the later one finds the folder
taken.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar


__all__ = ["is_main_process", "main_process_only", "process_count", "process_group", "process_rank"]

F = TypeVar("F", bound=Callable[..., Any])


def process_group() -> Any:
    """``torch.distributed`` when a process group is running (torchrun, accelerate launch), else ``None``.

    Example:
        >>> process_group() is None
        True
    """
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def process_count() -> int:
    """How many processes train together: the process group's size, else ``WORLD_SIZE`` as ``torchrun`` and
    ``accelerate launch`` set it (the group may start only with the Trainer), else 1.

    Example:
        >>> process_count()
        1
    """
    group = process_group()
    return group.get_world_size() if group else int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's rank among those training together: the process group's, else ``RANK`` as ``torchrun`` sets
    it, else 0.

    Example:
        >>> process_rank()
        0
    """
    group = process_group()
    return group.get_rank() if group else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes the results: rank 0 of the processes training together (``True`` alone).

    Example:
        >>> is_main_process()
        True
    """
    return process_rank() == 0


def main_process_only(target: str | None = None, *, default_factory: Callable[[], Any] | None = None
                      ) -> Callable[[F], F]:
    """Run the decorated function (a save or a push) on the main process only.

    On the other processes it returns at once, writing nothing: ``Path(<argument target>)`` when ``target`` names the
    argument that holds the folder being written, else ``default_factory()`` (``None`` without one). There is no
    barrier (as in transformers' ``save_pretrained``): a script that saves on rank 0 alone must not hang, so a
    process that reads the folder back should wait for the main one first (``accelerator.wait_for_everyone()``).

    A tensor-parallel model among the arguments (``tp_plan``: each process holds a shard, and saving it gathers from
    every one) is refused on every process, before any of them waits for the others.

    Example:
        >>> @main_process_only("save_dir")
        ... def save(model, save_dir): ...
    """
    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            if process_count() > 1 and any(_tensor_parallel(value) for value in bound.arguments.values()):
                raise NotImplementedError(
                    f"{function.__qualname__} cannot save a tensor-parallel model (loaded with tp_plan): its shards "
                    "are spread over the processes. Load the model without tp_plan to compress and save it.")
            if is_main_process():
                return function(*args, **kwargs)
            if target is None:
                return None if default_factory is None else default_factory()
            from pathlib import Path

            return Path(bound.arguments[target])

        return wrapper  # type: ignore[return-value]

    return decorate


def _tensor_parallel(value: Any) -> bool:
    size = getattr(value, "tp_size", None)  # PreTrainedModel's (transformers), a property: None or 1 when unsharded
    return isinstance(size, int) and size > 1
