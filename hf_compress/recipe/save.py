"""Writing a recipe's final folder, all or nothing, through the library's own savers.

The model goes through the saver of the format the steps left it in: ``save_packed`` (packed low-bit, with a
sparsity mask when the layers carry one), ``save_routed`` (token router), ``save_pruned`` (sparse),
``save_slim`` (structural), else a plain ``save_pretrained``; the staged folder is loaded back with
``from_pretrained`` and must give the in-memory model's logits (``check_reload``). Beside it: ``custom_generate/`` (a strategy
without weights), ``heads/`` (drafting heads with their ``custom_generate`` strategy: heads and model each need
their own ``config.json``; the heads' card loads the model at the root with them, as the root card does),
``recipe.yaml``, ``recipe_results.json`` and the card. Everything is staged in one
``atomic_directory``; the savers write into the staging folder.

Example:
    >>> layout, disk = write_folder(state, "out/", overwrite=False, recipe=recipe,
    ...                             base_model="HuggingFaceTB/SmolLM2-135M", finish=finish)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _compat
from ..utils import atomic_directory, atomic_file, get_logger
from .card import FolderLayout


if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from .config import Recipe
    from .steps.base import RecipeState


__all__ = ["HEADS_FOLDER", "RECIPE_FILE", "RESULTS_FILE", "check_reload", "save_model", "write_folder"]

logger = get_logger(__name__)

HEADS_FOLDER = "heads"
RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "recipe_results.json"


def write_folder(
    state: RecipeState, target: str | os.PathLike, *, overwrite: bool, recipe: Recipe, base_model: str | None,
    finish: Callable[[FolderLayout, dict[str, int]], tuple[ModelCard, dict[str, Any]]], repo_id: str | None = None,
    progress: bool = True,
) -> tuple[FolderLayout, dict[str, int]]:
    """Stage the model, the generation settings and ``recipe.yaml``; ``finish(layout, disk)`` returns the card and
    the results written beside them (it sees the staged bytes on disk); then the folder replaces ``target``.
    ``repo_id``: the Hub repo the folder goes to (``run``'s), which the heads' card names as the root card does;
    ``progress``: the savers' own bars (the sparse format's encoding)."""
    from ..hub import write_model_card

    with atomic_directory(target, overwrite=overwrite) as staging:
        save_model(state, staging, base_model, progress=progress)
        reload_difference = check_reload(state.model, staging)
        layout = _save_generation(state, staging, base_model, repo_id=repo_id,
                                  folder_name=Path(target).resolve().name)
        recipe.save_yaml(staging / RECIPE_FILE)
        disk = {
            "reload_max_logit_difference": reload_difference,
            "model_disk_bytes": sum(p.stat().st_size for p in staging.glob("*.safetensors")),
            "folder_disk_bytes": sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()),
        }
        card, results = finish(layout, disk)
        with atomic_file(staging / RESULTS_FILE, encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        write_model_card(staging, card)
    logger.info("saved the recipe's final folder to %s", target)
    return layout, disk


def check_reload(model: Any, folder: Path, tolerance: float = 1e-4) -> float:
    """Load the saved ``folder`` with ``AutoModelForCausalLM.from_pretrained`` and compare its logits with the model
    in memory on fixed token ids; raise before anything is installed when they differ. Returns the largest
    difference (0.0 when the format restores the weights exactly).

    The reloaded copy is held in CPU memory; for a model on another device (a GPU) it runs there one module at a time
    (:func:`reloaded_copy`), so that device never holds the model twice and both forwards use the same kernels."""
    import torch

    from ..modeling.layers import evaluation_mode

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, 16), generator=generator).to(model.device)
    advice = "the format cannot yet store this combination of steps: run them as separate recipes."
    try:
        reloaded = reloaded_copy(folder, model.device, dtype=model.dtype)
    except Exception as error:  # whatever the format raised: the folder must not be installed
        raise RuntimeError(f"the saved folder does not load back ({' '.join(str(error).split())}), so nothing was "
                           f"saved; {advice}") from error
    with torch.no_grad(), evaluation_mode(model):
        expected, got = model(ids).logits.float(), reloaded(ids).logits.float().to(model.device)
    del reloaded
    difference = float((expected - got).abs().max())
    if not difference <= tolerance * max(1.0, float(expected.abs().max())):
        raise RuntimeError(
            f"the saved folder does not reload as the model in memory (logits differ by up to {difference:.3g}), so "
            f"nothing was saved; {advice}"
        )
    return difference


def reloaded_copy(folder: Path, device: Any, *, dtype: Any = None, one_module_at_a_time: bool | None = None) -> Any:
    """``from_pretrained(folder)`` in CPU memory (in ``dtype``: the checkpoint's own by default), in eval mode, whose
    forwards run on ``device``. Off the CPU (or with ``one_module_at_a_time``) through accelerate's ``cpu_offload``:
    each module's weights visit ``device`` only for its own forward."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    with _compat.quiet_weight_progress():
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").eval()
    if one_module_at_a_time is None:
        one_module_at_a_time = device.type != "cpu"
    if one_module_at_a_time:
        from accelerate import cpu_offload

        cpu_offload(reloaded, execution_device=device)
    return reloaded


def save_model(state: RecipeState, folder: Path, base_model: str | None, progress: bool = True) -> str:
    """Save the model (and tokenizer) into ``folder`` with the saver of its format; returns the format's name."""
    from ..quantization.packed_linear import PackedLinear
    from ..routing.layer import routing_state

    model, tokenizer = state.model, state.tokenizer
    if any(isinstance(module, PackedLinear) for module in model.modules()):
        from ..formats.packed import save_packed

        save_packed(model, tokenizer, folder, overwrite=True)
        return "packed"
    if routing_state(model) is not None:
        from ..routing import save_routed

        save_routed(model, tokenizer, folder, overwrite=True, recipe=state.format_recipes.get("routing"),
                    base_model=base_model)
        return "routed"
    if "sparse" in state.facts:
        from ..pruning.storage import save_pruned

        save_pruned(model, tokenizer, folder, overwrite=True, recipe=state.format_recipes.get("pruning"),
                    progress=progress)
        return "sparse"
    if state.facts & {"slim", "blocks"}:
        from ..formats.slim import save_slim

        save_slim(model, tokenizer, folder, overwrite=True, recipe=state.format_recipes.get("pruning"),
                  base_model=base_model)
        return "slim"
    with _compat.quiet_weight_progress():
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return "dense"


def _save_generation(state: RecipeState, folder: Path, base_model: str | None, *, repo_id: str | None = None,
                     folder_name: str = "out") -> FolderLayout:
    """The strategy (and heads) of the recipe, where ``generate(custom_generate=...)`` finds them.

    The heads' own card (``heads/README.md``) describes them as what they are here: heads for the compressed
    model at the root of the folder (or of ``repo_id``), with the root card's code that loads that model and
    passes ``<root>/heads`` as ``custom_generate`` (``folder_name``: the root folder's name, for that code)."""
    from ..hub import base_weights_of
    from .card import load_snippet

    strategy = state.strategy
    # A reference model's GGUF origin, which the cards state (passed only when there is one: a registered strategy of
    # its own may override save_pretrained without that argument).
    stated = {"base_weights": base_weights} if (base_weights := base_weights_of(state.model.config)) else {}
    if state.heads is not None:
        if strategy is None:
            from ..speculative.heads import Amphista

            strategy = Amphista(state.heads)
        beside = load_snippet(FolderLayout(heads_folder=HEADS_FOLDER), repo_id, folder_name)
        with _compat.quiet_weight_progress():  # as the model's own save: no "Writing model shards" bar
            strategy.save_pretrained(folder / HEADS_FOLDER, base_model=base_model, repo_id=repo_id,
                                     beside_model=beside, **stated)
        return FolderLayout(heads_folder=HEADS_FOLDER, cache=state.cache)
    if strategy is not None:
        # The strategy's own folder (its checks, its generate.py); only custom_generate/ joins the model's folder,
        # whose card describes both.
        with tempfile.TemporaryDirectory(prefix="recipe-strategy-") as scratch:
            saved = strategy.save_pretrained(Path(scratch) / "strategy", base_model=base_model, **stated)
            shutil.copytree(saved / "custom_generate", folder / "custom_generate")
        return FolderLayout(custom_generate=True, cache=state.cache)
    return FolderLayout(cache=state.cache)
