"""scripts/compare_versions.py: what `make test-latest` prints about versions (pip itself is stubbed out); and
scripts/oldest_constraints.py: the pins `make test-oldest` installs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


def _script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare_versions():
    return _script("compare_versions")


def _pip_stub(monkeypatch, module, *, index: dict[str, str], dry_run_error: str | None):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if command[3:5] == ["index", "versions"]:
            name = command[5]
            out = f"{name} ({index[name]})\nAvailable versions: {index[name]}\n" if name in index else ""
            return subprocess.CompletedProcess(command, 0 if out else 1, out, "")
        assert command[3:5] == ["install", "--dry-run"]
        if dry_run_error:
            stderr = f"ERROR: {dry_run_error} (from versions: 0.1, 0.2)\nERROR: No matching distribution\n"
            return subprocess.CompletedProcess(command, 1, "", stderr)
        return subprocess.CompletedProcess(command, 0, "Would install x\n", "")

    monkeypatch.setattr(module.subprocess, "run", run)
    return calls


def test_release_ordering_ignores_local_build_tags(compare_versions):
    release = compare_versions._release
    assert release("5.25.0") > release("5.24.0") and release("5.10.0") > release("5.9.1")
    assert release("2.13.0+cpu") == release("2.13.0")


def test_a_newer_release_pip_cannot_install_is_named_with_pips_reason(compare_versions, monkeypatch, capsys):
    installed = {"transformers": "5.24.0", "peft": "0.21.2", "torch": "2.13.0+cpu"}
    index = {"transformers": "5.25.0", "peft": "0.21.2", "torch": "2.15.0"}
    reason = "Could not find a version that satisfies the requirement kernels>=0.19.1"
    calls = _pip_stub(monkeypatch, compare_versions, index=index, dry_run_error=reason)
    compare_versions._report_newer_releases(installed)
    out = capsys.readouterr().out
    assert ("NOT TESTED: transformers 5.25.0 is on the index but 5.24.0 is installed: ERROR: Could not find "
            "a version that satisfies the requirement kernels>=0.19.1\n") in out
    assert "peft" not in out  # already the newest
    assert "torch 2.15.0 is on the index; the tests stay on the local CPU wheel 2.13.0+cpu." in out
    dry_runs = [c for c in calls if "--dry-run" in c]
    assert dry_runs == [[sys.executable, "-m", "pip", "install", "--dry-run", "-q", "transformers==5.25.0",
                         "torch==2.13.0"]]  # torch held on the installed CPU wheel


def test_installable_but_held_back_and_all_newest(compare_versions, monkeypatch, capsys):
    _pip_stub(monkeypatch, compare_versions, index={"accelerate": "1.16.0"}, dry_run_error=None)
    compare_versions._report_newer_releases({"accelerate": "1.15.0"})
    held_back = "accelerate 1.16.0 is on the index but 1.15.0 is installed: pip can install it alone"
    assert held_back in capsys.readouterr().out
    _pip_stub(monkeypatch, compare_versions, index={"accelerate": "1.16.0"}, dry_run_error=None)
    compare_versions._report_newer_releases({"accelerate": "1.16.0"})
    assert capsys.readouterr().out.startswith("Every watched library is at the newest release")


@pytest.fixture(scope="module")
def oldest_constraints():
    return _script("oldest_constraints")


def _pyproject(tmp_path, dependencies: list[str]) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text("[project]\ndependencies = [\n" + "".join(f"  {d!r},\n" for d in dependencies) + "]\n")
    return path


def test_oldest_constraints_pin_each_lower_bound_that_applies(oldest_constraints, tmp_path):
    """`make test-oldest` installs these pins: every form of lower bound, markers evaluated, nothing guessed."""
    floors = oldest_constraints.lower_bounds(_pyproject(tmp_path, [
        "torch>=2.13,<3", "foo[bar]>=1.2", "spaced >= 1.3 , < 2", "compat~=1.4.2", "reversed<3,>=2.5", "exact==1.1",
        "Mixed_Case.Name>=0.9", 'applies>=2.0; python_version >= "3.11"', 'skipped>=9.0; python_version < "3.0"',
        "unbounded<4",
    ]))
    assert floors == {"torch": "2.13", "foo": "1.2", "spaced": "1.3", "compat": "1.4.2", "reversed": "2.5",
                      "exact": "1.1", "mixed-case-name": "0.9", "applies": "2.0"}
    with pytest.raises(SystemExit, match="excludes its own lower bound 1.0"):
        oldest_constraints.lower_bounds(_pyproject(tmp_path, ["excl>=1.0,!=1.0"]))
    with pytest.raises(SystemExit, match="two lower bounds"):
        oldest_constraints.lower_bounds(_pyproject(tmp_path, ["dup>=1.0", "dup>=2.0"]))


def test_the_import_time_minimum_versions_are_pyproject_s_lower_bounds(oldest_constraints):
    from packaging.version import Version

    from hf_compress import _compat

    floors = oldest_constraints.lower_bounds()
    for name, minimum in _compat.MINIMUM_VERSIONS.items():
        assert Version(floors[name]) == Version(minimum), name
