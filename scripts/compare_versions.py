"""Print which installed packages differ from a constraints file, the watched libraries first.

Used by `make test-latest` and `.ci/run`: when the newest releases break the compatibility smoke, this
names the package and version that moved. With ``--index`` it also asks the package index for each watched
library's newest release and, where that is newer than the installed one, why pip did not install it (a
release whose own requirements the index cannot satisfy is skipped silently by an eager upgrade, so "latest"
would quietly mean the release before). Exit status 0 always (it only reports).

    python scripts/compare_versions.py --constraints constraints.txt --index
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
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


def _release(version: str) -> tuple[int, ...]:
    # Like hf_compress._compat._release, kept here: this script must run when the newest releases break
    # `import hf_compress`, which is when its report is needed.
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+", 1)[0])[:3])


def newest_on_index(name: str) -> str | None:
    """The newest release the configured package index offers (``pip index versions``); None if unknown."""
    result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                            capture_output=True, text=True, check=False)
    match = re.search(rf"^{re.escape(name)} \(([^)]+)\)", result.stdout, flags=re.IGNORECASE | re.MULTILINE)
    return match.group(1) if match else None


def why_not_installable(name: str, version: str, keep: dict[str, str]) -> str:
    """pip's reason, from a dry run, that ``name==version`` cannot join this environment ('' if it can)."""
    pins = [f"{pkg}=={ver.split('+', 1)[0]}" for pkg, ver in keep.items() if pkg != _normalise(name)]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "-q", f"{name}=={version}", *pins]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    # pip prints the unsatisfiable requirement first, then a summary; the first line names it
    return re.sub(r" \(from versions:.*\)", "", errors[0]) if result.returncode and errors else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    parser.add_argument("--index", action="store_true",
                        help="also name newer releases on the package index and why pip did not install them")
    args = parser.parse_args()
    pins, installed = pinned_versions(args.constraints), installed_versions()
    print(f"Installed versions against {args.constraints} (watched libraries):")
    for name in WATCHED:
        key = _normalise(name)
        now, pinned = installed.get(key, "not installed"), pins.get(key, "not pinned")
        same_release = now.split("+", 1)[0] == pinned.split("+", 1)[0]  # 2.13.0+cpu is torch 2.13.0
        mark = "" if same_release else "   <-- differs"
        print(f"  {name:18s} {now:14s} (pinned {pinned}){mark}")
    others = sorted(k for k in pins if k in installed and installed[k] != pins[k] and k not in map(_normalise, WATCHED))
    if others:
        print("Other packages that differ: " + ", ".join(f"{k} {installed[k]} (pinned {pins[k]})" for k in others))
    if args.index:
        _report_newer_releases(installed)


def _report_newer_releases(installed: dict[str, str]) -> None:
    # torch stays on the local CPU wheel on purpose (the newest torch on PyPI is a multi-GB CUDA build)
    keep = {"torch": installed.get("torch", "")} if "torch" in installed else {}
    lagging = []
    for name in WATCHED:
        now, newest = installed.get(_normalise(name)), newest_on_index(name)
        if now and newest and _release(newest) > _release(now):
            lagging.append((name, now, newest))
    if not lagging:
        print("Every watched library is at the newest release the index offers (torch: the local CPU wheel).")
        return
    for name, now, newest in lagging:
        if name == "torch":
            print(f"  torch {newest} is on the index; the tests stay on the local CPU wheel {now}.")
            continue
        reason = why_not_installable(name, newest, keep) or (
            "pip can install it alone, so a requirement of this project or of another package holds it back")
        print(f"  NOT TESTED: {name} {newest} is on the index but {now} is installed: {reason}")


if __name__ == "__main__":
    main()
