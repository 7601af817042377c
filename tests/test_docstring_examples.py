"""Every docstring example of the package runs as written, so the ``Example:`` sections cannot go stale.

One test per module of ``hf_compress`` whose source holds a ``>>>`` line (found on disk with ``pkgutil``;
nothing is imported at collection time). Each test imports its module and runs the examples that
``doctest.DocTestFinder`` finds there, with ``ELLIPSIS | NORMALIZE_WHITESPACE``: each docstring in a fresh
copy of the module's globals (an example brings its own imports), in a temporary working directory, with
torch's random generator seeded (and restored afterwards), so a result does not depend on earlier tests.

Lines marked ``# doctest: +SKIP`` are not run: they use the reader's own model or folder, the Hub, a GPU, or
minutes of work. A module that imports an optional package that is not installed (``triton`` on a CPU
machine) is skipped with that package's name, and so is a docstring whose example raises
``MissingAssetError`` (an offline asset that is not installed; the reason gives the install command).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import pytest
import torch

import hf_compress


OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
PACKAGE_DIR = Path(hf_compress.__file__).parent


def _modules(path: list[str], prefix: str) -> list[tuple[str, Path]]:
    """``(module name, source file)`` of every module below ``path``, without importing any of them."""
    found = []
    for info in pkgutil.iter_modules(path, prefix):
        leaf = info.name.rpartition(".")[2]
        if leaf == "__main__":  # importing it runs the CLI
            continue
        folder = Path(info.module_finder.path)
        if info.ispkg:
            found.append((info.name, folder / leaf / "__init__.py"))
            found.extend(_modules([str(folder / leaf)], info.name + "."))
        else:
            found.append((info.name, folder / f"{leaf}.py"))
    return found


ALL_MODULES = [("hf_compress", PACKAGE_DIR / "__init__.py"), *_modules([str(PACKAGE_DIR)], "hf_compress.")]
MODULES_WITH_EXAMPLES = [name for name, source in ALL_MODULES if ">>>" in source.read_text(encoding="utf-8")]


def test_every_module_is_found():
    # A folder without __init__.py (or a renamed package) would silently drop its modules' examples.
    on_disk = {path for path in PACKAGE_DIR.rglob("*.py")
               if path.name != "__main__.py" and "__pycache__" not in path.parts}
    assert {source for _, source in ALL_MODULES} == on_disk
    assert len(MODULES_WITH_EXAMPLES) > 50


def _import_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        # Only a package that is not installed at all: a name or submodule missing from an installed package
        # (``from transformers import Gone``) is a failure, not a skip.
        missing = (err.name or "").partition(".")[0]
        if missing and missing != "hf_compress" and importlib.util.find_spec(missing) is None:
            pytest.skip(f"{name} imports {missing!r}, an optional package that is not installed")
        raise


class _Runner(doctest.DocTestRunner):
    """Remembers the install command of a missing offline asset that a docstring's examples asked for."""

    missing_asset: str | None = None

    def report_unexpected_exception(self, out, test, example, exc_info):
        from hf_compress.assets import MissingAssetError

        if isinstance(exc_info[1], MissingAssetError) and self.missing_asset is None:
            self.missing_asset = exc_info[1].install_command
        super().report_unexpected_exception(out, test, example, exc_info)


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    module = _import_or_skip(name)
    tests = [test for test in doctest.DocTestFinder().find(module, name) if test.examples]
    assert tests, f"{name} has `>>>` lines but doctest finds no example in it"
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    monkeypatch.delenv("HF_COMPRESS_BENCH_RESULTS", raising=False)  # results_directory() shows the default
    runner = _Runner(optionflags=OPTIONFLAGS)
    failures, missing_assets = [], {}
    for test in sorted(tests, key=lambda test: test.name):
        report: list[str] = []
        runner.missing_asset = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            result = runner.run(test, out=report.append)
        if result.failed and runner.missing_asset is not None:
            missing_assets.setdefault(runner.missing_asset, []).append(test.name.rpartition(".")[2])
        elif result.failed:
            failures.append("".join(report))
    if failures:
        pytest.fail(f"{len(failures)} docstring(s) of {name} with a failing example:\n" + "\n".join(failures),
                    pytrace=False)
    if missing_assets:
        pytest.skip("; ".join(f"{', '.join(names)}: an offline asset is not installed ({command})"
                              for command, names in missing_assets.items()))


@pytest.mark.parametrize("source, skipped", [
    ("import surely_not_an_installed_package_hfc", True),  # an optional package that is not installed
    ("from json import no_such_name_hfc", False),  # a name gone from an installed package: a failure
    ("import json.no_such_module_hfc", False),  # a submodule gone from an installed package: a failure
])
def test_only_a_package_that_is_not_installed_skips_a_module(source, skipped, tmp_path, monkeypatch):
    (tmp_path / "module_with_import_hfc.py").write_text(source + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "module_with_import_hfc", raising=False)
    if skipped:
        with pytest.raises(pytest.skip.Exception, match="surely_not_an_installed_package_hfc"):
            _import_or_skip("module_with_import_hfc")
    else:
        try:
            _import_or_skip("module_with_import_hfc")
        except ImportError:
            pass
        except pytest.skip.Exception as skip:
            pytest.fail(f"a broken import was skipped as an optional package: {skip}")
        else:
            pytest.fail("the broken import was not raised")
