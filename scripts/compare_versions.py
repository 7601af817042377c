"""Print which installed packages differ from a constraints file, the watched libraries first.

Used by `make test-latest` and `.ci/run`: when the newest releases break the compatibility smoke, this
names the package and version that moved. Exit status 0 always (it only reports).

    python scripts/compare_versions.py --constraints constraints.txt
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
from pathlib import Path


WATCHED = ("transformers", "peft", "accelerate", "datasets", "huggingface-hub", "torch", "safetensors", "tokenizers")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normalise(name)] = version.strip()
    return pins


def installed_versions() -> dict[str, str]:
    return {_normalise(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    args = parser.parse_args()
    pins, installed = pinned_versions(args.constraints), installed_versions()
    print(f"Installed versions against {args.constraints} (watched libraries):")
    for name in WATCHED:
        key = _normalise(name)
        now, pinned = installed.get(key, "not installed"), pins.get(key, "not pinned")
        mark = "" if now == pinned else "   <-- differs"
        print(f"  {name:18s} {now:14s} (pinned {pinned}){mark}")
    others = sorted(k for k in pins if k in installed and installed[k] != pins[k] and k not in map(_normalise, WATCHED))
    if others:
        print("Other packages that differ: " + ", ".join(f"{k} {installed[k]} (pinned {pins[k]})" for k in others))


if __name__ == "__main__":
    main()
