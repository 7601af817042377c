"""The package, scripts and tests pass ruff's pyflakes and pycodestyle-error rules (pyproject.toml [tool.ruff.lint]):
undefined names, unused imports and variables, shadowed imports, invalid syntax for the supported Pythons."""

from __future__ import annotations

import pathlib
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
