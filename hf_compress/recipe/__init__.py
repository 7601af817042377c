"""Recipes: several of the library's methods as one reproducible, measured run.

A recipe (YAML or a dict) names a base model, a seed, what to measure, and ordered steps — ``prune``,
``quantize``, ``route``, ``heads``, ``generation`` — each one of the library's methods with its config. ``run``
checks everything first (fields, step order, the save folder), applies the steps in memory, measures perplexity
and bytes after the base model and after every step, and saves one folder that ``from_pretrained`` loads, with
``recipe.yaml`` and a card listing each step and its numbers. Names load on first use (importing this package
imports neither torch nor transformers).

Example:
    >>> from hf_compress.recipe import Recipe
    >>> recipe = Recipe.from_dict({"name": "tiny-wanda24-rtn4", "base_model": "tiny-llama", "steps": [
    ...     {"prune": {"method": "wanda", "sparsity": "2:4"}}, {"quantize": {"method": "rtn", "bits": 4}}]})
    >>> recipe.check()
    ['1. prune wanda', '2. quantize rtn']
    >>> result = run(recipe, "out/")  # doctest: +SKIP
"""

from ..utils.import_hooks import lazy_exports


_EXPORTS = {
    "EvaluationSpec": "config",
    "Recipe": "config",
    "RecipeError": "config",
    "RecipeResult": "runner",
    "StepRecord": "runner",
    "load_recipe": "runner",
    "run": "runner",
    "STEP_KINDS": "steps",
    "Step": "steps",
    "weight_bytes": "measure",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
