"""``run``: apply a recipe's steps to its base model in memory, measuring after each, and save the final folder.

Everything that can be checked is checked before the first step starts: the recipe (structure, fields, step
order; :meth:`Recipe.from_dict`), the save folder (``check_save_dir``), a model passed in (it must be the
recipe's ``base_model``, which ``recipe.yaml`` records), then each step against the loaded model
(``Step.check_model``). Each step starts from the recipe's seed (``transformers.set_seed``), so the same recipe
and seed give the same weights. Intermediate models stay in memory; only steps that need scratch space
(Trainer output, Týr's work folder) use temporary folders, removed when the step ends.

Example:
    >>> from hf_compress.recipe import run
    >>> result = run("recipe.yaml", "out/")  # doctest: +SKIP
    >>> [(r.name, r.metrics["perplexity"]) for r in result.records]  # doctest: +SKIP
    [('base model', 21.1), ('prune sds', 27.4), ('quantize dlqat', 28.9)]
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..utils import InvalidArgumentTypeError, check_save_dir, get_logger
from .config import Recipe, RecipeError


if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..evaluation.results import MetricRecord


__all__ = ["RecipeResult", "StepRecord", "check_is_base_model", "check_not_base_folder", "check_repo_id",
           "load_recipe", "local_references", "run", "warn_local_references"]

logger = get_logger(__name__)


@dataclass
class StepRecord:
    """What one step did (``index`` 0 is the base model, measured before any step)."""

    index: int
    kind: str
    method: str
    name: str
    settings: dict[str, Any]
    """The step's resolved settings (defaults filled in)."""
    given_settings: dict[str, Any]
    """The settings the recipe wrote."""
    seconds: float
    """Seconds the step's work took (measurement excluded)."""
    metrics: dict[str, Any]
    """Measured after the step: ``perplexity``, ``stored_bytes``, ``decoder_linear_bytes``, ... ."""
    details: dict[str, Any] = field(default_factory=dict)
    """What the step reported (training loss, pruning summary, schedule, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecipeResult:
    """The outcome of :func:`run`: where the folder is, each step's record, the final model's measurements."""

    save_dir: Path
    recipe: Recipe
    base: StepRecord
    steps: list[StepRecord]
    final_metrics: dict[str, Any]
    """The last step's measurements plus the saved folder's bytes on disk."""
    final_records: list[MetricRecord]
    """The final model's measured records (the card's ``model-index``)."""
    seconds: float
    model: Any = field(default=None, repr=False)
    """The final model, in memory (what the folder holds)."""

    @property
    def records(self) -> list[StepRecord]:
        """The base model's record, then one per step."""
        return [self.base, *self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.recipe.name, "save_dir": Path(self.save_dir).name, "recipe": self.recipe.to_dict(),
            "records": [r.to_dict() for r in self.records], "final_metrics": self.final_metrics,
            "final_records": [r.to_dict() for r in self.final_records], "seconds": round(self.seconds, 2),
        }


