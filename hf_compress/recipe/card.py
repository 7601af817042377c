"""The model card of a recipe's final folder: every step, its settings, and the numbers measured after it.

Built with ``hub.build_model_card`` on the ``model_cards/recipe.md`` template, so the metadata (``base_model``,
tags, ``compression.recipe``) is the same as every hf_compress card's and ``model-index`` holds only the final
model's measured records. The per-step table (base model first) and the recipe's description are rendered
here and put where the template marks them (``build_model_card`` fills a fixed set of template fields).

Example:
    >>> card = recipe_card(recipe, result.records, result.final_records, layout,
    ...                    "HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
    >>> "| 2 | quantize dlqat |" in str(card)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..hub.model_card import TEMPLATES_DIR, build_model_card, validate_model_card


if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from ..evaluation.results import MetricRecord
    from .config import Recipe
    from .runner import StepRecord


__all__ = ["FolderLayout", "recipe_card", "steps_table"]

TEMPLATE = TEMPLATES_DIR / "recipe.md"
WEIGHTLESS_STEPS = ("heads", "generation")
"""Step kinds that leave the model's weights as they were (they add drafting heads or a decoding strategy)."""
STEPS_MARKER = "<!-- hf_compress:recipe-steps -->"
DESCRIPTION_MARKER = "<!-- hf_compress:recipe-description -->"


@dataclass(frozen=True)
class FolderLayout:
    """What the final folder holds beside the model, for the card's loading snippet."""

    custom_generate: bool = False
    """``custom_generate/generate.py`` at the top level (a strategy without weights of its own)."""
    heads_folder: str | None = None
    """The sub-folder holding the drafting heads and their ``custom_generate`` strategy."""
    cache: dict[str, Any] | None = None
    """The cache settings of a ``generation`` step."""


def recipe_card(recipe: Recipe, records: Sequence[StepRecord], final_metrics: Sequence[MetricRecord],
                layout: FolderLayout, base_model: str | None, *, repo_id: str | None = None,
                folder: str = "out", base_facts: dict[str, str] | None = None,
                base_weights: dict[str, Any] | None = None) -> ModelCard:
    """The card of the final folder (``model-index`` = ``final_metrics``, measured on the final model).

    Its loading snippet names ``repo_id`` (the Hub repo the folder goes to) when known, else the saved ``folder``
    (its own name, without the path to it, which a card read elsewhere cannot know): the recipe's name alone is
    no repo id. ``base_facts`` (``steps.model_facts``): what the base model already was (a folder hf_compress
    saved), which the card says (``compression.recipe.base_model_already`` and a sentence), since the steps
    listed are not all that was done to the weights. ``base_weights`` (``hub.base_weights_of`` of the base model):
    the GGUF a reference base model was de-quantized from, which the card states (``compression.base_weights``).
    """
    stages = [{"kind": step.kind, "method": step.method or step.fields.get("cache", {}).get("method", step.kind),
               **step.to_dict()} for step in recipe.steps]
    card_recipe = {"stages": stages, "name": recipe.name, "base_model": recipe.base_model, "seed": recipe.seed,
                   "evaluation": recipe.evaluation.to_dict()}
    already = [base_facts[fact] for fact in sorted(base_facts or {})]
    if already:
        card_recipe["base_model_already"] = already
    card = build_model_card(
        base_model=base_model, model_name=recipe.name, recipe=card_recipe, metrics=final_metrics, template=TEMPLATE,
        repo_id=repo_id, load_snippet=load_snippet(layout, repo_id, folder), extra_tags=["hf_compress-recipe"],
        base_weights=base_weights,
        # Heads and decoding strategies add to the model without touching its weights: such a card says so, not
        # "compressed".
        template_fields={"weights_unchanged": all(step.kind in WEIGHTLESS_STEPS for step in recipe.steps)},
    )
    description = recipe.description.strip() if recipe.description else ""
    if already:
        description = (f"The recipe's base model was already {' and '.join(already)} when its steps began (by an "
                       "earlier compression); the steps below come on top of that.\n\n" + description).strip()
    card.text = card.text.replace(STEPS_MARKER, steps_table(records, recipe.evaluation.score_last)).replace(
        DESCRIPTION_MARKER, description)
    validate_model_card(card)
    return card


def steps_table(records: Sequence[StepRecord], score_last: int | None = None) -> str:
    """A Markdown table: one row for the base model and one per step, with the measured numbers."""
    from ..evaluation.perplexity import perplexity_label

    lines = [
        f"| # | Step | Settings | {perplexity_label(score_last)} | Stored MB | Decoder linears × base fp32 | Step seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        metrics = record.metrics
        lines.append("| " + " | ".join([
            str(record.index), _cell(record.name), _cell(_settings_text(record.given_settings)),
            _number(metrics.get("perplexity"), "{:.4g}"), _number(_mb(metrics.get("stored_bytes")), "{:.2f}"),
            _number(metrics.get("decoder_linear_vs_base_fp32"), "{:.3f}"), _number(record.seconds, "{:.1f}"),
        ]) + " |")
    return "\n".join(lines)


def load_snippet(layout: FolderLayout, repo_id: str | None = None, folder: str = "out") -> str:
    """Python that loads the folder and generates the way the recipe says: from the Hub repo ``repo_id`` when
    known, else from the saved ``folder`` on disk (a comment says what to use once it is pushed)."""
    lines = ["import hf_compress  # registers hf_compress's checkpoint formats with transformers"]
    if layout.heads_folder and repo_id:
        lines += ["from huggingface_hub import snapshot_download"]
    lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if repo_id is None:
        hub = ('huggingface_hub.snapshot_download("<owner>/<repo>")' if layout.heads_folder
               else 'its repo id ("<owner>/<repo>")')
        lines += [f'folder = "{folder}/"  # this folder on your disk; from the Hub, use {hub} instead', ""]
        source = "folder"
    elif layout.heads_folder:  # the heads' custom_generate is a sub-folder: it needs the files on disk
        lines += [f'folder = snapshot_download("{repo_id}")  # or the local folder', ""]
        source = "folder"
    else:
        source = f'"{repo_id}"'
    lines += [f"model = AutoModelForCausalLM.from_pretrained({source})",
              f"tokenizer = AutoTokenizer.from_pretrained({source})",
              'inputs = tokenizer("The capital of France is", return_tensors="pt")']
    if layout.heads_folder:
        call = (f'out = model.generate(**inputs, custom_generate=f"{{folder}}/{layout.heads_folder}", '
                "trust_remote_code=True, max_new_tokens=64)")
        lines += [f"# speculative decoding with the drafting heads saved in {layout.heads_folder}/", call]
    elif layout.custom_generate:
        lines += ["# the decoding strategy saved in custom_generate/",
                  f"out = model.generate(**inputs, custom_generate={source}, trust_remote_code=True, max_new_tokens=64)"]
    if layout.cache:
        from .steps.generation import cache_snippet

        lines += ["", "# the compressed KV cache the recipe chose", *cache_snippet(layout.cache).splitlines()]
    if not (layout.heads_folder or layout.custom_generate or layout.cache):
        lines += ["out = model.generate(**inputs, max_new_tokens=64)"]
    return "\n".join(lines)


def _settings_text(settings: dict[str, Any]) -> str:
    shown = {k: v for k, v in settings.items() if k != "method"}
    return ", ".join(f"{k}={v if isinstance(v, (str, int, float)) else json.dumps(v)}" for k, v in shown.items()) or "—"


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 1e6


def _number(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
