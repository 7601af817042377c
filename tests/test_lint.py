"""The package, scripts and tests pass ruff's pyflakes and pycodestyle-error rules (pyproject.toml [tool.ruff.lint]):
undefined names, unused imports and variables, shadowed imports, invalid syntax for the supported Pythons; and vermin
finds nothing newer than the oldest Python that pyproject.toml's requires-python allows."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent))
    if ruff is None:
        pytest.fail("ruff is not installed in this environment: install the test extras (make install).")
    result = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", "hf_compress", "scripts", "tests",
                             "examples", "optimum"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_runs_on_the_oldest_supported_python():
    """vermin reads the code for language features and standard-library names newer than ``requires-python``.

    requires-python once said 3.10 while ``hf_compress.pruning`` imported 3.11's ``typing.Self`` at run time; the
    suite, run on 3.11, could not see it. A ``# novermin`` comment exempts a line only type checkers execute.
    """
    vermin = shutil.which("vermin", path=str(pathlib.Path(sys.executable).parent))
    if vermin is None:
        pytest.fail("vermin is not installed in this environment: install the test extras (make install).")
    oldest = re.search(r'requires-python\s*=\s*">=\s*(\d+\.\d+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    # --exclude: torch's Tensor.long() and bytes.decode read as Python 2's ``long`` and ``str.decode``.
    result = subprocess.run([vermin, "--no-tips", "--violations", "--eval-annotations", f"--target={oldest}-",
                             "--exclude", "long", "--exclude", "str.decode", "hf_compress", "scripts", "tests",
                             "examples", "optimum"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "requires" not in result.stdout, result.stdout + result.stderr
