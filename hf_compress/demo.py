"""The main job on the embedded default model: evaluate, compress with every method available, compare.

``hf-compress demo`` (the README's first command) runs :func:`run_demo`: it loads SmolLM2-135M offline,
measures it, applies each registered compression method in turn, measures again, writes each result
as a Hub-ready folder (weights, tokenizer, model card with the measured metrics) and prints a
comparison table. Methods register themselves in :data:`DEMO_METHODS` as they land.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .evaluation.memory import disk_bytes
from .evaluation.suite import EvaluationSettings, run_evaluation
from .hub import base_weights_of, hub_model_id
from .utils import atomic_directory, atomic_file, get_logger, progress_kwargs


logger = get_logger(__name__)


@dataclass(frozen=True)
class DemoMethod:
    """A compression step of the demo.

    ``apply(model, tokenizer, calibration_texts)`` returns the compressed model and its recipe (a
    JSON-ready dict recorded in the model card); an ``apply`` with a ``progress`` keyword gets the demo's
    (``hf-compress demo -q``: no bars). ``save(model, tokenizer, folder)`` writes it so that
    ``from_pretrained(folder)`` loads it (a ``save`` with a ``progress`` keyword gets the demo's too).
    """

    name: str
    description: str
    apply: Callable[[PreTrainedModel, PreTrainedTokenizerBase, Any], tuple[PreTrainedModel, dict[str, Any]]]
    save: Callable[[PreTrainedModel, PreTrainedTokenizerBase, Path], None] | None = None


DEMO_METHODS: list[DemoMethod] = []
"""Extra methods to run besides the built-in ones (see :func:`default_demo_methods`)."""


def default_demo_methods() -> list[DemoMethod]:
    """The built-in methods the demo applies, in order, plus any added to :data:`DEMO_METHODS`.

    Example:
        >>> [m.name for m in default_demo_methods()][:1]
        ['magnitude-2of4']
    """
    from .pruning.demo import demo_methods

    return [*demo_methods(), *DEMO_METHODS]

QUICK_SETTINGS = EvaluationSettings(
    perplexity_sets=("wikipedia", "news"), max_windows=24, zero_shot_tasks=("arc_easy",), zero_shot_limit=200,
    speed_prompts=3, max_new_tokens=32,
)
FULL_SETTINGS = EvaluationSettings(
    perplexity_sets=("wikipedia", "news"), zero_shot_tasks=("arc_easy", "arc_challenge", "piqa"),
    speed_prompts=10, max_new_tokens=64, kv_seq_len=2048,
)


def run_demo(
    model_name: str = "smollm2-135m",
    output_dir: str | os.PathLike = "hf_compress_demo",
    settings: EvaluationSettings | None = None,
    methods: list[DemoMethod] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model_name``, compress it with each method, evaluate again, write Hub-ready folders.

    Returns ``{"rows": [...], "output_dir": ...}``; ``rows`` holds one summary per model (dense first).

    Example:
        >>> summary = run_demo("tiny-llama", "demo_out", settings=EvaluationSettings(max_windows=2))  # doctest: +SKIP
    """
    from .assets.resolve import load_model
    from .assets.text import load_text

    settings = settings or QUICK_SETTINGS
    methods = default_demo_methods() if methods is None else methods
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass --overwrite or choose another --output-dir.")

    model, tokenizer = load_model(model_name)
    # A card names the base model by its Hub id (the reference models know theirs), never by a local path.
    base_model = hub_model_id(getattr(model.config, "name_or_path", None))
    base_weights = base_weights_of(model.config)  # a reference model: the GGUF its weights were de-quantized from
    short_name = (base_model or str(model_name)).rstrip("/").rpartition("/")[2]
    logger.info("Evaluating the dense model %s", model_name)
    rows = []
    with atomic_directory(output_dir, overwrite=True) as staging:
        dense_results, dense_records = run_evaluation(model, tokenizer, settings, progress=progress)
        _write_artifact(staging / "dense", model, tokenizer, None, base_model, f"{short_name}-dense", {"method": "none"},
                        dense_records, dense_results, base_weights=base_weights)
        rows.append(_row("dense", dense_results, staging / "dense"))
        if not methods:
            logger.warning("No compression method is registered yet; the demo only measures the dense model.")
        calibration = load_text("wikipedia", "calibration") if methods else None
        for index, method in enumerate(methods):
            logger.info("Applying %s", method.name)
            if index:  # methods may change the model in place: each starts from a fresh dense copy
                model, tokenizer = load_model(model_name)
            compressed, recipe = method.apply(model, tokenizer, calibration, **progress_kwargs(method.apply, progress))
            results, records = run_evaluation(compressed, tokenizer, settings, progress=progress)
            _write_artifact(staging / method.name, compressed, tokenizer, method.save, base_model,
                            f"{short_name}-{method.name}", recipe, records, results, base_records=dense_records,
                            base_weights=base_weights, progress=progress)
            rows.append(_row(method.name, results, staging / method.name))
            del compressed
        _write_json(staging / "summary.json", {"model": short_name if os.path.exists(str(model_name)) else model_name, "settings": settings.to_dict(), "rows": rows})
    return {"rows": rows, "output_dir": str(output_dir)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown comparison table of :func:`run_demo` rows.

    Example:
        >>> print(format_table([{"model": "dense", "ppl_wikipedia": 21.07}]))
        | model | ppl_wikipedia |
        |---|---|
        | dense | 21.07 |
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(col)) for col in columns) + " |")
    return "\n".join(lines)


def _row(name: str, results: dict[str, Any], folder: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    for set_name, result in results.get("perplexity", {}).items():
        row[f"ppl_{set_name}"] = result["perplexity"]
    for task in results["settings"]["zero_shot_tasks"]:
        result = results["zero_shot"][task]
        row[f"{task}_{result['metric']}"] = result["score"]
    if "generation" in results:
        row["tokens_per_s"] = results["generation"]["tokens_per_second"]
    row["param_MB"] = results["memory"]["parameters"] / 2**20
    row["disk_MB"] = disk_bytes(folder, "*.safetensors") / 2**20  # what the saved checkpoint really takes
    return row


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def _write_artifact(folder: Path, model, tokenizer, save, base_model: str | None, name: str, recipe: dict[str, Any],
                    records, results: dict[str, Any], base_records=(), base_weights=None, progress: bool = True) -> None:
    """A Hub-ready folder: what ``from_pretrained`` needs, a model card with measured metrics, raw results.
    ``base_weights``: the dense model's GGUF origin (``hub.base_weights_of``), which the card states."""
    from .hub import build_model_card, write_model_card

    if save is None:
        _save_pretrained(model, tokenizer, folder)
    else:
        save(model, tokenizer, folder, **progress_kwargs(save, progress))
    card = build_model_card(base_model=base_model, model_name=name, recipe=recipe, metrics=records,
                            base_metrics=base_records, base_weights=base_weights)
    write_model_card(folder, card)
    _write_json(folder / "results.json", results)


def _save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    from . import _compat

    with _compat.quiet_weight_progress():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(data, handle, indent=2, default=str)
