"""Hand-edits of a saved checkpoint folder, for tests that a damaged or inconsistent checkpoint is refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def edit_checkpoint(
    folder: Path,
    config_change: Callable[[dict[str, Any]], Any] | None = None,
    tensor_change: Callable[[dict[str, torch.Tensor]], Any] | None = None,
    drop_integrity: bool = True,
) -> None:
    """Apply ``config_change`` to ``quantization_config`` and ``tensor_change`` to ``model.safetensors``' tensors, in
    place; ``drop_integrity`` removes the recorded checksums first, so that the format's own checks are what refuse."""
    config = json.loads((folder / "config.json").read_text())
    if drop_integrity:
        config["quantization_config"].pop("integrity", None)
    if config_change:
        config_change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    if tensor_change:
        tensors = load_file(folder / "model.safetensors")
        tensor_change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
