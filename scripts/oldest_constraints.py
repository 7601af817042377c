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
import tomllib
from pathlib import Path

from packaging.version import Version


PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def lower_bounds(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``{name: floor}`` of every main dependency that applies here (its marker, if any, holds): the version of its
    ``>=``, ``~=`` or ``==`` specifier. A requirement with none is left to pip; two that apply to one name with
    different floors, or a floor its own specifiers exclude, are errors.

    Example:
        >>> lower_bounds()["transformers"]
        '5.23'
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dependencies = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    floors: dict[str, str] = {}
    for text in dependencies:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        found = [spec.version for spec in requirement.specifier if spec.operator in (">=", "~=", "==")]
        if not found:
            continue
        floor = max(found, key=Version)
        if not requirement.specifier.contains(floor, prereleases=True):
            raise SystemExit(f"pyproject.toml: {text!r} excludes its own lower bound {floor}.")
        name = canonicalize_name(requirement.name)
        if floors.get(name, floor) != floor:
            raise SystemExit(f"pyproject.toml: {name} has two lower bounds, {floors[name]} and {floor}.")
        floors[name] = floor
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
