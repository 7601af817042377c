"""Command-line flags generated from a config dataclass, so a method's CLI never repeats its config.

Each field becomes ``--field-name`` (plus any spellings in ``metadata["cli"]``; ``metadata={"cli": None}``
hides it), typed from its annotation, with the help taken from the class docstring's ``Args:`` section.
Only flags the user gave reach the config (``argparse.SUPPRESS``), so the dataclass defaults stay the
single source of defaults. ``metadata["choices"]`` (a list or a function returning one) restricts values.

Example:
    >>> import argparse, dataclasses
    >>> @dataclasses.dataclass
    ... class Demo:
    ...     '''Args:
    ...         rounds: how many rounds.'''
    ...     rounds: int = 2
    >>> parser = argparse.ArgumentParser()
    >>> add_config_arguments(parser, Demo)
    >>> config_kwargs(parser.parse_args(["--rounds", "3"]))
    {'rounds': 3}
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from collections.abc import Mapping
from typing import Any


__all__ = ["add_config_arguments", "config_kwargs"]

_PREFIX = "config__"


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type,
                         defaults: Mapping[str, Any] | None = None) -> None:
    """Add one flag per dataclass field of ``config_class`` to ``parser`` (in an argument group); ``defaults``:
    the command's own defaults where they differ from the class's (shown in the help as what applies)."""
    helps = _docstring_args(config_class)
    defaults = dict(defaults or {})
    group = parser.add_argument_group(f"{config_class.__name__} (defaults as in the class unless shown otherwise)")
    for item in dataclasses.fields(config_class):
        spellings = item.metadata.get("cli", [])
        if spellings is None:
            continue
        flags = list(dict.fromkeys([f"--{item.name.replace('_', '-')}", *spellings]))  # a spelling may repeat the name
        default = defaults.get(item.name, _default(item))
        kwargs: dict[str, Any] = {"dest": _PREFIX + item.name, "default": argparse.SUPPRESS}
        kwargs.update(_parsing(item))
        if kwargs.get("action") != argparse.BooleanOptionalAction:
            kwargs.setdefault("metavar", item.name.upper())
        choices = item.metadata.get("choices")
        if choices is not None:
            kwargs["choices"] = choices() if callable(choices) else choices
        if kwargs.get("action") is AppendSplit:
            helps[item.name] = helps.get(item.name, "") + " (repeat the flag, or separate values with commas)"
        shown = "" if default is dataclasses.MISSING else f" (default: {json.dumps(default) if isinstance(default, (list, tuple, dict)) else default})"
        kwargs["help"] = (helps.get(item.name, "").replace("``", "") + shown).strip().replace("%", "%%")
        group.add_argument(*flags, **kwargs)


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user set on the command line."""
    return {key[len(_PREFIX):]: value for key, value in vars(args).items() if key.startswith(_PREFIX)}


def _default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return item.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


class AppendSplit(argparse.Action):
    """A list flag: repeat it, or separate values with commas (``--target-modules q_proj,v_proj``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.extend(value for value in str(values).split(",") if value)
        setattr(namespace, self.dest, items)


def _json(text: str) -> Any:
    """An argparse ``type`` for a JSON flag (the config checks the value's shape); text that is not JSON reads
    ``argument --flag: must be JSON such as ...`` instead of argparse's ``invalid loads value``.

    Example:
        >>> _json('{"percdamp": 0.02}')
        {'percdamp': 0.02}
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"must be JSON such as '{{\"name\": 1}}' (in single quotes for the shell), got {text!r} ({err})"
        ) from None


def _parsing(item: dataclasses.Field) -> dict[str, Any]:
    annotation = str(item.type).replace(" ", "")
    if "type" in item.metadata:
        return {"type": item.metadata["type"]}
    if annotation == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if annotation.startswith("list["):
        return {"action": AppendSplit}
    if annotation.startswith("tuple[int"):
        return {"type": int, "nargs": "*"}
    if annotation.startswith("dict["):
        return {"type": _json, "metavar": "JSON"}
    if annotation == "int":
        return {"type": int}
    if annotation == "float":
        return {"type": float}
    return {"type": str}  # str, "float | str" (parsed by the config), ...


def _docstring_args(config_class: type) -> dict[str, str]:
    """``name: text`` entries of the ``Args:`` sections of the class and its bases (the subclass's win)."""
    helps: dict[str, str] = {}
    for cls in config_class.__mro__:
        doc = inspect.getdoc(cls) or ""
        if "Args:" not in doc:
            continue
        section: dict[str, str] = {}
        current: list[str] = []
        for line in doc.split("Args:", 1)[1].splitlines():
            match = re.match(r"^ {4}([a-z_][\w, ]*):\s*(.*)$", line)
            if match:
                current = [name.strip() for name in match.group(1).split(",")]
                for name in current:
                    section[name] = match.group(2)
            elif line.startswith("        ") and current:
                for name in current:
                    section[name] += " " + line.strip()
            elif line.strip() and not line.startswith(" "):
                break  # the next section (Example:, Returns:, ...)
        for name, text in section.items():
            helps.setdefault(name, text)
    return helps
