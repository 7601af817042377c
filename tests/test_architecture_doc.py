"""docs/architecture.md names only Python objects that exist (``test_compat.py`` checks the files it names).

What is checked, so that a renamed or removed function makes the doc fail here:

- every dotted name at the start of a code span (`` `storage.save_pruned` ``, `` `hf_compress.recipe.run` ``,
  `` `_compat.check_minimum_versions()` ``) whose first part is ``hf_compress``, a module or package of hf_compress
  named by its last part (``storage``, ``steps``, ``formats``: any module of that name may hold the rest), or a class
  hf_compress defines (`` `Manifest.save` ``);
- anywhere in the doc, ``Class.attribute`` for a class hf_compress defines (``BasePruner.prune``) and
  ``_compat.name``.

Names of other libraries (``transformers.Trainer``, ``PeftModel.from_pretrained``), file names (``config.json``)
and the few code spans on objects (:data:`OBJECT_ATTRIBUTES`) are not looked up.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from functools import cache
from pathlib import Path

import hf_compress


PACKAGE = Path(hf_compress.__file__).parent  # the code under test, wherever it is installed
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"  # the doc lives beside the tests, not the package

FILE_SUFFIXES = {"py", "md", "json", "yaml", "txt", "sh", "safetensors", "toml"}
OBJECT_ATTRIBUTES = {"config.hf_compress", "config.quantization_config", "model.generate"}
"""Code spans on an object (a loaded model, its config) whose variable name is also a module's (``model.py``,
``config.py``): not module paths."""

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+"


@cache
def _modules() -> dict[str, list[str]]:
    """Last part of each hf_compress module or package name → the full names (``"storage"`` → the pruning one)."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):  # hf_compress/__init__.py gives "hf_compress" itself
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.setdefault(parts[-1], []).append(".".join(parts))
    return found


@cache
def _classes() -> dict[str, list[str]]:
    """Name of each class hf_compress defines at a module's top level → the modules that define one."""
    found: dict[str, list[str]] = {}
    for name, modules in _modules().items():
        for module in modules:
            path = PACKAGE.parent / Path(*module.split("."))
            path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.ClassDef):
                    found.setdefault(node.name, []).append(module)
    return found


def _submodule(owner: object, name: str) -> object | None:
    """``owner.name`` as a submodule of package ``owner`` (found even where an attribute of that name hides it, as
    ``hf_compress.cli.main`` the function hides the module ``main.py``), else ``None``."""
    if not (inspect.ismodule(owner) and hasattr(owner, "__path__")):
        return None
    try:
        return importlib.import_module(f"{owner.__name__}.{name}")
    except ModuleNotFoundError:
        return None


def _declared(cls: type, name: str) -> bool:
    """An annotated field of ``cls`` (or a base), or an instance attribute its methods set (``self.name = ...``)."""
    for base in cls.__mro__:
        if name in getattr(base, "__annotations__", {}):
            return True
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(name)}\s*(?::[^=\n]+)?=(?!=)", source):
            return True
    return False


def _resolves(owner: object, rest: list[str]) -> bool:
    """Whether ``owner.rest[0].rest[1]...`` exists: as attributes or submodules (a declared instance attribute or
    field of a class counts for the last part)."""
    if not rest:
        return True
    name, later = rest[0], rest[1:]
    found = [value for value in (getattr(owner, name, None), _submodule(owner, name)) if value is not None]
    if any(_resolves(value, later) for value in found):
        return True
    return not later and (hasattr(owner, name) or (inspect.isclass(owner) and _declared(owner, name)))


def unknown_names(text: str) -> list[str]:
    """The names in ``text`` (a doc) that the rules of this module check and that do not exist."""
    text = re.sub(r"^\s*```.*$", "", text, flags=re.M)  # code fences: the spans inside a block still pair up
    candidates = set()
    for span in re.findall(r"`([^`]+)`", text):
        match = re.match(_DOTTED, span.strip())
        if match:
            candidates.add(match.group(0))
    classes = _classes()
    candidates |= {name for name in re.findall(rf"(?<![\w.]){_DOTTED}", text)
                   if name.split(".")[0] in classes or name.startswith("_compat.")}
    unknown = []
    for name in sorted(candidates):
        first, *rest = name.split(".")
        if rest[-1] in FILE_SUFFIXES or name in OBJECT_ATTRIBUTES:
            continue
        if first in _modules():
            starts = [(importlib.import_module(module), rest) for module in _modules()[first]]
        elif first in classes:
            starts = [(importlib.import_module(module), [first, *rest]) for module in classes[first]]
        else:
            continue  # another library's name
        if not any(_resolves(start, path) for start, path in starts):
            unknown.append(name)
    return unknown


def test_architecture_doc_names_only_python_objects_that_exist():
    unknown = unknown_names(DOC.read_text(encoding="utf-8"))
    assert unknown == [], (
        f"docs/architecture.md names Python objects that do not exist (renamed or removed?): {unknown}; "
        "fix the doc, or add a code span on an object (not a module) to OBJECT_ATTRIBUTES in this test."
    )


def test_the_check_reports_wrong_names_and_accepts_right_ones():
    text = ("```\ntree/  `_compat.cache_kwarg_name`\n```\n"  # an odd number of backticks: the fence is not a span
            "`hf_compress.recipe.run`, `storage.save_pruned`, `steps.model_facts(model)`, `formats.sparse`, "
            "`Manifest.save`, `FLy.calibrate`, `config.json`, `transformers.Trainer`, `config.Recipe.from_yaml`\n"
            "BasePruner.prune and TrainingSettings.progress; _compat.extend_peft_type.\n"
            "`storage.save_prunned`, `hf_compress.recipe.no_such_run`, `formats.no_such_format`, BasePruner.prunes, "
            "_compat.no_such_helper")
    assert unknown_names(text) == ["BasePruner.prunes", "_compat.no_such_helper", "formats.no_such_format",
                                   "hf_compress.recipe.no_such_run", "storage.save_prunned"]
