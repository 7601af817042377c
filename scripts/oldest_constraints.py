"""Write pyproject.toml's lower bounds as exact pins: the oldest releases hf_compress says it supports.

`make test-oldest` installs from this file, so each ``>=`` floor in ``[project] dependencies`` is a version the
suite has run with rather than a guess (transformers 5.23 broke speculative decoding for three weeks while every
run used 5.25). Only the main dependencies are pinned; the optional extras (lm-eval, pytest, ...) resolve freely.
A floor below what another floor itself requires makes pip refuse the set: raise it in pyproject.toml.

The file is rewritten only when its text changes, so make's install step reruns only then.

    python scripts/oldest_constraints.py --output .venv-oldest/oldest-constraints.txt
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def lower_bounds(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``{name: floor}`` of every main dependency with a ``>=`` bound."""
    dependencies = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    floors = {}
    for requirement in dependencies:
        match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[[^\]]*\])?\s*([^;]*)", requirement)
        name, specifiers = match.group(1), match.group(2)
        floor = re.search(r">=\s*([0-9][^,\s]*)", specifiers)
        if floor:
            floors[name] = floor.group(1)
    return floors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--output", type=Path, required=True, help="the constraints file to write")
    args = parser.parse_args()
    text = "# pyproject.toml's lower bounds (scripts/oldest_constraints.py)\n" + "".join(
        f"{name}=={floor}\n" for name, floor in lower_bounds().items()
    )
    if not args.output.is_file() or args.output.read_text(encoding="utf-8") != text:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    print(text, end="")


if __name__ == "__main__":
    main()