def load_recipe(recipe: Recipe | dict | str | os.PathLike) -> Recipe:
    """A :class:`Recipe` from a recipe, a dict or a YAML path (checked either way)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.from_yaml(recipe)
    raise InvalidArgumentTypeError(f"recipe must be a Recipe, a dict or a YAML file path, got {type(recipe).__name__}.")


def run(
    recipe: Recipe | dict | str | os.PathLike,
    save_dir: str | os.PathLike,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    repo_id: str | None = None,
) -> RecipeResult:
    """Run ``recipe`` and save the final model folder to ``save_dir``.

    Args:
        recipe: a :class:`Recipe`, its dict, or the path of its YAML file.
        save_dir: the final folder (written atomically; a non-empty one needs ``overwrite``).
        model / tokenizer: the recipe's base model, already in memory, instead of loading ``recipe.base_model``
            again (a tokenizer is then needed too); the model is changed in place. It must be that base model as
            ``hf_compress.assets.load_model(recipe.base_model)`` gives it, because ``recipe.yaml`` and the card
            record ``base_model`` and say that rerunning ``recipe.yaml`` rebuilds the weights: a model of another
            architecture or size than the base's config is refused before any work (one in another dtype than
            the float32 a rerun loads is accepted with a warning). Its weights are not compared: do not pass a model you have already changed; to
            compress another model, name it (its folder or Hub id) as the recipe's ``base_model``.
        device: where the steps run (``"cpu"``, ``"cuda"``, ``"auto"``, a ``torch.device``), training steps
            included; default: where the model is (the CPU for a loaded one). A ``cuda:N`` that ``Trainer`` would
            not train on (``N > 0`` in one process: use ``CUDA_VISIBLE_DEVICES=N``) is refused before any step
            runs when a step trains.
        overwrite: save into a non-empty ``save_dir``.
        progress: progress bars, the steps' own (training, feature caching) included.
        repo_id: the Hub repo (``owner/name``) the folder will be pushed to, which the card's loading snippet
            then names; without it the snippet loads the saved folder from disk.

    Returns:
        A :class:`RecipeResult`; the folder holds the model, ``recipe.yaml``, ``recipe_results.json``, the card
        and, where the recipe sets them, ``custom_generate/`` or ``heads/``.

    A recipe naming a local folder or text file (``base_model``, ``calibration_text``, ``training.text``, a
    ``generation`` step's draft model) runs, with a warning logged before any work: the folder records those paths, so ``push_to_hub`` refuses it when
    they are absolute, and its ``recipe.yaml`` rebuilds it only on this machine (:func:`warn_local_references`).

    Raises:
        RecipeError: the recipe is wrong or ``save_dir`` is the ``base_model``'s own folder (before anything is
            loaded); a step's settings do not fit the model, ``model`` is not the recipe's base model, or a step
            cannot follow what the base model already is (a ``base_model`` saved packed, routed, slim or pruned by
            hf_compress: ``steps.model_facts``), all before any step runs.
        FileExistsError: ``save_dir`` is not empty and ``overwrite`` is false (before anything is loaded).
        ValueError: ``repo_id`` is not a valid Hub repo id (before anything is loaded).

    Example:
        >>> result = run("examples/recipes/tiny-llama-wanda24-rtn4.yaml", "out/")  # doctest: +SKIP
        >>> result.final_metrics["perplexity"]  # doctest: +SKIP
    """
    import torch
    from ..utils import progress_bar
    from transformers import set_seed

    from ..hub import base_model_of, base_weights_of
    from .card import recipe_card
    from .measure import decoder_linear_fp32_bytes, measure
    from ..training import is_main_process
    from .save import write_folder
    from .steps import RecipeState, check_order, model_facts

    started = time.perf_counter()
    recipe = load_recipe(recipe)
    target = check_save_dir(save_dir, overwrite)
    check_not_base_folder(recipe, target)
    if model is not None and tokenizer is None:
        raise ValueError("run(model=...) needs the model's tokenizer too: pass tokenizer=.")
    check_repo_id(repo_id)
    warn_local_references(recipe, target)  # now, not an hour later when push_to_hub refuses the folder
    device = _resolve_device(device)
    if model is None:
        from ..assets import load_model

        logger.info("loading %s", recipe.base_model)
        model, tokenizer = load_model(recipe.base_model, recipe.dtype)
    else:
        check_is_base_model(model, recipe.base_model, recipe.dtype)
    facts = model_facts(model)  # a base_model saved by hf_compress: the steps must fit what it already is
    try:
        check_order(recipe.steps, facts)
    except RecipeError as error:
        raise RecipeError(f"recipe: base_model {recipe.base_model!r}: {error}") from None
    state = RecipeState(model=model, tokenizer=tokenizer, device=device or model.device, seed=recipe.seed,
                        facts=set(facts))
    for step in recipe.steps:
        step.check_model(state)
    if device is not None:  # after the checks: a device a step refuses must not cost a move of the whole model first
        model.to(device)
    # The card's base_model: the Hub model the recipe names (which recipe.yaml rebuilds from), else the model's own
    # (a folder hf_compress saved records the Hub model it came from, as every other card of the library names it).
    base_model = recipe_hub_id(recipe.base_model) or base_model_of(model.config)
    base_weights = base_weights_of(model.config)  # a reference model (or a folder saved from one): its GGUF origin
    base_fp32 = decoder_linear_fp32_bytes(model)
    zero_shot = bool(recipe.evaluation.zero_shot_tasks)

    def measured(zero_shot_now: bool) -> tuple[dict[str, Any], list]:
        return measure(state.model, state.tokenizer, recipe.evaluation, base_linear_fp32=base_fp32,
                       zero_shot=zero_shot_now, progress=progress)

    metrics, _ = measured(zero_shot)
    base = StepRecord(0, "base", "", "base model", {"model": recipe.base_model}, {"model": recipe.base_model}, 0.0,
                      metrics)
    logger.info("base model %s: %s", recipe.base_model, _summary(metrics))
    records: list[StepRecord] = []
    final_records: list = []
    for step in progress_bar(recipe.steps, desc=f"recipe {recipe.name}", unit="step", disable=not progress):
        set_seed(recipe.seed)
        logger.info("step %d/%d: %s", step.index + 1, len(recipe.steps), step.describe())
        begin = time.perf_counter()
        details = step.apply(state, progress)
        seconds = time.perf_counter() - begin
        state.facts |= step.produces()
        last = step is recipe.steps[-1]
        metrics, final_records = measured(zero_shot and last)
        if state.heads is not None:
            metrics["heads_bytes"] = sum(p.numel() * p.element_size() for p in state.heads.parameters())
        records.append(StepRecord(step.index + 1, step.kind, step.method, step.describe(), step.to_dict(),
                                  step.given_settings(), round(seconds, 2), metrics, details))
        logger.info("after %s (%.1f s): %s", step.describe(), seconds, _summary(metrics))

    result = RecipeResult(target, recipe, base, records, {}, final_records, 0.0, state.model)

    def finish(layout, disk):
        result.final_metrics = {**records[-1].metrics, **disk}
        result.seconds = time.perf_counter() - started
        card = recipe_card(recipe, result.records, final_records, layout, base_model, repo_id=repo_id,
                           folder=Path(target).resolve().name, base_facts=facts, base_weights=base_weights)
        return card, result.to_dict()

    if not is_main_process():  # under torchrun every process ran the recipe alike; rank 0 writes the folder
        result.final_metrics, result.seconds = dict(records[-1].metrics), time.perf_counter() - started
        return result
    with torch.no_grad():
        write_folder(state, target, overwrite=overwrite, recipe=recipe, base_model=base_model, finish=finish,
                     repo_id=repo_id, progress=progress)
    return result


def local_references(recipe: Recipe) -> list[tuple[str, str]]:
    """``(field, value)`` for each field of ``recipe`` that names something on this machine only: a
    ``base_model`` that is a local folder, a ``calibration_text`` / ``training.text`` that is a text file (not one
    of the offline text sets), a ``generation`` step's setting naming an existing file or folder (a draft model).
    ``recipe.yaml``, the card and ``recipe_results.json`` record them as written.

    Example:
        >>> local_references(Recipe.from_dict({"name": "x", "base_model": "tiny-llama",
        ...     "steps": [{"prune": {"method": "magnitude", "sparsity": "2:4"}}]}))
        []
    """
    from ..assets.text import CALIBRATION_TEXTS

    found = []
    if _base_model_path(recipe) is not None:
        found.append(("base_model", recipe.base_model))
    for step in recipe.steps:
        fields = step.to_dict()
        training = fields.get("training") if isinstance(fields.get("training"), dict) else {}
        texts = [("calibration_text", fields.get("calibration_text")), ("training.text", training.get("text"))]
        where = step.where(step.index, step.method)
        for key, value in texts:
            if isinstance(value, str) and value not in CALIBRATION_TEXTS:  # parsing checked it is a file
                found.append((f"{where} {key}", value))
        if step.kind == "generation":  # a strategy's draft model (or arbiter) given as a folder
            found += [(f"{where} {key}", value) for key, value in fields.items()
                      if key not in ("method", "strategy") and isinstance(value, str) and value
                      and Path(value).expanduser().exists()]
    return found


def warn_local_references(recipe: Recipe, save_dir: str | os.PathLike) -> None:
    """Warn, before any work, that the folder will record local paths (:func:`local_references`): with an
    absolute path ``push_to_hub`` refuses the folder (it publishes no path of this machine), and either way its
    ``recipe.yaml`` rebuilds it only on this machine. A local run is legitimate: this only warns."""
    from ..assets.text import CALIBRATION_TEXTS
    from ..hub.push import local_paths_in

    found = local_references(recipe)
    if not found:
        return
    listed = ", ".join(f"{field} {value!r}" for field, value in found)
    blocked = sorted({path for _, value in found for path in local_paths_in(value, save_dir)})
    if blocked:
        what = (f"push_to_hub will refuse to push it (it publishes no absolute path of this machine: "
                f"{', '.join(blocked)}), and its recipe.yaml rebuilds it only on this machine. To publish it")
    else:
        what = ("its recipe.yaml rebuilds it only on this machine (pushed, the folder cannot be rebuilt elsewhere). "
                "For a folder that rebuilds anywhere")
    fixes = []
    if any(field == "base_model" for field, _ in found):
        fixes.append("name the base model by its Hub id (push that folder to the Hub first)")
    if any(field.endswith("text") for field, _ in found):
        fixes.append(f"use an offline calibration text set ({', '.join(CALIBRATION_TEXTS)}) instead of a text file")
    if any(field != "base_model" and not field.endswith("text") for field, _ in found):
        fixes.append("name the strategy's models by their Hub ids")
    logger.warning(
        "recipe %r names files or folders of this machine: %s. The saved folder's recipe.yaml, card and "
        "recipe_results.json record them as written, so %s, %s, and run again; a local run needs nothing more.",
        recipe.name, listed, what, " and ".join(fixes))


def check_is_base_model(model: PreTrainedModel, base_model: str, dtype: str = "float32") -> None:
    """Refuse a ``run(model=...)`` that is not the recipe's ``base_model``: the folder's ``recipe.yaml`` and card
    would name a model it was not built from, and rerunning ``recipe.yaml`` would not rebuild it.

    When both name a Hub model (the recipe's ``base_model`` a Hub id or a reference model, the model's
    ``name_or_path`` a Hub id), they must be the same one: ``SmolLM2-135M`` and ``SmolLM2-135M-Instruct`` share
    a config, and the card names the model's. Then the base's config is read without its weights (a tiny model's
    is built; a Hub id's comes from the cache or the Hub); the architecture and the sizes must match. Weights in
    another dtype than the recipe's ``dtype`` (float32 unless set) are accepted with a warning (a rerun may differ by
    rounding).
    """
    from ..hub import hub_model_id

    where = f"run(model=...): the recipe's base_model is {base_model!r}"
    advice = (f"pass the model load_model({base_model!r}) gives (or no model, to load it), or set the recipe's "
              "base_model to the model you mean to compress")
    named, loaded = recipe_hub_id(base_model), hub_model_id(getattr(model.config, "name_or_path", None))
    if named and loaded and named.lower() != loaded.lower():
        hub = f" (the Hub model {named})" if named != base_model else ""
        raise RecipeError(f"{where}{hub} but the model passed was loaded from {loaded}, so the card would name "
                          f"{loaded} as the base model while recipe.yaml rebuilds from {named}; {advice}.")
    expected = _base_config(base_model, where)
    got = model.config
    for name in ("model_type", *_SIZE_FIELDS):
        want, have = (_config_value(config, name) for config in (expected, got))
        if want != have:
            raise RecipeError(f"{where} ({name} {want!r}) but the model passed has {name} {have!r}, so recipe.yaml "
                              f"and the card would describe another model; {advice}.")
    changed = _weight_unlike_the_base(model, base_model)
    if changed is not None:
        raise RecipeError(f"{where}, but the model passed holds other values in {changed} than that checkpoint (pruned, "
                          "quantized or trained since it was loaded?), so recipe.yaml would not rebuild the folder "
                          f"and the card would misstate its base; {advice}.")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()} -
                    {dtype})
    if dtypes:  # a bf16 model on a GPU is the common case: say so, do not refuse
        logger.warning("run(model=...): the model passed holds %s weights; a rerun of recipe.yaml loads %s in "
                       "%s (the recipe's dtype), so its weights may differ by rounding.", ", ".join(dtypes),
                       base_model, dtype)


def recipe_hub_id(base_model: str) -> str | None:
    """The Hub model a recipe's ``base_model`` names: a reference model's upstream id, or the Hub id itself;
    ``None`` for a tiny model or a folder.

    Example:
        >>> recipe_hub_id("smollm2-135m"), recipe_hub_id("org/model"), recipe_hub_id("tiny-llama")
        ('HuggingFaceTB/SmolLM2-135M-Instruct', 'org/model', None)
    """
    from ..assets.reference_models import REFERENCE_MODELS
    from ..hub import hub_model_id

    if base_model in REFERENCE_MODELS:
        return REFERENCE_MODELS[base_model].hub_id
    return hub_model_id(base_model)


# Architecture sizes compared by check_is_base_model (transformers maps them onto GPT-2's n_embd, n_layer, ...).
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size")


def _config_value(config: Any, field: str) -> Any:
    return getattr(config if field == "model_type" else config.get_text_config(), field, None)


def _weight_unlike_the_base(model: PreTrainedModel, base_model: str) -> str | None:
    """The name of a decoder weight of ``model`` (the first block's first linear layer, the last block's last) whose
    values differ from ``base_model``'s checkpoint, read tensor by tensor where it is on this machine (a tiny model is
    built); ``None`` when they agree, or when the checkpoint is not here to read (a Hub id not in the cache, a
    checkpoint in a compressed format), which the config check alone then vouches for."""
    import torch

    from ..assets.resolve import tiny_architecture
    from ..assets.tiny_models import tiny_model
    from ..modeling.layers import find_decoder_blocks, find_linear_layers, onloaded

    block_name, blocks = find_decoder_blocks(model)
    if not len(blocks):
        return None
    layers = {}
    for index in (0, len(blocks) - 1):
        found = list(find_linear_layers(blocks[index]).items())
        for name, layer in (found[0], found[-1]) if found else ():
            layers[f"{block_name}.{index}.{name}.weight"] = layer
    arch = tiny_architecture(base_model)
    if arch is not None:
        stored = dict(tiny_model(arch)[0].named_parameters())
        read = stored.get
    else:
        read = _checkpoint_reader(base_model, model, list(layers))
        if read is None:
            return None
    for key, layer in layers.items():
        value = read(key)
        if value is None:
            return None  # stored under another name or encoded: nothing to compare with
        with onloaded(layer):
            current = layer.weight.detach()
            if value.shape != current.shape or not torch.equal(value.to(current.device, current.dtype), current):
                return key
    return None


def _checkpoint_reader(base_model: str, model: PreTrainedModel, keys: list[str]) -> Any:
    """``key -> tensor`` (``None`` when absent) over ``base_model``'s safetensors on this machine, one tensor per read;
    ``None`` when there is no such checkpoint here."""
    from safetensors import safe_open

    from .. import _compat
    from ..assets.reference_models import REFERENCE_MODELS, reference_model_path
    from ..formats.integrity import read_header

    if base_model in REFERENCE_MODELS:
        folder = Path(reference_model_path(base_model))
    elif Path(base_model).expanduser().is_dir():
        folder = Path(base_model).expanduser()
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = [try_to_load_from_cache(base_model, name) for name in ("model.safetensors.index.json",
                                                                         "model.safetensors")]
        paths = [Path(c) for c in cached if isinstance(c, str)]
        if not paths:
            return None
        folder = paths[0].parent
    try:  # the headers only: which file holds which tensor
        entries = {name: entry for file in sorted(folder.glob("*.safetensors")) for name, entry in read_header(file).items()}
        stored_keys = _compat.checkpoint_keys_of(model, keys)
    except (OSError, ValueError):
        return None

    def read(key: str) -> Any:
        stored = stored_keys.get(key, key)
        entry = entries.get(stored)
        if entry is None:
            return None
        with safe_open(str(entry.file), framework="pt") as handle:
            return handle.get_tensor(stored)

    return read


def _base_config(base_model: str, where: str) -> Any:
    """The config of ``base_model`` as ``load_model`` would resolve the name, read without loading weights."""
    from transformers import AutoConfig

    from ..assets.reference_models import REFERENCE_MODELS, reference_model_path
    from ..assets.resolve import tiny_architecture
    from ..assets.tiny_models import tiny_config
    from .config import RecipeError

    arch = tiny_architecture(base_model)
    if arch is not None:
        return tiny_config(arch)
    try:  # a reference model's config is that of its converted checkpoint, which loading it would make too
        return AutoConfig.from_pretrained(
            reference_model_path(base_model) if base_model in REFERENCE_MODELS else base_model)
    except (OSError, ValueError) as error:
        raise RecipeError(f"{where}, whose config cannot be read ({' '.join(str(error).split())[:200]}), so the model "
                          "passed cannot be checked to be it; pass no model to load base_model, or set base_model to a "
                          "folder or Hub id whose config is readable.") from None


def check_not_base_folder(recipe: Recipe, save_dir: str | os.PathLike, argument: str = "save_dir") -> None:
    """Refuse a ``save_dir`` that is the recipe's ``base_model`` folder (with ``overwrite``): the run would replace
    the model that ``recipe.yaml`` names as its base, so the card's "rerunning recipe.yaml rebuilds these weights"
    would be false and a rerun would start from the compressed model.

    Example:
        >>> import os
        >>> os.makedirs("models/base", exist_ok=True)
        >>> recipe = Recipe.from_dict({"name": "x", "base_model": "models/base",
        ...                            "steps": [{"prune": {"method": "magnitude", "sparsity": "2:4"}}]})
        >>> check_not_base_folder(recipe, "models/base/")
        Traceback (most recent call last):
        ...
        hf_compress.recipe.config.RecipeError: save_dir models/base/ is the recipe's base_model folder ...
    """
    base = _base_model_path(recipe)
    if base is not None and base.is_dir() and base.resolve() == Path(save_dir).expanduser().resolve():
        raise RecipeError(f"{argument} {save_dir} is the recipe's base_model folder ({recipe.base_model}): the run would "
                          "replace the model recipe.yaml names as its base, so it could never be rebuilt; save to "
                          "another folder.")


def _base_model_path(recipe: Recipe) -> Path | None:
    """The local path ``load_model`` reads ``recipe.base_model`` from: ``None`` for a name it builds itself (a
    reference or tiny model) or a Hub id."""
    from ..assets.resolve import is_builtin_model

    path = Path(recipe.base_model).expanduser()
    return None if is_builtin_model(recipe.base_model) or not path.exists() else path


def check_repo_id(repo_id: str | None, argument: str = "repo_id") -> None:
    """Refuse a ``repo_id`` that is not ``owner/name`` (``argument``: how the message names it, the CLI's flag)."""
    from ..hub.model_card import repo_id_problem

    problem = None if repo_id is None else repo_id_problem(repo_id)
    if problem:
        raise ValueError(f"{argument} must be the Hub repo the folder will be pushed to, as owner/name, got {repo_id!r} "
                         f"({problem}).")


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    import torch

    if device is None or isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise InvalidArgumentTypeError(f"device must be a string such as 'cpu' or a torch.device, got {device!r}.")
    from ..cli.main import resolve_device

    return resolve_device(device)


def _summary(metrics: dict[str, Any]) -> str:
    perplexity = metrics.get("perplexity")
    text = f"perplexity {perplexity:.4g}" if perplexity is not None else "no perplexity"
    return (f"{text}, {metrics['stored_bytes'] / 1e6:.2f} MB stored, decoder linears "
            f"{metrics['decoder_linear_vs_base_fp32']:.3f}x the base's fp32")

